"""Models: two-time (t, r) conditioning."""

from .digits_transformer import DigitsTransformer2DModel
from .r_conditioning import (
    TwoTimeFlux2Transformer2DModel,
    TwoTimeFluxTransformer2DModel,
    TwoTimeQwenImageTransformer2DModel,
    TwoTimeSD3Transformer2DModel,
    TwoTimeUNet2DConditionModel,
    add_r_conditioning,
    takes_r_timestep,
)

__all__ = [
    "DigitsTransformer2DModel",
    "TwoTimeFlux2Transformer2DModel",
    "TwoTimeFluxTransformer2DModel",
    "TwoTimeQwenImageTransformer2DModel",
    "TwoTimeSD3Transformer2DModel",
    "TwoTimeUNet2DConditionModel",
    "add_r_conditioning",
    "takes_r_timestep",
]
