"""zaya-mlx: Zyphra's ZAYA1 on MLX."""

from .errors import ZayaError
from .loading import load_model

__all__ = ["ZayaError", "load_model"]
