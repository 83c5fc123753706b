"""zaya-mlx: Zyphra's ZAYA1 on MLX."""

from .errors import ZayaError

__all__ = ["ZayaError"]
