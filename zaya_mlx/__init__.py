"""zaya-mlx: Zyphra's ZAYA1 on MLX."""

from .errors import ZayaError
from .loading import load_model
from .quantization import quantize  # light: mlx.core only; reads checkpoints when called

from .mlx_lm_registry import register as _register_with_mlx_lm

_register_with_mlx_lm()  # `mlx_lm.models.zaya` -> our model module, imported only when mlx-lm asks for it

_GENERATION = ("load", "generate", "stream_generate", "batch_generate")


def __getattr__(name):
    """Text generation, imported on first use (it pulls in mlx-lm's generate and transformers' tokenizers)."""
    if name in _GENERATION:
        from . import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'zaya_mlx' has no attribute {name!r}")


__all__ = ["ZayaError", "load_model", "quantize", *_GENERATION]
