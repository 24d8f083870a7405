"""The forward process a few-step scheduler samples: ``(alpha, sigma)`` of ``x = alpha x0 + sigma eps`` at its native
times, the transitions between the times of a schedule, and ``add_noise`` for image-to-image and trainers.

A mixin of :class:`~onestep_pipelines.schedulers.scheduling_utils.FewStepSchedulerMixin` over the config's
``time_type``: VP (``alphas_cumprod``, integer timesteps, -1 = clean), rectified flow (sigma) and TrigFlow (angle).
Every formula is the sampling core's.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sampling import (
    consistency_target_time,
    flow_coefficients,
    forward_noise_coefficients,
    trigflow_coefficients,
    vp_forward_noise_coefficients,
)


class NoiseLevelsMixin:
    """``(alpha, sigma)`` at native and model times of the scheduler's config, and the forward process."""

    @property
    def _t_end(self) -> float:
        """End of the trajectory in native time (-1 = clean on the VP grid)."""
        if self.config.time_type == "vp":
            return -1.0 if self.config.set_alpha_to_one else 0.0
        return 0.0

    def _coefficients(self, times: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at native times: VP timesteps (-1 = clean), flow sigmas, TrigFlow angles."""
        if self.config.time_type == "vp":  # from float32 abar, as diffusers' VP schedulers compute it
            abar = self._abar(times)
            return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)
        if self.config.time_type == "flow":
            return flow_coefficients(times.to(dtype))
        return trigflow_coefficients(times.to(dtype), self.config.sigma_data)

    def coefficients_at(self, times, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at native times (VP timesteps with -1 = clean, flow sigmas, TrigFlow angles), on the
        device of ``times`` (no host round trip): the forward process this scheduler samples, for trainers that noise
        data the same way."""
        return self._coefficients(torch.as_tensor(times), dtype=dtype)

    def native_times(self, timesteps) -> torch.Tensor:
        """Native times of model ``timesteps`` (the inverse of the units of ``self.timesteps``)."""
        timesteps = torch.as_tensor(timesteps)
        if self.config.time_type == "flow":
            return self._flow_sigmas(timesteps.double())
        return timesteps.double() if self.config.time_type == "trigflow" else timesteps.long()

    def _flow_sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Flow sigmas of model timesteps: ``t / T``; for the timesteps of a custom schedule whose model timesteps are
        not ``sigma * T`` (FlowMatchEuler's custom ``timesteps`` with a shift), that schedule's sigmas, as
        FlowMatchEulerDiscreteScheduler's ``scale_noise`` looks them up."""
        sigmas = timesteps / self.config.num_train_timesteps
        if self._model_sigmas is None:
            return sigmas
        model, native = (torch.as_tensor(a, device=timesteps.device, dtype=timesteps.dtype) for a in self._model_sigmas)
        match = torch.isclose(timesteps.unsqueeze(-1), model, rtol=0, atol=1e-3).to(timesteps.dtype)
        return torch.where(match.sum(-1) > 0, (match * native).sum(-1), sigmas)

    def _abar(self, times: torch.Tensor) -> torch.Tensor:
        """float32 ``alphas_cumprod`` at VP timesteps, 1 at the clean end (-1), on the device of ``times``."""
        idx = torch.as_tensor(times).long()
        table = self.alphas_cumprod
        if table.device != idx.device:  # copied to that device once, not per call
            cached = getattr(self, "_alphas_cumprod_on", None)
            if cached is None or cached.device != idx.device:
                self._alphas_cumprod_on = cached = table.to(idx.device)
            table = cached
        abar = table[idx.clamp(min=0)]
        return torch.where(idx < 0, torch.ones_like(abar), abar)

    def _model_timesteps(self, times: np.ndarray) -> np.ndarray:
        """Model timesteps (host) of native times: VP integers, flow ``sigma * T``, TrigFlow angles."""
        if self.config.time_type == "flow":
            return (np.asarray(times) * self.config.num_train_timesteps).astype(np.float32)
        return np.asarray(times).astype(np.int64 if self.config.time_type == "vp" else np.float32)

    def _transition(self, times: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
        """Per step: ``(alpha, sigma)`` at the step's time and at its intermediate time ``s`` (TCD's strategic
        stochastic sampling, :func:`consistency_target_time`), and the re-noising from ``s`` to the next time."""
        discrete = self.config.time_type == "vp"
        t_end = self._t_end
        next_times = np.append(times[1:], t_end)
        s_times = np.array([consistency_target_time(t, t_end, gamma, discrete) for t in next_times], dtype=np.float64)
        t, s, nxt = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (times, s_times, next_times))
        alpha_t, sigma_t = self._coefficients(t)
        alpha_s, sigma_s = self._coefficients(s)
        if discrete:  # in VP form, evaluated as TCD does
            scale, std = vp_forward_noise_coefficients(self._abar(s).double(), self._abar(nxt).double())
        else:
            scale, std = forward_noise_coefficients(alpha_s, sigma_s, *self._coefficients(nxt))
        renoise = torch.from_numpy((s_times < next_times).astype(np.float64))
        last = torch.zeros(len(times), dtype=torch.float64)
        last[-1] = 1.0
        std = torch.where((renoise > 0) & (last == 0), std, torch.zeros_like(std))  # no fresh noise at the last step
        scale = torch.where(std > 0, scale, torch.ones_like(scale))
        return {"times": t, "s_times": torch.from_numpy(s_times), "alpha_t": alpha_t, "sigma_t": sigma_t,
                "alpha_s": alpha_s, "sigma_s": sigma_s, "scale": scale, "std": std}

    def _coefficients_at_model_timesteps(self, timesteps, ref: torch.Tensor):
        """``(alpha, sigma)`` at model timesteps (model units), shaped to broadcast against ``ref``."""
        native = torch.as_tensor(timesteps, device=ref.device)
        if self.config.time_type == "flow":
            native = self._flow_sigmas(native.double())
        alpha, sigma = self._coefficients(native, dtype=self._compute_dtype(ref))
        shape = (-1,) + (1,) * (ref.ndim - 1)
        return alpha.to(ref.dtype).reshape(shape), sigma.to(ref.dtype).reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``alpha_t * x0 + sigma_t * noise`` at model timesteps (one per sample or one for all)."""
        alpha, sigma = self._coefficients_at_model_timesteps(timesteps, original_samples)
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow pipelines' name for :meth:`add_noise` (image-to-image in SD3 / Flux)."""
        return self.add_noise(sample, noise, timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: these schedulers feed the sample to the model unscaled."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
