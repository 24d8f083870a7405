"""Students: sampling metadata, LoRA files for diffusers and ComfyUI, model cards and Hub upload."""

from .cards import base_model_name, write_model_card
from .lora import load_student_lora, save_student_lora
from ..hub import push_student
from ..metadata import StudentMetadata

__all__ = ["StudentMetadata", "base_model_name", "load_student_lora", "push_student", "save_student_lora", "write_model_card"]
