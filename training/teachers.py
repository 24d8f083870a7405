"""Teachers: a frozen pipeline seen through the sampling core's time and prediction conventions.

A :class:`Teacher` turns ``(model, x_t, t, conditions)`` into ``(x0_hat, eps_hat)`` for any denoiser of the
teacher's architecture (the teacher itself, a fake score, the student), so that every method writes its loss
in one convention: native time ``t`` (flow ``sigma`` in (0, 1]), ``x_t = alpha_t x0 +
sigma_t eps`` with the coefficients of :mod:`onestep_pipelines.sampling.time`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from ..benchmark.evaluate import load_digits_teacher
from ..pipelines import DigitsPipeline
from ..sampling import check_prediction_type, flow_coefficients, to_x0_eps


@dataclass
class Teacher:
    """A frozen teacher pipeline and the conventions of its denoiser.

    Attributes:
        pipeline: the teacher pipeline (its denoiser is frozen and in eval mode).
        architecture: ``"digits"`` (class-conditional) for now; see :func:`load_teacher`.
        time_type, prediction_type: the denoiser's conventions (``"flow"`` / ``"flow"`` so far).
        source: path or Hub id the teacher came from (recorded as the students' base model).
    """

    pipeline: DiffusionPipeline
    architecture: str
    time_type: str
    prediction_type: str
    source: str
    num_train_timesteps: int = 1000

    def __post_init__(self):
        check_prediction_type(self.time_type, self.prediction_type)
        if self.time_type != "flow":
            raise ValueError(f"time_type={self.time_type!r}: the trainer supports flow teachers so far.")
        self.model.eval().requires_grad_(False)

    @property
    def model(self):
        return self.pipeline.transformer if self.architecture == "digits" else self.pipeline.unet

    @property
    def sample_shape(self) -> tuple[int, ...]:
        cfg = self.model.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    # -------------------------------------------------------------------------------- time
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` at native times ``t`` (shape ``(B,)``), broadcastable to samples."""
        alpha, sigma = flow_coefficients(t)
        return alpha.view(-1, 1, 1, 1).float(), sigma.view(-1, 1, 1, 1).float()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_train_timesteps

    def sample_times(self, n: int, generator: torch.Generator, low: float = 0.02, high: float = 0.98) -> torch.Tensor:
        """Uniform native times covering the fraction ``[low, high]`` of the noise range."""
        return low + (high - low) * torch.rand(n, generator=generator)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.coefficients(t.to(x0.device))
        return alpha * x0 + sigma * noise

    # -------------------------------------------------------------------------------- conditions
    def sample_conditions(self, n: int, generator: torch.Generator) -> dict:
        """Random conditions for a data-free batch: class labels for the digits teacher."""
        return {"class_labels": torch.randint(0, self.num_classes, (n,), generator=generator)}

    def null_conditions(self, conditions: dict) -> dict:
        return {"class_labels": torch.full_like(conditions["class_labels"], self.model.null_class)}

    # -------------------------------------------------------------------------------- predictions
    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, conditions: dict, guidance_scale: float = 1.0, **model_kwargs):
        """``(x0_hat, eps_hat)`` of ``model`` (the teacher or any copy of it) at ``(x_t, t)``; with
        ``guidance_scale != 1`` the output is classifier-free guided (one batched forward)."""
        timestep = self.model_timestep(t.to(x_t.device))
        cond = {k: v.to(x_t.device) for k, v in conditions.items()}
        if guidance_scale != 1.0:
            null = {k: v.to(x_t.device) for k, v in self.null_conditions(conditions).items()}
            both = model(
                torch.cat([x_t, x_t]), torch.cat([timestep, timestep]), **{k: torch.cat([cond[k], null[k]]) for k in cond}, **model_kwargs
            ).sample
            c, u = both.chunk(2)
            out = u + guidance_scale * (c - u)
        else:
            out = model(x_t, timestep, **cond, **model_kwargs).sample
        alpha, sigma = self.coefficients(t.to(x_t.device))
        return to_x0_eps(out.float(), x_t.float(), alpha, sigma, self.prediction_type)


def load_teacher(source: str = "digits") -> Teacher:
    """The teacher named by ``source``: ``"digits"`` (the embedded digits teacher) or a folder holding a saved
    :class:`DigitsPipeline`. Stock SD / SDXL / SD3 / Flux pipeline teachers are not supported by the trainer yet."""
    if source == "digits":
        return Teacher(load_digits_teacher(), "digits", "flow", "flow", source="onestep-pipelines/digits-teacher")
    if not os.path.isdir(source):
        raise ValueError(f"teacher {source!r} is neither 'digits' nor a folder holding a saved pipeline.")
    if not os.path.isfile(os.path.join(source, "model_index.json")):
        raise ValueError(f"teacher folder {source} is not a diffusers pipeline (it has no model_index.json).")
    pipe = DiffusionPipeline.from_pretrained(source)
    if not isinstance(pipe, DigitsPipeline):
        raise ValueError(
            f"teacher {source} is a {type(pipe).__name__}; the trainer distils DigitsPipeline teachers so far "
            "(stock SD / SDXL / SD3 / Flux teachers are on the roadmap, issue 5)."
        )
    return Teacher(pipe, "digits", "flow", "flow", source=source)
