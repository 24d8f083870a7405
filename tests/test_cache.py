"""Prompt sources and the prompt-embedding cache: ``onestep-train cache`` and ``distill --cache``."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from onestep_pipelines.training.cache import PromptCache, iter_prompts, write_cache
from onestep_pipelines.training.cli import main
from onestep_pipelines.training.teachers import load_teacher
from onestep_pipelines.training.trainer import DistillConfig, distill

PROMPTS = ["a cat", "a dog on a sofa", "two red  apples", "a blue car", "a house\tin snow"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    (folder / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    (folder / "p.jsonl").write_text("".join(json.dumps({"id": i, "caption": p}) + "\n" for i, p in enumerate(PROMPTS)))
    (folder / "p.csv").write_text("id,text\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
    (folder / "p.json").write_text(json.dumps(PROMPTS))
    return folder


def test_prompt_sources_read_one_prompt_at_a_time(sources):
    expected = [" ".join(p.split()) for p in PROMPTS]
    for name in ("p.txt", "p.jsonl", "p.csv", "p.json"):
        assert list(iter_prompts(str(sources / name))) == expected, name
    with pytest.raises(ValueError, match="no prompt_field field.*--prompt-column"):
        list(iter_prompts(str(sources / "p.jsonl"), "prompt_field"))
    import datasets

    table = datasets.Dataset.from_dict({"id": list(range(len(PROMPTS))), "prompt": PROMPTS})
    table.to_parquet(str(sources / "p.parquet"))
    table.save_to_disk(str(sources / "saved"))
    assert list(iter_prompts(str(sources / "p.parquet"))) == expected == list(iter_prompts(str(sources / "saved")))


def test_without_the_datasets_package_its_sources_name_it(sources, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # (import datasets raises ImportError)
    with pytest.raises(ValueError, match="pip install datasets"):
        list(iter_prompts(str(sources / "p.parquet")))


def test_the_cache_holds_the_teachers_own_embeddings_and_training_from_it_equals_training_from_the_prompts(stock_teachers, sources, tmp_path):
    """Rows equal the in-memory encoding (the unconditional row last); a run from the cache trains exactly as a run
    from the prompt file (same weights), and never runs a text encoder while it trains (no previews, no validation)."""
    folders, _ = stock_teachers
    cache = tmp_path / "cache"
    assert main(["cache", "--teacher", folders["sd"], "--prompts", str(sources / "p.jsonl"), "--output", str(cache), "--resolution", "32",
                 "--shard-rows", "2", "--batch-size", "3", "--device", "cpu"]) == 0
    record = json.loads((cache / "cache.json").read_text())
    assert record["count"] == 5 and len(record["shards"]) == 3 and record["keys"]["prompt_embeds"]["dtype"] == "float32"
    teacher = load_teacher(folders["sd"], resolution=32)
    teacher.set_prompts(list(iter_prompts(str(sources / "p.jsonl"))))
    opened = PromptCache(str(cache))
    assert list(opened.prompts) == teacher.prompts
    index = torch.tensor([5, 0, 3, 3])
    torch.testing.assert_close(opened.columns["prompt_embeds"].to("cpu")[index], teacher.embeddings["prompt_embeds"][index], rtol=0, atol=1e-6)

    base = dict(teacher=folders["sd"], resolution=32, num_steps=1, max_train_steps=3, batch_size=2, evaluate=False, preview_every=0, lora_rank=4)
    from_prompts = distill(DistillConfig(prompts=str(sources / "p.jsonl"), output_dir=str(tmp_path / "a"), **base))
    from transformers import CLIPTextModel

    calls = []
    original = CLIPTextModel.forward
    CLIPTextModel.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        from_cache = distill(DistillConfig(cache=str(cache), output_dir=str(tmp_path / "b"), **base))
    finally:
        CLIPTextModel.forward = original
    assert from_cache["rank_checksums"] == from_prompts["rank_checksums"]
    assert calls == []


def test_a_cache_run_resumes_exactly_and_refuses_another_teachers_cache(stock_teachers, sources, tmp_path):
    folders, _ = stock_teachers
    cache = str(tmp_path / "cache")
    teacher = load_teacher(folders["sd"], resolution=32)
    write_cache(teacher, str(sources / "p.txt"), cache, shard_rows=2)
    base = dict(teacher=folders["sd"], cache=cache, resolution=32, num_steps=1, batch_size=2, evaluate=False, preview_every=0, lora_rank=4,
                checkpoint_every=2)
    straight = distill(DistillConfig(output_dir=str(tmp_path / "straight"), max_train_steps=4, **base))
    distill(DistillConfig(output_dir=str(tmp_path / "split"), max_train_steps=2, **base))
    resumed = distill(DistillConfig(output_dir=str(tmp_path / "split"), max_train_steps=4, resume="latest", **base))
    assert resumed["rank_checksums"] == straight["rank_checksums"]
    with pytest.raises(ValueError, match="holds embeddings of teacher .*this run's is"):
        distill(DistillConfig(**{**base, "teacher": folders["sd3"]}, output_dir=str(tmp_path / "other"), max_train_steps=1))
    with pytest.raises(ValueError, match="not a prompt cache"):
        DistillConfig(teacher=folders["sd"], cache=str(tmp_path), output_dir=str(tmp_path / "x")).check_paths()
    with pytest.raises(ValueError, match="trains on images.*a prompt cache holds no images"):
        DistillConfig(teacher=folders["sd"], cache=cache, method="consistency", output_dir=str(tmp_path / "y")).check_paths()


def test_an_interrupted_cache_continues_after_its_last_complete_shard(stock_teachers, sources, tmp_path, monkeypatch):
    folders, _ = stock_teachers
    teacher = load_teacher(folders["sd3"], resolution=32)
    fresh = str(tmp_path / "fresh")
    write_cache(teacher, str(sources / "p.txt"), fresh, shard_rows=2, batch_size=1)
    from onestep_pipelines.training import teachers

    seen = []

    real = teachers.encode_prompts

    def failing(t, prompts):
        seen.append(len(prompts))
        if len(seen) == 3:  # after the first shard (2 prompts, one at a time) was written
            raise KeyboardInterrupt
        return real(t, prompts)

    monkeypatch.setattr(teachers, "encode_prompts", failing)
    stopped = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        write_cache(teacher, str(sources / "p.txt"), stopped, shard_rows=2, batch_size=1)
    assert os.listdir(stopped) and not os.path.exists(os.path.join(stopped, "cache.json"))
    with pytest.raises(ValueError, match="unfinished cache"):
        PromptCache(stopped)
    monkeypatch.setattr(teachers, "encode_prompts", lambda t, prompts: seen.append(("again", len(prompts))) or real(t, prompts))
    write_cache(teacher, str(sources / "p.txt"), stopped, shard_rows=2, batch_size=1)
    assert ("again", 1) in seen and sum(n for tag, n in (s for s in seen if isinstance(s, tuple))) == 3 + 1  # 3 prompts left and the empty one
    for name in json.loads(open(os.path.join(fresh, "cache.json")).read())["shards"]:
        a, b = load_file(os.path.join(fresh, name)), load_file(os.path.join(stopped, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="already holds a finished cache"):
        write_cache(teacher, str(sources / "p.txt"), stopped)
