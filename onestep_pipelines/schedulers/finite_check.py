"""The NaN / inf check of a generation's model outputs, without stopping the denoising loop.

One reduction per step. On the CPU the sum is read at once (it costs nothing there) and the error names that step.
On an accelerator each step's sum goes into a small device buffer that is read once: at the last step, or, when
``defer_finite_check`` is set (the few-step pipelines set it for the duration of a call), after the call, from a
pinned copy started at the last step, so the host neither waits inside the loop nor for the work queued after it.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class FiniteCheckMixin:
    """``check_finite`` of :class:`~onestep_pipelines.schedulers.scheduling_utils.FewStepSchedulerMixin`."""

    _immediate_check_devices = ("cpu",)  # where reading a tensor on the host costs no device synchronisation
    _finite = None  # the device buffer of step sums of the current generation
    _finite_host = None
    _finite_event = None
    defer_finite_check = False

    def _watch_finite(self, model_output: torch.Tensor, i: int) -> None:
        """One reduction per step. On the CPU it is read at once; on an accelerator each step's sum goes into a device
        buffer, read once at the last step, or after the pipeline call when ``defer_finite_check`` is set (our
        few-step pipelines), so the denoising loop never waits for the device."""
        if model_output.device.type in self._immediate_check_devices:
            if not math.isfinite(model_output.sum(dtype=torch.float64 if model_output.dtype == torch.float64 else torch.float32).item()):
                self._raise_nonfinite(i)
            return
        if self._finite is None or self._finite.device != model_output.device:
            self._finite = torch.zeros(self.num_inference_steps, dtype=torch.float32, device=model_output.device)
        torch.sum(model_output, dim=tuple(range(model_output.ndim)), dtype=torch.float32, out=self._finite[i])
        if i == self.num_inference_steps - 1:
            if not self.defer_finite_check:
                self.raise_if_nonfinite()
            elif self._finite.device.type == "cuda":  # start the copy now; raise_if_nonfinite waits for this point only
                self._finite_host = torch.empty(self._finite.shape, dtype=self._finite.dtype, pin_memory=True)
                self._finite_host.copy_(self._finite, non_blocking=True)
                self._finite_event = torch.cuda.Event()
                self._finite_event.record()

    def raise_if_nonfinite(self) -> None:
        """Raise a ValueError naming the first step of the last generation whose model output had NaN / inf (reads
        the device buffer of step sums once; nothing to do on the CPU, where each step is checked at once)."""
        sums, self._finite = self._finite, None
        host, self._finite_host = getattr(self, "_finite_host", None), None
        if sums is None or sums.device.type == "meta":
            return
        if host is not None:
            self._finite_event.synchronize()  # the end of the denoising loop, not of what the pipeline queued after it
            values = host.numpy()
        else:
            values = sums.cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            self._raise_nonfinite(int(bad[0]))

    def _raise_nonfinite(self, i: int) -> None:
        raise ValueError(
            f"model_output at step {i + 1}/{self.num_inference_steps} (timestep {float(self._host_timesteps[i]):g}) "
            "contains NaN or inf values."
        )
