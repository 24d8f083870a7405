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

    base = dict(teacher=folders["sd"], resolution=32, num_steps=1, max_train_steps=3, batch_size=2, evaluate=False, preview_every=0, lora_rank=4,
                cpu_threads=1)  # (one thread: runs that compare weights bit for bit must not round with another thread count)
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
                checkpoint_every=2, cpu_threads=1)
    straight = distill(DistillConfig(output_dir=str(tmp_path / "straight"), max_train_steps=4, **base))
    distill(DistillConfig(output_dir=str(tmp_path / "split"), max_train_steps=2, **base))
    resumed = distill(DistillConfig(output_dir=str(tmp_path / "split"), max_train_steps=4, resume="latest", **base))
    assert resumed["rank_checksums"] == straight["rank_checksums"]
    with pytest.raises(ValueError, match="holds embeddings of teacher .*this run's is"):
        distill(DistillConfig(**{**base, "teacher": folders["sd3"]}, output_dir=str(tmp_path / "other"), max_train_steps=1))
    with pytest.raises(ValueError, match="not a prompt cache"):
        DistillConfig(teacher=folders["sd"], cache=str(tmp_path), output_dir=str(tmp_path / "x")).check_paths()
    with pytest.raises(ValueError, match="trains on images.*this cache holds prompts only"):
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


def test_image_caption_sources_and_an_image_cache_train_exactly_as_the_folder(stock_teachers, tmp_path):
    """Captioned images as a folder, a parquet file (datasets' Image feature), WebDataset shards and a saved dataset
    give the same pairs; a consistency run from the parquet file, and one from an image cache (latents + caption
    embeddings), train to the weights a run from the folder reaches."""
    import io
    import tarfile

    import datasets

    from onestep_pipelines.training.cache import iter_image_captions

    folders, data = stock_teachers
    pairs = [(image.convert("RGB"), caption) for image, caption in iter_image_captions(data)]
    assert [c for _, c in pairs] == ["a red square", "a blue circle"]
    table = datasets.Dataset.from_dict({"picture": [im for im, _ in pairs], "text": [c for _, c in pairs]}).cast_column("picture", datasets.Image())
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "000000.tar", "w") as tar:
        for i, (image, caption) in enumerate(pairs):
            for suffix, payload in (("png", _png(image)), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    for source, image_column in ((str(tmp_path / "pairs.parquet"), "picture"), (str(tmp_path / "saved"), "picture"), (str(tmp_path / "shards"), "")):
        got = list(iter_image_captions(source, image_column))
        assert [c for _, c in got] == [c for _, c in pairs], source
        assert all((torch.tensor(list(a.convert("RGB").getdata())) == torch.tensor(list(b.getdata()))).all() for (a, _), (b, _) in zip(got, pairs))
    with pytest.raises(ValueError, match="no image / jpg / jpeg / png / webp field.*--image-column"):
        next(iter_image_captions(str(tmp_path / "pairs.parquet")))

    cache = tmp_path / "image-cache"
    assert main(["cache", "--teacher", folders["sd"], "--data", data, "--output", str(cache), "--resolution", "32", "--device", "cpu"]) == 0
    assert "latents" in json.loads((cache / "cache.json").read_text())["keys"]
    base = dict(teacher=folders["sd"], method="consistency", resolution=32, num_steps=2, max_train_steps=3, batch_size=2, evaluate=False,
                preview_every=0, lora_rank=4, cpu_threads=1)
    from_folder = distill(DistillConfig(data=data, output_dir=str(tmp_path / "a"), **base))
    from_cache = distill(DistillConfig(cache=str(cache), output_dir=str(tmp_path / "b"), **base))
    from_parquet = distill(DistillConfig(data=str(tmp_path / "pairs.parquet"), image_column="picture", output_dir=str(tmp_path / "c"), **base))
    assert from_parquet["rank_checksums"] == from_folder["rank_checksums"]
    # (the cache command encoded the latents in another process state: the VAE's convolutions round differently with
    # another CPU thread count, so the cache's weights agree to float rounding, not bit for bit)
    assert from_cache["rank_checksums"][0] == pytest.approx(from_folder["rank_checksums"][0], rel=1e-6)


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
