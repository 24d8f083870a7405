"""Models: two-time (t, r) conditioning."""

from .digits_transformer import DigitsTransformer2DModel

__all__ = ["DigitsTransformer2DModel"]
