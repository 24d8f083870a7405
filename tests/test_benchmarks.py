"""The benchmark scripts run (their numbers are measured by hand and written in README; these check the code)."""

import json
import os

import pytest
import torch

import gpu


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_tiny_models(tmp_path):
    """benchmarks/gpu.py on the CPU with tiny models: every section but the CUDA-only ones (compiled graphs, syncs)."""
    assert gpu.main(["--tiny", "--device", "cpu", "--sections", "inference,scheduler,training,memory", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-tiny.json").read_text())
    assert {r["steps"] for r in report["inference"]["rows"]} == {1, 4}
    assert len(report["scheduler"]["rows"]) == 2 and report["training"]["updates"] == 3
    rows = report["memory"]["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [("sdxl", "dmd2"), ("sdxl", "dmd2"), ("sdxl", "consistency"), ("flux", "dmd2"), ("flux", "consistency")]
    assert all("error" not in r and r["seconds per update"] > 0 for r in rows), rows


def test_gpu_benchmark_refuses_unknown_sections_and_missing_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--sections", "warp", "--out", str(tmp_path)])
    assert "unknown sections" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu.main(["--out", str(tmp_path)])
        assert "sees no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_leaderboard_trains_every_method_scores_each_nfe_and_resumes(tiny_teacher, tmp_path, monkeypatch):
    """benchmarks/leaderboard.py with a tiny teacher and a budget so small that every method gets the minimum of 50
    updates; a second call keeps what is done and trains only what is missing."""
    import leaderboard

    args = ["--minutes", "0.001", "--teacher", tiny_teacher, "--device", "cpu", "--out", str(tmp_path)]
    assert leaderboard.main(args) == 0
    results = json.loads((tmp_path / "leaderboard.json").read_text())
    assert list(results["methods"]) == list(leaderboard.RECIPES)
    for entry in results["methods"].values():
        assert entry["updates"] == 50 and set(entry["scores"]) == {"1", "2", "4", "8"}
    assert set(results["teacher"]) == {"1", "2", "4", "8", "32"}
    assert len((tmp_path / "leaderboard.md").read_text().splitlines()) == 2 + 1 + len(leaderboard.RECIPES)

    del results["methods"]["tdm"]
    (tmp_path / "leaderboard.json").write_text(json.dumps(results))
    trained = []
    original = leaderboard.train_and_score
    monkeypatch.setattr(leaderboard, "train_and_score", lambda name, *a: trained.append(name) or original(name, *a))
    assert leaderboard.main(args) == 0
    assert trained == ["tdm"]
    assert leaderboard.main(["--minutes", "2", "--teacher", tiny_teacher, "--out", str(tmp_path)]) == 2  # another budget


def test_cache_memory_benchmark_writes_readable_caches_and_reports_each_size(tmp_path, capsys, monkeypatch):
    import sys

    import cache_memory

    monkeypatch.setattr(sys, "argv", ["cache_memory.py", "--sizes", "50,5000", "--batches", "5", "--folder", str(tmp_path)])
    cache_memory.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 5")]
    assert [row.split(" | ")[0] for row in rows] == ["| 50", "| 5,000"]
    from onestep_pipelines.training.cache import PromptCache

    cache = PromptCache(str(tmp_path / "cache-5000"))
    assert len(cache.prompts) == 5000 and cache.prompts[4999] == "a photo of prompt number 4999"
    assert cache.columns["prompt_embeds"].to("cpu")[torch.tensor([0, 5000])].shape == (2, 8, 16)


@pytest.mark.slow
def test_memory_benchmark_counts_the_real_configs():
    import memory

    rows = {r["family"]: r for r in memory.estimate(rank=64)}
    assert round(rows["qwen_image"]["transformer_params"] / 1e9, 2) == 20.43 and rows["qwen_image"]["lora_params"] == 424_673_280
    assert round(rows["flux2"]["transformer_params"] / 1e9, 2) == 32.22 and round(rows["z_image"]["transformer_params"] / 1e9, 2) == 6.15
    for r in rows.values():  # sharing, caching and quantizing each lower the total
        gib = r["gib"]
        assert gib["3 bf16 copies (FSDP2: / GPUs)"] > gib["one shared bf16 base"] > gib["shared base, --cache (text encoder on the CPU)"] > gib["--cache --quantize-base int8"]


@pytest.mark.slow
def test_cache_memory_benchmark_runs_distill_from_caches_of_each_size(stock_teachers, tmp_path, capsys, monkeypatch):
    import sys

    import cache_memory

    folders, _ = stock_teachers
    monkeypatch.setattr(sys, "argv", ["cache_memory.py", "--teacher", folders["sd"], "--sizes", "50,500", "--updates", "2", "--folder", str(tmp_path)])
    cache_memory.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 5")]
    assert [row.split(" | ")[0] for row in rows] == ["| 50", "| 500"]
    assert os.path.isdir(tmp_path / "run-500" / "student")


@pytest.mark.slow
def test_activation_benchmark_measures_a_real_width_block_linear_in_tokens(capsys, monkeypatch):
    import sys

    import activation_memory

    monkeypatch.setattr(sys, "argv", ["activation_memory.py", "--families", "qwen_image", "--tokens", "16,64"])
    activation_memory.main()
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| qwen_image"))
    per_token = float(row.split(" | ")[4])
    assert 40 < per_token < 50  # the measured 44.5 bytes per token and width of README's memory numbers
