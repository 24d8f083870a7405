"""Upload to and download from the in-process fake Hub (no network, no Xet)."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, model_info, snapshot_download
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import save_file

from onestep_pipelines.testing import tiny_pipeline

TOKEN = "hf_secret_token_123"


def _upload(hub, folder, repo_id):
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(repo_id, exist_ok=True)
    api.create_repo(repo_id, exist_ok=True)  # the second call gets a 409, which exist_ok accepts
    return api.upload_folder(folder_path=folder, repo_id=repo_id)


def test_upload_folder_then_snapshot_download(hub, tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Student\n")
    save_file({"weight": torch.randn(512, 1024)}, str(folder / "model.safetensors"))  # 2 MiB
    local = {p.name: p.read_bytes() for p in folder.iterdir()}

    commit = _upload(hub, folder, "user/student")

    assert hub.repos["user/student"] == local
    assert commit.oid == hub.commits["user/student"][-1] and len(commit.oid) == 40
    lfs_puts = [r for r in hub.requests if r.method == "PUT"]
    assert len(lfs_puts) == 1  # only the safetensors file went through LFS, as one "basic" PUT
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in writes)
    assert TOKEN not in repr(hub.requests)

    downloaded = snapshot_download("user/student", cache_dir=tmp_path / "cache")
    assert {name: (Path(downloaded) / name).read_bytes() for name in local} == local
    info = model_info("user/student")
    assert info.sha == commit.oid and {s.rfilename for s in info.siblings} == set(local)

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("user/student", "missing.json", cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        model_info("user/nobody")


def test_tiny_pipeline_round_trip(hub, tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path / "pipe")
    _upload(hub, tmp_path / "pipe", "user/tiny-sd")

    loaded = type(pipe).from_pretrained("user/tiny-sd", cache_dir=tmp_path / "cache")

    assert type(loaded) is type(pipe)
    torch.testing.assert_close(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight, rtol=0, atol=0)
