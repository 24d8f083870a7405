"""onestep-pipelines: one-step and few-step generation for diffusers and ComfyUI."""

__version__ = "0.1.0"

from .benchmark.evaluate import load_digits_teacher
from .models import (
    DigitsTransformer2DModel,
    TwoTimeFluxTransformer2DModel,
    TwoTimeSD3Transformer2DModel,
    TwoTimeUNet2DConditionModel,
    add_r_conditioning,
)
from .pipelines import (
    DigitsPipeline,
    FewStepFluxPipeline,
    FewStepStableDiffusion3Pipeline,
    FewStepStableDiffusionPipeline,
    FewStepStableDiffusionXLPipeline,
)
from .schedulers import ConsistencyScheduler, FewStepSchedulerOutput, FlowMapScheduler, TDMScheduler
from .students import StudentMetadata, load_student_lora, push_student, save_student_lora, write_model_card

__all__ = [
    "ConsistencyScheduler",
    "DigitsPipeline",
    "DigitsTransformer2DModel",
    "FewStepFluxPipeline",
    "FewStepSchedulerOutput",
    "FewStepStableDiffusion3Pipeline",
    "FewStepStableDiffusionPipeline",
    "FewStepStableDiffusionXLPipeline",
    "FlowMapScheduler",
    "StudentMetadata",
    "TDMScheduler",
    "TwoTimeFluxTransformer2DModel",
    "TwoTimeSD3Transformer2DModel",
    "TwoTimeUNet2DConditionModel",
    "__version__",
    "add_r_conditioning",
    "load_digits_teacher",
    "load_student_lora",
    "push_student",
    "save_student_lora",
    "write_model_card",
]
