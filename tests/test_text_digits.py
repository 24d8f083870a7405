"""The text-to-image digits benchmark: captioned RGB digits whose way back to 8x8 digits is exact, and its metric."""

import numpy as np
import pytest
import torch

from onestep_pipelines.benchmark.digits import real_halves
from onestep_pipelines.benchmark.text_digits import (
    CAPTIONS,
    TextDigitsMetric,
    eval_prompts,
    prompt_digit,
    text_halves,
    to_digits,
    upscale,
    write_captioned_folder,
)


@pytest.fixture(scope="module")
def metric():
    return TextDigitsMetric()


def test_the_way_back_to_digits_is_exact_and_the_halves_are_the_digits_halves():
    (a, la), (b, lb) = real_halves()
    (ia, ya, ca), (ib, yb, cb) = text_halves(32)
    assert ia.shape == (len(a), 3, 32, 32) and ib.shape == (len(b), 3, 32, 32) and ia.min() >= -1 and ia.max() <= 1
    assert torch.equal(ya, la) and torch.equal(yb, lb)
    assert torch.equal(to_digits(ia), a) and torch.equal(to_digits(ib), b)
    assert torch.equal(to_digits(upscale(b, 64)[:, :1]), b)  # any multiple of 8, grey or RGB
    assert [prompt_digit(c) for c in ca] == ya.tolist() and [prompt_digit(c) for c in cb] == yb.tolist()
    assert {c.split(" ")[0] for c in ca} >= {t.split(" ")[0] for t in CAPTIONS}  # every phrasing is used
    with pytest.raises(ValueError, match="multiple of 8"):
        upscale(b, 30)
    with pytest.raises(ValueError, match="multiples of 8"):
        to_digits(torch.zeros(2, 3, 30, 30))


def test_prompt_digit_reads_names_and_numerals_and_refuses_the_rest():
    assert prompt_digit("A handwritten digit SEVEN") == 7 and prompt_digit("the number 0, handwritten") == 0
    assert prompt_digit("digit 3") == 3 and prompt_digit("three") == 3
    for prompt, message in (("a cat", "names no digit"), ("a seven and a 2", r"names the digits \[2, 7\]"), ("", "names no digit")):
        with pytest.raises(ValueError, match=message):
            prompt_digit(prompt)
    prompts = eval_prompts(40)
    assert [prompt_digit(p) for p in prompts] == [i % 10 for i in range(40)] and len(set(prompts)) == 40


def test_real_images_score_the_digits_benchmarks_numbers(metric):
    (ia, ya, ca), (ib, _, cb) = text_halves(32)
    reference = metric.score_images(ib, cb)
    assert reference.fd < 1e-3 and reference.acc > 0.99  # half B against itself
    floor = metric.score_images(ia, ca)
    assert floor.fd == pytest.approx(metric.real_vs_real().fd, rel=1e-9) and floor.acc > 0.99  # the digits floor
    wrong = metric.score_images(ia, [ca[(i + 1) % len(ca)] if ya[(i + 1) % len(ca)] != ya[i] else "digit " + str((int(ya[i]) + 1) % 10)
                                     for i in range(len(ca))])
    assert wrong.acc < 0.05  # prompt accuracy reads the prompt, not the image's own label
    noise = torch.randn(ia.shape, generator=torch.Generator().manual_seed(0))  # (block means: a digit pixel sees 1/7 of it)
    assert metric.score_images(ia + noise, ca).fd > 1.5 * floor.fd and metric.score_images(ia + 2 * noise, ca).fd > 4 * floor.fd
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        metric.score_images(ia[:3], ca[:2])


def test_a_captioned_folder_is_what_the_trainer_reads(tmp_path):
    from PIL import Image

    from onestep_pipelines.training.cache import captioned_images

    n = write_captioned_folder(str(tmp_path / "a"), "A", size=16)
    names = captioned_images(str(tmp_path / "a"))
    assert n == len(names) == len(real_halves()[0][0])
    (images, labels, captions) = text_halves(16)[0]
    first = np.asarray(Image.open(tmp_path / "a" / names[0]))
    assert first.shape == (16, 16, 3) and np.array_equal(first, ((images[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    assert (tmp_path / "a" / "0000.txt").read_text().strip() == captions[0]
    assert (tmp_path / "a" / "prompts.txt").read_text().splitlines() == captions
    with pytest.raises(ValueError, match="half must be 'A'"):
        write_captioned_folder(str(tmp_path / "c"), "C")


def test_the_command_writes_a_half_and_refuses_a_bad_size(tmp_path, capsys):
    from onestep_pipelines.benchmark.text_digits import main

    main([str(tmp_path / "b"), "--half", "B", "--size", "8"])
    assert "898 captioned 8x8 digits of half B" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "bad"), "--size", "30"])
    assert stop.value.code == 2 and "size must be a multiple of 8, got 30" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
