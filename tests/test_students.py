"""Students in diffusers: r-conditioning adapters, few-step pipelines, loading paths, metadata, safety."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from onestep_pipelines import (
    ConsistencyScheduler,
    DigitsPipeline,
    DigitsTransformer2DModel,
    FlowMapScheduler,
    StudentMetadata,
)
from onestep_pipelines.models import TwoTimeFluxTransformer2DModel, TwoTimeSD3Transformer2DModel, TwoTimeUNet2DConditionModel, add_r_conditioning
from onestep_pipelines.pipelines import PIPELINES_BY_ARCHITECTURE, architecture_of
from onestep_pipelines.testing import tiny_call_kwargs, tiny_pipeline

ARCHS = ["sd", "sdxl", "sd3", "flux"]
TWO_TIME = {"sd": TwoTimeUNet2DConditionModel, "sdxl": TwoTimeUNet2DConditionModel, "sd3": TwoTimeSD3Transformer2DModel, "flux": TwoTimeFluxTransformer2DModel}
GUIDANCE_ARG = {"sd": "guidance_scale", "sdxl": "guidance_scale", "sd3": "guidance_scale", "flux": "true_cfg_scale"}


def few_step_pipe(arch, seed=0, **scheduler_kwargs):
    stock = tiny_pipeline(arch, seed)
    pipe = PIPELINES_BY_ARCHITECTURE[arch](**stock.components)
    pipe.scheduler = ConsistencyScheduler.from_config(stock.scheduler.config, **{"gamma": 0.0, **scheduler_kwargs})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, arch, steps=2, drop=(), **overrides):
    kwargs = {k: v for k, v in tiny_call_kwargs(arch, steps).items() if k not in drop}
    return pipe(**{**kwargs, "output_type": "latent", **overrides}).images


def capture_call(pipe, arch):
    """The (args, kwargs) of the first denoiser call of a 1-step run."""
    seen = []
    handle = pipe.denoiser.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
    latents(pipe, arch, steps=1)
    handle.remove()
    return seen[0]


def flow_map_student(arch, seed=0):
    pipe = few_step_pipe(arch, seed)
    setattr(pipe, pipe._denoiser, add_r_conditioning(pipe.denoiser))
    # UNets here are flow-matching students (time as sigma * 1000); SD3 / Flux keep their stock shift settings
    pipe.scheduler = FlowMapScheduler() if arch in ("sd", "sdxl") else FlowMapScheduler.from_config(tiny_pipeline(arch).scheduler.config)
    metadata = StudentMetadata.from_scheduler(pipe.scheduler, method="meanflow", architecture=arch, num_inference_steps=2, recommended_steps=[1, 2], r_conditioning=True)
    pipe.set_student(metadata, set_scheduler=False)
    return pipe


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch", ARCHS)
def test_stochastic_students_draw_each_image_from_its_own_generator(arch):
    """A re-noising student (gamma 1) in every few-step pipeline: image b of ``generator=[g0, g1]`` depends on g_b
    alone, also where the stock loop does not pass the generator to ``step`` (SD3, Flux)."""
    pipe = few_step_pipe(arch, gamma=1.0)

    def images(*seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return latents(pipe, arch, steps=3, num_images_per_prompt=len(seeds), generator=gens)

    both = images(10, 11)
    torch.testing.assert_close(both[1:], images(11)[:1], rtol=1e-4, atol=1e-4)  # batch of 2 vs 1: last bits only
    torch.testing.assert_close(both, images(10, 11))
    assert not torch.allclose(both[0], both[1])
    torch.manual_seed(0)  # the global RNG is not what the noise comes from
    torch.testing.assert_close(images(10), both[:1], rtol=1e-4, atol=1e-4)
    assert pipe.scheduler.call_generator is None


# ------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("arch", ARCHS)
def test_r_adapter_starts_exactly_as_the_teacher_and_round_trips(arch, tmp_path):
    pipe = few_step_pipe(arch)
    args, kwargs = capture_call(pipe, arch)
    teacher = pipe.denoiser
    kwargs["return_dict"] = False
    with torch.no_grad():
        expected = teacher(*args, **kwargs)[0]
        adapted = add_r_conditioning(teacher)
        assert type(adapted) is TWO_TIME[arch] and architecture_of(adapted) == arch
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        for r in (None, 0.0, torch.as_tensor(timestep) * 0.5):
            assert torch.equal(adapted(*args, **kwargs, r_timestep=r)[0], expected)
        randomize(adapted.r_embedder)
        assert torch.equal(adapted(*args, **kwargs)[0], expected)  # r=None: the one-time model
        trained = adapted(*args, **kwargs, r_timestep=0.0)[0]
        assert not torch.allclose(trained, expected)
        teacher.save_pretrained(tmp_path / "teacher")  # a one-time checkpoint loads with a zero r_embedder
        from_teacher = TWO_TIME[arch].from_pretrained(tmp_path / "teacher").eval()
        torch.testing.assert_close(from_teacher(*args, **kwargs, r_timestep=0.0)[0], expected, rtol=0, atol=1e-5)
        adapted.save_pretrained(tmp_path)
        reloaded = TWO_TIME[arch].from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(*args, **kwargs, r_timestep=0.0)[0], trained, rtol=0, atol=1e-5)  # weights from disk: ulp-level kernel differences
    assert teacher is pipe.denoiser and not hasattr(teacher, "r_embedder")  # the teacher is not mutated


def test_add_r_conditioning_keeps_two_time_models_and_refuses_others():
    digits = DigitsTransformer2DModel(hidden_size=32, depth=1, num_heads=2)
    assert add_r_conditioning(digits) is digits
    with pytest.raises(TypeError, match="add_r_conditioning supports"):
        add_r_conditioning(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ pipelines
@pytest.mark.parametrize("arch", ARCHS)
def test_few_step_pipeline_is_the_stock_pipeline_with_our_scheduler(arch):
    stock = tiny_pipeline(arch)
    stock.scheduler = ConsistencyScheduler.from_config(stock.scheduler.config, gamma=0.0)
    stock.set_progress_bar_config(disable=True)
    assert torch.equal(latents(few_step_pipe(arch), arch), latents(stock, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_flow_map_pipeline_passes_r_with_every_call_and_no_extra_forward(arch):
    pipe = flow_map_student(arch)
    randomize(pipe.denoiser.r_embedder)
    intervals, calls = [], []
    pipe.denoiser.r_embedder.register_forward_hook(lambda m, a, o: intervals.append(a[0][0].item()))
    pipe.denoiser.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = latents(pipe, arch, drop=("num_inference_steps", "guidance_scale"))
    s = pipe.scheduler
    assert len(calls) == 2 == len(s.timesteps)
    np.testing.assert_allclose(intervals, (s.timesteps - s.r_timesteps).tolist(), rtol=1e-5)
    assert torch.isfinite(out).all()
    with torch.no_grad():  # silence the r embedding: the samples change, so r did reach the model
        pipe.denoiser.r_embedder.embedding.linear_2.weight.zero_()
    assert not torch.allclose(latents(pipe, arch, drop=("num_inference_steps", "guidance_scale")), out)


def test_r_student_without_r_model_is_an_error():
    pipe = flow_map_student("sd3")
    pipe.transformer = tiny_pipeline("sd3").transformer
    with pytest.raises(ValueError, match="takes a second time r"):
        latents(pipe, "sd3")


@pytest.mark.parametrize("arch", ARCHS)
def test_student_metadata_sets_steps_and_guidance(arch):
    pipe = few_step_pipe(arch)
    batches = []
    pipe.denoiser.register_forward_pre_hook(lambda m, a, k: batches.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True)
    base = dict(method="dmd2", architecture=arch, num_inference_steps=3, recommended_steps=[1, 3])
    pipe.set_student(StudentMetadata.from_scheduler(pipe.scheduler, guidance_baked=True, guidance_scale=4.5, **base), set_scheduler=False)
    latents(pipe, arch, drop=("num_inference_steps", "guidance_scale"))
    assert batches == [1, 1, 1]  # 3 steps, no CFG
    batches.clear()
    pipe.set_student(StudentMetadata.from_scheduler(pipe.scheduler, guidance_scale=3.0, **base), set_scheduler=False)
    latents(pipe, arch, drop=("num_inference_steps", "guidance_scale"))
    assert batches == ([1, 1] * 3 if arch == "flux" else [2, 2, 2])  # CFG (Flux: true CFG, two calls per step)
    batches.clear()
    latents(pipe, arch, steps=1, drop=("guidance_scale",), **{GUIDANCE_ARG[arch]: 1.0})  # the caller wins
    assert batches == [1]


# ------------------------------------------------------------------------------------------ loading paths
def _save_student(arch, folder):
    pipe = flow_map_student(arch) if arch in ("sd3", "flux") else few_step_pipe(arch, gamma=1.0)
    if arch in ("sd", "sdxl"):
        pipe.set_student(StudentMetadata.from_scheduler(pipe.scheduler, method="dmd2", architecture=arch, num_inference_steps=2), set_scheduler=False)
    else:
        randomize(pipe.denoiser.r_embedder)
    pipe.save_pretrained(folder)
    return pipe


def _same_pipeline(a, b, arch):
    assert type(a) is type(b) and type(a.denoiser) is type(b.denoiser)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert a.student == b.student and public(a.scheduler.config) == public(b.scheduler.config)
    run = lambda pipe: latents(pipe, arch, drop=("num_inference_steps", "guidance_scale"))  # noqa: E731
    torch.testing.assert_close(run(a), run(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_student_loads_through_diffusion_pipeline_and_its_class_and_resaves(arch, tmp_path):
    pipe = _save_student(arch, tmp_path / "a")
    index = json.loads((tmp_path / "a" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", type(pipe).__name__] and index["student"] == pipe.student.to_dict()
    assert "import" in (tmp_path / "a" / "pipeline.py").read_text()
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "a")
    _same_pipeline(pipe, loaded, arch)
    loaded.save_pretrained(tmp_path / "b")
    _same_pipeline(pipe, type(pipe).from_pretrained(tmp_path / "b"), arch)
    _same_pipeline(pipe, DiffusionPipeline.from_pretrained(tmp_path / "b"), arch)


@pytest.mark.slow
def test_trust_remote_code_loads_students_in_a_fresh_interpreter(tmp_path):
    folders = {}
    for arch in ARCHS + ["digits"]:
        folders[arch] = str(tmp_path / arch)
        if arch == "digits":
            pipe = DigitsPipeline(DigitsTransformer2DModel(hidden_size=32, depth=1, num_heads=2), FlowMapScheduler())
            pipe.set_student(StudentMetadata.from_scheduler(pipe.scheduler, method="meanflow", architecture="digits", r_conditioning=True), set_scheduler=False)
            pipe.save_pretrained(folders[arch])
        else:
            _save_student(arch, folders[arch])
    code = (
        "import json, sys\nfrom diffusers import DiffusionPipeline\n"
        "assert 'onestep_pipelines' not in sys.modules\nout = {}\n"
        f"folders = {folders!r}\n"
        "for arch, folder in folders.items():\n"
        "    try:\n        DiffusionPipeline.from_pretrained(folder)\n        out[arch + '-untrusted'] = 'loaded'\n"
        "    except ValueError as e:\n        out[arch + '-untrusted'] = 'trust_remote_code' in str(e)\n"
        "for arch, folder in folders.items():\n"
        "    p = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)\n"
        "    out[arch] = [type(p).__name__, type(p.scheduler).__name__, p.student.method]\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for arch in ARCHS + ["digits"]:
        assert out[arch + "-untrusted"] is True  # without the package or trust_remote_code: diffusers' own error
        expected_class = "DigitsPipeline" if arch == "digits" else PIPELINES_BY_ARCHITECTURE[arch].__name__
        assert out[arch][0] == expected_class and out[arch][1] in ("ConsistencyScheduler", "FlowMapScheduler")
        assert out[arch][2] == ("dmd2" if arch in ("sd", "sdxl") else "meanflow")


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    pipe = few_step_pipe("sd")
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(OSError, match="allow_pickle=True"):
        type(pipe).from_pretrained(tmp_path)
    with pytest.raises(OSError, match="allow_pickle=True"):
        DiffusionPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        type(pipe).from_pretrained(tmp_path, use_safetensors=False)
    loaded = type(pipe).from_pretrained(tmp_path, allow_pickle=True)
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


# ------------------------------------------------------------------------------------------ metadata
def test_metadata_round_trips_and_rejects_bad_input():
    scheduler = FlowMapScheduler(shift=3.0)
    m = StudentMetadata.from_scheduler(scheduler, method="flowmap", architecture="sd3", num_inference_steps=2, recommended_steps=[1, 2, 4],
                                       r_conditioning=True, base_model="org/teacher")
    assert StudentMetadata.from_json(m.to_json()) == m
    assert m.timesteps == [1000.0, 750.0] and m.time_type == "flow"
    assert type(m.make_scheduler()) is FlowMapScheduler and m.make_scheduler().config.shift == 3.0
    good = m.to_dict()
    for change, message in [
        ({"architecture": "sd2"}, "architecture"),
        ({"scheduler_class": "EulerDiscreteScheduler"}, "scheduler_class"),
        ({"num_inference_steps": 0}, "positive integers"),
        ({"recommended_steps": [1, -2]}, "positive integers"),
        ({"scheduler_class": "ConsistencyScheduler"}, "FlowMapScheduler"),
        ({"colour": "red"}, "unknown fields"),
        ({"format_version": 99}, "newer"),
        ({"scheduler_config": {"gamma": 7.0}}, "gamma"),
    ]:
        with pytest.raises(ValueError, match=message):
            StudentMetadata.from_dict({**good, **change})
    with pytest.raises(ValueError, match="lacks the fields"):
        StudentMetadata.from_dict({"method": "dmd2"})
    with pytest.raises(ValueError, match="not valid JSON"):
        StudentMetadata.from_json("{")


def test_the_from_pretrained_hook_hides_no_error(tmp_path, monkeypatch):
    """``import onestep_pipelines`` teaches ``DiffusionPipeline.from_pretrained`` our pipeline classes; an error
    other than "no model_index.json / not a pipeline" while it reads the config reaches the caller, and a folder that is
    not ours is diffusers' own call, with diffusers' own error."""
    with pytest.raises(OSError):
        DiffusionPipeline.from_pretrained(str(tmp_path))  # diffusers' error for an empty folder

    def broken(*args, **kwargs):
        raise RuntimeError("bug while reading the config")

    monkeypatch.setattr(DiffusionPipeline, "load_config", broken)
    with pytest.raises(RuntimeError, match="bug while reading"):
        DiffusionPipeline.from_pretrained(str(tmp_path))
