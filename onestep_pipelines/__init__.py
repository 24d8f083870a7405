"""onestep-pipelines: one-step and few-step generation for diffusers and ComfyUI."""

__version__ = "0.1.0"

from .benchmark.evaluate import load_digits_teacher
from .models import DigitsTransformer2DModel
from .pipelines import DigitsPipeline
from .schedulers import ConsistencyScheduler, FewStepSchedulerOutput, FlowMapScheduler, TDMScheduler

__all__ = [
    "ConsistencyScheduler",
    "DigitsPipeline",
    "DigitsTransformer2DModel",
    "FewStepSchedulerOutput",
    "FlowMapScheduler",
    "TDMScheduler",
    "__version__",
    "load_digits_teacher",
]
