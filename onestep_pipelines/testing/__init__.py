"""Offline test kit: tiny random-weight pipelines of the stock architectures."""

from .tiny_pipelines import ARCHITECTURES, clip_tokenizer, t5_tokenizer, tiny_call_kwargs, tiny_clip_folder, tiny_pipeline

__all__ = ["ARCHITECTURES", "clip_tokenizer", "t5_tokenizer", "tiny_call_kwargs", "tiny_clip_folder", "tiny_pipeline"]
