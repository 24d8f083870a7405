"""Device-agnostic paths, on every device present: the CPU always, CUDA and MPS when there (CI has the CPU only; a
GPU session runs the same tests there). Schedulers step on device tensors, the pipelines and the FD-digits metric run
where the model lives, LoRA files are written from and loaded onto a device model, and checkpoints resume on another
device."""

import pytest
import torch

from onestep_pipelines import ConsistencyScheduler, DigitsPipeline, FlowMapScheduler, TDMScheduler
from onestep_pipelines.benchmark.digits import DigitsMetric
from onestep_pipelines.benchmark.evaluate import score_digits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
SCHEDULERS = {
    "lcm": lambda: ConsistencyScheduler(timestep_preset="lcm", lcm_boundary_condition=True),
    "tcd": lambda: ConsistencyScheduler(gamma=0.3, timestep_preset="tcd", set_alpha_to_one=False, clip_sample=True),
    "flow euler": lambda: ConsistencyScheduler(time_type="flow", gamma=0.0, shift=3.0),
    "trigflow": lambda: ConsistencyScheduler(time_type="trigflow"),
    "flow map": lambda: FlowMapScheduler(gamma=0.5),
    "tdm": lambda: TDMScheduler(),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scheduler_steps_on_device_tensors(device, name, dtype):
    scheduler = SCHEDULERS[name]()
    scheduler.set_timesteps(4, device=device)
    assert scheduler.timesteps.device.type == device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(device, dtype)
    for t in scheduler.timesteps:
        out = scheduler.step(torch.randn(2, 4, 8, 8, generator=g).to(device, dtype), t, x, generator=torch.Generator().manual_seed(1))
        x = out.prev_sample
        assert x.device.type == device and x.dtype == dtype and out.denoised.device.type == device
    assert torch.isfinite(x.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_steps_stay_close_to_float32(device):
    results = {}
    for dtype in (torch.float32, torch.float16):
        scheduler = ConsistencyScheduler(time_type="flow", gamma=0.0, shift=3.0)
        scheduler.set_timesteps(4, device=device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 16, 16, generator=g)
        outs = [torch.randn(1, 4, 16, 16, generator=g) for _ in range(4)]
        y = x.to(device, dtype)
        for t, out in zip(scheduler.timesteps, outs):
            y = scheduler.step(out.to(device, dtype), t, y).prev_sample
        results[dtype] = y.float().cpu()
    torch.testing.assert_close(results[torch.float16], results[torch.float32], rtol=2e-3, atol=5e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_digits_pipeline_and_metric_on_the_device(device):
    from onestep_pipelines.models import DigitsTransformer2DModel

    torch.manual_seed(0)
    pipe = DigitsPipeline(DigitsTransformer2DModel(patch_size=2, hidden_size=32, depth=1, num_heads=2), FlowMapScheduler()).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 2], output_type="pt").images
    assert images.device.type == device
    rows, grid = score_digits(pipe, [1], DigitsMetric(device=device))
    assert rows[0]["NFE"] == 1 and rows[0]["FD-digits"] > 0 and grid.shape[1:] == (1, 8, 8)
    cpu_metric = DigitsMetric()
    assert cpu_metric.fd(grid.to(device)) == pytest.approx(cpu_metric.fd(grid.cpu()))  # images from any device


@pytest.mark.parametrize("device", DEVICES)
def test_lora_student_written_from_and_loaded_onto_a_device_model(device, tmp_path):
    from onestep_pipelines import StudentMetadata, load_student_lora, save_student_lora
    from onestep_pipelines.testing import tiny_pipeline
    from onestep_pipelines.pipelines import FewStepStableDiffusionPipeline
    from peft import LoraConfig

    pipe = FewStepStableDiffusionPipeline(**tiny_pipeline("sd").components).to(device)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    metadata = StudentMetadata.from_scheduler(ConsistencyScheduler.from_config(pipe.scheduler.config), method="dmd2", architecture="sd")
    save_student_lora(tmp_path, pipe, metadata)
    fresh = FewStepStableDiffusionPipeline(**tiny_pipeline("sd").components).to(device)
    load_student_lora(fresh, str(tmp_path))
    loaded = {n: p for n, p in fresh.unet.named_parameters() if "lora_" in n}
    assert loaded and all(p.device.type == device for p in loaded.values())
    for name, p in pipe.unet.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(loaded[name.replace(".default.", f".{metadata.method}.")].cpu(), p.detach().cpu())


@pytest.mark.parametrize("first,second", [(a, b) for a in DEVICES for b in DEVICES])
def test_a_checkpoint_resumes_on_another_device(tiny_teacher, tmp_path, first, second):
    """A run checkpointed on one device continues on another: the checkpoint holds CPU tensors by name."""
    from test_training import tiny

    from onestep_pipelines.training.trainer import distill

    on = lambda device: {"device": "cpu"} if device == "cpu" else {}  # noqa: E731  (auto picks the accelerator)
    distill(tiny(tiny_teacher, tmp_path / "run", max_train_steps=2, **on(first)))
    result = distill(tiny(tiny_teacher, tmp_path / "run", max_train_steps=4, resume="latest", **on(second)))
    assert result["steps"] == 4 and [p["device"] for p in result["parts"]] == [first, second]
