"""zaya-mlx: Zyphra's ZAYA1 on MLX."""

from .errors import ZayaError
from .loading import load_model
from .quantization import quantize  # light: mlx.core only; reads checkpoints when called

__all__ = ["ZayaError", "load_model", "quantize"]
