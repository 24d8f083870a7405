"""The shipped text-to-image digits teachers: real diffusers pipeline classes, learned on half A, good on the
benchmark; LoRA students of them in diffusers' own loader; what guidance means for each kind of student."""

import copy
import logging
import os

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from peft import LoraConfig

from onestep_pipelines import StudentMetadata, load_student_lora, save_student_lora
from onestep_pipelines.metadata import read_student_metadata
from onestep_pipelines.benchmark import TEXT_STUDENT_LORAS, TEXT_TEACHERS, teacher_folder
from onestep_pipelines.benchmark.text_digits import CAPTIONS, TEACHER_SETTINGS, TextDigitsMetric, caption, score_text_digits
from onestep_pipelines.pipelines import student_pipeline
from onestep_pipelines.schedulers import ConsistencyScheduler

CLASSES = {"text-digits-sd": StableDiffusionPipeline, "text-digits-sd3": StableDiffusion3Pipeline}


@pytest.fixture(scope="module", params=sorted(TEXT_TEACHERS))
def teacher(request):
    pipe = DiffusionPipeline.from_pretrained(teacher_folder(request.param))
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def test_the_teachers_are_the_real_diffusers_classes_and_small(teacher):
    name, pipe = teacher
    assert type(pipe) is CLASSES[name]
    assert pipe.vae.config.scaling_factor != 1.0 and pipe.vae_scale_factor == 4  # 32 px images, 8x8x4 latents
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(teacher_folder(name)) for f in files)
    assert size < 25e6, f"{name} is {size / 1e6:.1f} MB"
    for d, _, files in os.walk(teacher_folder(name)):  # installed for every user: readable by all
        assert all(os.stat(os.path.join(d, f)).st_mode & 0o044 == 0o044 for f in files)


def test_the_frozen_text_encoders_tell_every_caption_apart(teacher):
    _, pipe = teacher
    prompts = [caption(digit, phrasing) for digit in range(10) for phrasing in range(len(CAPTIONS))] + [""]
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompts, prompts, prompts, device="cpu", do_classifier_free_guidance=False)[0] \
            if isinstance(pipe, StableDiffusion3Pipeline) else pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    flat = embeds.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert distances.min() > 1e-2 * flat.norm(dim=1).mean()


_BEST = {}


def _best_row(name: str, pipe) -> dict:
    """The teacher's score on 200 of the 898 benchmark samples at its best guidance and at most 16 steps (README: every
    setting on all 898; the SD3 teacher's best is at 32 steps, 4 % lower FD than at 16, for twice this test's time)."""
    if name not in _BEST:
        steps, guidance = TEACHER_SETTINGS[name]
        steps = min(steps, 16)
        (_BEST[name],), _ = score_text_digits(pipe, [steps], TextDigitsMetric(), num_samples=200, guidance_scale=guidance)
    return _BEST[name]


def test_the_teacher_draws_the_digit_its_prompt_names(teacher):
    row = _best_row(*teacher)
    assert row["accuracy"] >= 0.9, row


# ---------------------------------------------------------------------------------------- LoRA students, guidance
def _lora_student(pipe, guidance_scale: float, guidance_baked: bool, tmp_path):
    """A random LoRA on the teacher's denoiser saved as a 2-step student with this guidance, and its files."""
    model = copy.deepcopy(pipe.unet if hasattr(pipe, "unet") else pipe.transformer)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config, gamma=1.0)
    arch = "sd" if hasattr(pipe, "unet") else "sd3"
    metadata = StudentMetadata.from_scheduler(scheduler, method="dmd2", architecture=arch, num_inference_steps=2, guidance_scale=guidance_scale,
                                              guidance_baked=guidance_baked, base_model="text-digits-sd")
    return save_student_lora(str(tmp_path / "lora"), model, metadata), metadata


def _image(pipe, **kwargs):
    return pipe(prompt=["a handwritten digit seven", "digit 2"], height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="pt",
                **kwargs).images


def test_a_lora_student_loads_with_diffusers_load_lora_weights_on_the_teacher(teacher, tmp_path):
    """The student's LoRA file in diffusers' own ``load_lora_weights`` on the stock teacher class, with the student's
    scheduler, samples what ``load_student_lora`` on the few-step pipeline samples (1 step: the stock SD3 loop does not
    hand its generator to the scheduler, so a re-noising step would draw other noise there)."""
    _, pipe = teacher
    _, metadata = _lora_student(pipe, 1.0, False, tmp_path)
    ours = student_pipeline(copy.deepcopy(pipe))
    load_student_lora(ours, str(tmp_path / "lora"))
    stock = copy.deepcopy(pipe)
    stock.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader, on the stock teacher class
    stock.scheduler = metadata.make_scheduler()
    image = _image(stock, num_inference_steps=1, guidance_scale=1.0)
    torch.testing.assert_close(image, _image(ours, num_inference_steps=1), rtol=0, atol=1e-4)
    plain = copy.deepcopy(pipe)
    plain.scheduler = metadata.make_scheduler()
    assert (image - _image(plain, num_inference_steps=1, guidance_scale=1.0)).abs().max() > 1e-3  # the LoRA acts


