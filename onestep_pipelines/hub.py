"""Upload a saved student to the Hugging Face Hub, and the names of the files a student folder holds.

A bottom layer (huggingface_hub only): pipelines and the LoRA writer import it, it imports neither."""

from __future__ import annotations

import os

from huggingface_hub import HfApi

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # a LoRA student in diffusers / peft layout
R_EMBEDDER_WEIGHT_NAME = "r_embedder.safetensors"  # the second-time embedding of an r-conditioned LoRA student
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")  # download options


def push_student(
    folder: str,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload a student folder (a saved pipeline or a LoRA folder) with ``HfApi.upload_folder``.

    The repository is created when missing. ``token`` defaults to huggingface_hub's usual sources
    (``HF_TOKEN``, the cached ``hf auth login`` token); it is sent in the request headers only, never written
    to the card, the configs or the logs. Returns the URL of the commit.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"push_student: {folder} is not a folder.")
    names = set(os.listdir(folder))
    if "model_index.json" not in names and DIFFUSERS_WEIGHT_NAME not in names:
        raise ValueError(
            f"push_student: {folder} holds neither a saved pipeline (model_index.json) nor a LoRA student "
            f"({DIFFUSERS_WEIGHT_NAME}); save the student there first."
        )
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"push_student: repo_id must look like 'user/name', got {repo_id!r}.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload few-step student (onestep-pipelines)",
        ignore_patterns=[".tmp-*", "*.tmp-*", "__pycache__/*"],
    )
    return info.commit_url
