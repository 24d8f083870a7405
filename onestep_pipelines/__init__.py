"""onestep-pipelines: one-step and few-step generation for diffusers and ComfyUI."""

__version__ = "0.1.0"

from .schedulers import ConsistencyScheduler, FewStepSchedulerOutput, FlowMapScheduler, TDMScheduler

__all__ = ["ConsistencyScheduler", "FewStepSchedulerOutput", "FlowMapScheduler", "TDMScheduler", "__version__"]
