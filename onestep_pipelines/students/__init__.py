"""Students: sampling metadata, LoRA files for diffusers and ComfyUI, model cards and Hub upload."""

from .cards import write_model_card
from .hub import push_student
from .lora import load_student_lora, save_student_lora
from ..metadata import StudentMetadata

__all__ = ["StudentMetadata", "load_student_lora", "push_student", "save_student_lora", "write_model_card"]
