"""Few-step pipelines."""

from .pipeline_digits import DigitsPipeline

__all__ = ["DigitsPipeline"]
