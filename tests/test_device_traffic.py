"""No host-device traffic inside a generation, checked on the CPU-only CI with the "meta" device standing in for an
accelerator: a meta tensor has no data, so any host read of a device value fails or is seen by the dispatch mode
below, and every copy between the host and the device is recorded. After the first generation (which copies each
schedule's tables once), a second generation with the same schedule copies nothing and reads nothing, in the
schedulers and in the few-step pipelines' denoising loops; the NaN / inf check is read after the call."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from onestep_pipelines import ConsistencyScheduler, DigitsPipeline, FlowMapScheduler, TDMScheduler
from onestep_pipelines.models import DigitsTransformer2DModel
from onestep_pipelines.pipelines import PIPELINES_BY_ARCHITECTURE
from onestep_pipelines.testing import tiny_pipeline

aten = torch.ops.aten
SHAPE = (2, 4, 8, 8)


class DeviceTraffic(TorchDispatchMode):
    """Records host reads of tensor values and copies between devices."""

    READS = (aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default)

    def __init__(self):
        super().__init__()
        self.events = []
        self.active = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            if func in self.READS:
                self.events.append(("read", str(func)))
            elif func is aten._to_copy.default and kwargs.get("device") is not None and torch.device(kwargs["device"]) != args[0].device:
                self.events.append(("copy", str(args[0].device), str(kwargs["device"]), tuple(args[0].shape)))
            elif func is aten.copy_.default and args[0].device != args[1].device:
                self.events.append(("copy", str(args[1].device), str(args[0].device), tuple(args[1].shape)))
        return func(*args, **kwargs)


SCHEDULERS = {
    "lcm": lambda: ConsistencyScheduler(timestep_preset="lcm", lcm_boundary_condition=True),
    "tcd gamma 0.3": lambda: ConsistencyScheduler(gamma=0.3, timestep_preset="tcd", set_alpha_to_one=False),
    "euler (flow)": lambda: ConsistencyScheduler(time_type="flow", gamma=0.0, shift=3.0),
    "trigflow": lambda: ConsistencyScheduler(time_type="trigflow"),
    "flow map": lambda: FlowMapScheduler(shift=3.0),
    "flow map gamma 0.5": lambda: FlowMapScheduler(gamma=0.5),
    "tdm": lambda: TDMScheduler(),
}


def generation(scheduler, steps=4):
    scheduler.set_timesteps(steps, device="meta")
    x = torch.randn(SHAPE, device="meta")
    for t in scheduler.timesteps:
        x = scheduler.step(torch.randn(SHAPE, device="meta"), t, x).prev_sample
    return x


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_repeated_generation_copies_and_reads_nothing(name):
    scheduler = SCHEDULERS[name]()
    scheduler.defer_finite_check = True
    with DeviceTraffic() as first:
        generation(scheduler)
    assert all(kind == "copy" and src == "cpu" for kind, src, *_ in first.events) and len(first.events) <= 4, first.events
    with DeviceTraffic() as second:
        generation(scheduler)
        scheduler.raise_if_nonfinite()
    assert second.events == []


def test_a_per_call_eta_copies_its_constants_once():
    scheduler = ConsistencyScheduler(gamma_from_eta=True, timestep_preset="tcd", set_alpha_to_one=False)
    scheduler.defer_finite_check = True
    for _ in range(2):
        scheduler.set_timesteps(4, device="meta")
        with DeviceTraffic() as traffic:
            x = torch.randn(SHAPE, device="meta")
            for t in scheduler.timesteps:
                x = scheduler.step(torch.randn(SHAPE, device="meta"), t, x, eta=0.3).prev_sample
    assert traffic.events == []  # the second call: nothing


def _meta_pipeline(arch):
    if arch == "digits":
        model = DigitsTransformer2DModel(patch_size=2, hidden_size=32, depth=1, num_heads=2)
        pipe = DigitsPipeline(model, FlowMapScheduler())
        call = {"class_labels": [1, 2]}
    else:
        stock = tiny_pipeline(arch)
        pipe = PIPELINES_BY_ARCHITECTURE[arch](**stock.components)
        pipe.scheduler = ConsistencyScheduler.from_config(stock.scheduler.config)
        call = {"prompt": "a cat", "height": 32, "width": 32, "guidance_scale": 1.0}
        if arch in ("sd3", "flux"):
            call["max_sequence_length"] = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("meta"), call


@pytest.mark.parametrize("arch", ["sd", "sdxl", "sd3", "flux", "digits"])
def test_the_denoising_loop_of_a_few_step_pipeline_talks_to_the_host_never(arch):
    pipe, call = _meta_pipeline(arch)
    traffic = DeviceTraffic()
    denoiser = pipe.denoiser
    denoiser.register_forward_pre_hook(lambda module, args: setattr(traffic, "active", True))
    for _ in range(2):  # the second call: every table is on the device already
        traffic.events, traffic.active = [], False  # counting starts at the first forward of the denoiser
        with traffic:
            out = pipe(num_inference_steps=2, output_type="latent", **call).images
        assert out.device.type == "meta"
    assert traffic.events == [], traffic.events
