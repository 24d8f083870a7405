"""Compile-friendliness: scheduler steps and the core step functions trace into one graph (no graph break, hence no
host-device synchronisation or Python branching on tensor values inside the loop), and the few-step pipelines run
with a compiled denoiser and in bfloat16."""

import pytest
import torch
from test_students import few_step_pipe, flow_map_student, latents, randomize

from onestep_pipelines.sampling import (
    consistency_step,
    flow_coefficients,
    flow_map_step,
    forward_noise,
    forward_noise_coefficients,
    to_x0_eps,
    trigflow_coefficients,
)
from onestep_pipelines.schedulers import ConsistencyScheduler, FlowMapScheduler, TDMScheduler

SHAPE = (2, 4, 8, 8)
SCHEDULERS = {
    "lcm (vp, gamma 1)": lambda: ConsistencyScheduler(gamma=1.0, timestep_preset="lcm"),
    "tcd (vp v-prediction, gamma 0.3)": lambda: ConsistencyScheduler(gamma=0.3, prediction_type="v_prediction", set_alpha_to_one=False),
    "euler (flow, gamma 0)": lambda: ConsistencyScheduler(time_type="flow", gamma=0.0, shift=3.0),
    "lcm boundary condition": lambda: ConsistencyScheduler(gamma=1.0, lcm_boundary_condition=True),
    "scm (trigflow)": lambda: ConsistencyScheduler(time_type="trigflow"),
    "flow map": lambda: FlowMapScheduler(shift=3.0),
    "flow map (gamma 0.5)": lambda: FlowMapScheduler(gamma=0.5),
    "tdm (flow)": lambda: TDMScheduler(time_type="flow"),
}


def _run(scheduler, step, seed=0):
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(0)  # the one timestep lookup of a generation, done before the loop
    g = torch.Generator().manual_seed(seed)
    x, outs = torch.randn(SHAPE, generator=g), [torch.randn(SHAPE, generator=g) for _ in range(4)]
    torch.manual_seed(seed + 1)  # re-noising noise (generator=None: the global generator)
    for out, t in zip(outs, scheduler.timesteps):
        x = step(out, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_step_compiles_into_one_graph(name):
    torch._dynamo.reset()
    reference = SCHEDULERS[name]()
    expected = _run(reference, reference.step)
    compiled_scheduler = SCHEDULERS[name]()
    compiled = torch.compile(compiled_scheduler.step, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    torch.testing.assert_close(_run(compiled_scheduler, compiled), expected)


@pytest.mark.parametrize("prediction_type,time_type", [("epsilon", "vp"), ("v_prediction", "vp"), ("sample", "vp"), ("flow", "flow"), ("trigflow", "trigflow")])
def test_core_step_functions_compile_into_one_graph(prediction_type, time_type):
    torch._dynamo.reset()

    def step(x, out, t, t_next, noise):
        if time_type == "trigflow":
            (alpha, sigma), (alpha_n, sigma_n) = trigflow_coefficients(t, 0.5), trigflow_coefficients(t_next, 0.5)
        else:
            (alpha, sigma), (alpha_n, sigma_n) = flow_coefficients(t), flow_coefficients(t_next)
        x0, eps = to_x0_eps(out, x, alpha, sigma, prediction_type, 0.5)
        scale, std = forward_noise_coefficients(alpha_n * 0.9, sigma_n * 0.5, alpha_n, sigma_n)
        y = consistency_step(x0, eps, alpha_n, sigma_n, scale, std, noise)
        return forward_noise(flow_map_step(y, out, t, t_next), scale, std, noise)

    args = (torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor(0.8), torch.tensor(0.4), torch.randn(SHAPE))
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="eager")(*args), step(*args))


@pytest.mark.parametrize("arch", ["sd", "flux"])
def test_pipelines_run_with_a_compiled_denoiser_and_r_adds_no_forward(arch):
    torch._dynamo.reset()
    pipe = flow_map_student(arch)  # r passed to the model at every step
    randomize(pipe.denoiser.r_embedder, seed=1)
    expected = latents(pipe, arch)
    calls = []
    name = pipe._denoiser
    original = getattr(pipe, name)
    original.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["r_timestep"]), with_kwargs=True)
    setattr(pipe, name, torch.compile(original, backend="eager"))
    torch.testing.assert_close(latents(pipe, arch), expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2  # one forward per step, each with its r


@pytest.mark.parametrize("arch", ["sd", "sd3", "flux"])
def test_pipelines_run_in_bfloat16(arch):
    pipe = (flow_map_student(arch) if arch == "sd3" else few_step_pipe(arch)).to(torch.bfloat16)
    out = latents(pipe, arch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (a device synchronisation on an accelerator)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__index__, torch.Tensor.nonzero, torch.Tensor.numpy, torch.Tensor.cpu}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_steps_read_nothing_on_the_host_until_the_last_step(name):
    scheduler = SCHEDULERS[name]()
    scheduler._immediate_check_devices = ()  # as on an accelerator
    scheduler.set_timesteps(4)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    reads = []
    for i, t in enumerate(scheduler.timesteps):  # the timestep is an element of scheduler.timesteps: found without a read
        with HostReads() as counter:
            x = scheduler.step(out, t, x, return_dict=False)[0]
        reads.append(counter.reads)
    assert reads[:-1] == [[], [], []], reads
    assert reads[-1] == ["cpu", "numpy"]  # the last step reads the step sums of the NaN / inf check once
    scheduler.set_timesteps(4)
    scheduler.defer_finite_check = True  # what the few-step pipelines do: read after the call
    with HostReads() as counter:
        for t in scheduler.timesteps:
            x = scheduler.step(out, t, x, return_dict=False)[0]
    assert counter.reads == []
    with HostReads() as counter:
        scheduler.raise_if_nonfinite()
    assert counter.reads == ["cpu", "numpy"]