@pytest.fixture(scope="module")
def sd_teacher():
    pipe = DiffusionPipeline.from_pretrained(teacher_folder("text-digits-sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_shipped_lora_student_meets_the_goal_through_diffusers_own_loader(sd_teacher):
    """The shipped, trained LoRA student (4-step consistency, guidance 2 baked in) in diffusers' stock
    ``load_lora_weights`` on the stock teacher, with the scheduler its metadata records, at guidance 1: FD within 1.5x
    and prompt accuracy within 0.95x of the teacher's best (200 samples; README's row is all 898)."""
    path = TEXT_STUDENT_LORAS["text-digits-sd-lcm-lora"]
    metadata, _ = read_student_metadata(path)
    stock = copy.deepcopy(sd_teacher)
    stock.load_lora_weights(os.path.dirname(path))
    stock.scheduler = metadata.make_scheduler()
    (row,), _ = score_text_digits(stock, [metadata.num_inference_steps], TextDigitsMetric(), num_samples=200, guidance_scale=1.0)
    best = _best_row("text-digits-sd", sd_teacher)
    assert metadata.num_inference_steps == 4 and metadata.guidance_baked and metadata.base_model == "text-digits-sd"
    assert row["FD-digits"] <= 1.5 * best["FD-digits"] and row["accuracy"] >= 0.95 * best["accuracy"], (row, best)


def test_guidance_baked_students_sample_without_cfg_unless_asked(sd_teacher, tmp_path, caplog):
    """Distilled guidance (``--guidance-scale 3``): the call's default is no CFG (one forward per step), a negative
    prompt does nothing at that default, and ``guidance_scale=2`` applies CFG on top of the baked guidance, with a
    warning."""
    _lora_student(sd_teacher, 3.0, True, tmp_path)
    pipe = student_pipeline(copy.deepcopy(sd_teacher))
    load_student_lora(pipe, str(tmp_path / "lora"))
    default = _image(pipe)
    torch.testing.assert_close(default, _image(pipe, guidance_scale=1.0), rtol=0, atol=0)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(default, _image(pipe, negative_prompt=["digit 7", "digit 7"]), rtol=0, atol=0)
    assert "negative_prompt has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        on_top = _image(pipe, guidance_scale=2.0, negative_prompt=["digit 7", "digit 7"])
    assert "applies classifier-free guidance on top" in caplog.text and "negative_prompt" not in caplog.text
    assert (on_top - default).abs().max() > 1e-3


def test_cfg_kept_students_apply_their_recorded_guidance_and_the_negative_prompt(sd_teacher, tmp_path, caplog):
    """CFG kept (a student trained unguided, sampled with CFG, as LCM-LoRA at guidance 1-2): the recorded guidance
    (here 2) is the call's default, against the empty negative prompt, and a negative prompt changes the image."""
    _lora_student(sd_teacher, 2.0, False, tmp_path)
    pipe = student_pipeline(copy.deepcopy(sd_teacher))
    load_student_lora(pipe, str(tmp_path / "lora"))
    with caplog.at_level(logging.WARNING):
        default = _image(pipe)
    assert not caplog.text
    torch.testing.assert_close(default, _image(pipe, guidance_scale=2.0, negative_prompt=["", ""]), rtol=0, atol=0)
    assert (default - _image(pipe, guidance_scale=1.0)).abs().max() > 1e-3
    assert (default - _image(pipe, negative_prompt=["digit 7", "digit 7"])).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- training on a learned teacher
@pytest.mark.slow
def test_a_few_dmd2_updates_on_the_learned_sd_teacher_beat_the_one_step_start(tmp_path):
    """A 1-step DMD2 LoRA student of text-digits-sd, 60 updates of 16 (about 2 minutes on 2 cores) scores better than
    its start (the teacher in one step: the LoRA starts at zero); ``onestep-train evaluate`` gives the run's numbers."""
    from onestep_pipelines.training.config import DistillConfig
    from onestep_pipelines.training.evaluate import evaluate_student
    from onestep_pipelines.training.trainer import distill

    result = distill(DistillConfig(method="dmd2", teacher="text-digits-sd", prompts=_prompts(tmp_path), lora_rank=8,
                                   guidance_scale=2.0, learning_rate=1e-3, fake_learning_rate=2e-4, max_train_steps=60, batch_size=16,
                                   output_dir=str(tmp_path / "run"), preview_every=0, checkpoint_every=1000, cpu_threads=2))
    student = result["scores"][-1]
    start, _ = score_text_digits(_start(), [1], TextDigitsMetric(), guidance_scale=1.0)
    assert student["FD-digits"] < start[0]["FD-digits"] and student["accuracy"] > start[0]["accuracy"], (student, start)
    assert evaluate_student(str(tmp_path / "run" / "lora"))[0]["FD-digits"] == pytest.approx(student["FD-digits"], rel=1e-3)


@pytest.mark.slow
def test_the_consistency_loss_falls_on_the_learned_sd_teacher(tmp_path):
    """A 4-step consistency LoRA student (LCM-LoRA style) of text-digits-sd on captioned half A: the loss recorded in
    summary.json's curve falls over 60 updates."""
    from onestep_pipelines.training.config import DistillConfig
    from onestep_pipelines.training.trainer import distill

    _prompts(tmp_path)
    result = distill(DistillConfig(method="consistency", teacher="text-digits-sd", data=str(tmp_path / "data"), num_steps=4, lora_rank=8,
                                   guidance_scale=2.0, learning_rate=1e-3, max_train_steps=60, batch_size=16, evaluate=False,
                                   output_dir=str(tmp_path / "run"), preview_every=0, checkpoint_every=1000, cpu_threads=2))
    losses = [entry["consistency"] for entry in result["parts"][-1]["losses"]]
    assert sum(losses[-2:]) < sum(losses[:2]), losses


@pytest.mark.slow
def test_a_few_meanflow_updates_on_the_learned_sd3_teacher_beat_the_one_step_start(tmp_path):
    """The flow teacher: a MeanFlow student of text-digits-sd3 (guidance 1.5 baked in), 60 updates of 16 on captioned
    half A, loaded back with ``DiffusionPipeline.from_pretrained``, samples better in one step than its start (the
    teacher's one Euler step: the student starts as the teacher, ``u(z, r, t) = v(z, t)``); 300 samples each."""
    import onestep_pipelines  # noqa: F401  (DiffusionPipeline finds the student's classes)
    from onestep_pipelines.schedulers import FlowMapScheduler
    from onestep_pipelines.training.config import DistillConfig
    from onestep_pipelines.training.trainer import distill

    _prompts(tmp_path)
    distill(DistillConfig(method="meanflow", teacher="text-digits-sd3", data=str(tmp_path / "data"), guidance_scale=1.5, learning_rate=2e-4,
                          target_ema=0.99, endpoint_fraction=0.5, max_train_steps=60, batch_size=16, evaluate=False,
                          output_dir=str(tmp_path / "run"), preview_every=0, checkpoint_every=1000, cpu_threads=2))
    student = DiffusionPipeline.from_pretrained(str(tmp_path / "run" / "student"))
    teacher = DiffusionPipeline.from_pretrained(teacher_folder("text-digits-sd3"))
    start = student_pipeline(teacher, scheduler=FlowMapScheduler.from_config(teacher.scheduler.config))
    (after,), _ = score_text_digits(student, [1], TextDigitsMetric(), num_samples=300)
    (before,), _ = score_text_digits(start, [1], TextDigitsMetric(), num_samples=300, guidance_scale=1.0)
    assert type(student.scheduler).__name__ == "FlowMapScheduler" and student.student.guidance_baked
    assert after["FD-digits"] < before["FD-digits"], (after, before)


def _prompts(tmp_path) -> str:
    from onestep_pipelines.benchmark.text_digits import write_captioned_folder

    if not (tmp_path / "data").is_dir():
        write_captioned_folder(str(tmp_path / "data"))
    return str(tmp_path / "data" / "prompts.txt")


def _start():
    """The 1-step start of a DMD2 student of text-digits-sd: the teacher with the student's scheduler."""
    pipe = DiffusionPipeline.from_pretrained(teacher_folder("text-digits-sd"))
    pipe.set_progress_bar_config(disable=True)
    return student_pipeline(pipe, scheduler=ConsistencyScheduler.from_config(pipe.scheduler.config, timestep_preset="trailing", gamma=1.0))


def test_the_training_command_writes_loadable_teachers(tmp_path):
    """``train_text_digits vae / sd / sd3`` (two updates each, and a second stage with --init) write pipelines of the
    shipped classes that sample at 32 px."""
    from onestep_pipelines.benchmark.train_text_digits import main

    threads = torch.get_num_threads()  # (main sets the process's thread count)
    try:
        _train_all(main, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _train_all(main, tmp_path):
    main(["vae", "--out", str(tmp_path / "vae"), "--steps", "2", "--threads", "1"])
    for what in ("sd", "sd3"):
        main([what, "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / what), "--steps", "2", "--threads", "1"])
        main([what, "--vae", str(tmp_path / "vae"), "--init", str(tmp_path / what), "--out", str(tmp_path / f"{what}-2"), "--steps", "1", "--threads", "1"])
        pipe = DiffusionPipeline.from_pretrained(str(tmp_path / f"{what}-2"))
        assert type(pipe) is CLASSES[f"text-digits-{what}"]
        assert pipe("digit 7", num_inference_steps=1, output_type="pt").images.shape == (1, 3, 32, 32)
    with pytest.raises(SystemExit):
        main(["sd", "--out", str(tmp_path / "x")])  # no --vae
