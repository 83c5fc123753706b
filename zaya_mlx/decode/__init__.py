"""The fused decode step (one token per sequence) that `zaya_mlx.model.Model` runs where its options say so.

``DecodeOptions`` are the model's explicit choices; ``FusedDecoder`` builds and runs the step; ``StepCache`` is its
state beside a model cache. ``mlx_settings`` names the MLX settings the step is tuned for, which the `zaya` command
applies at start-up and a Python program may apply itself before its first GPU evaluation.
"""

import mlx.core as mx

from .cache import KV_GROWTH, KV_MIN_POSITIONS, StepCache, kv_capacity
from .options import DecodeOptions
from .step import FusedDecoder

# MLX-CUDA records 20 ops a CUDA graph unless MLX_MAX_OPS_PER_BUFFER says otherwise; 200 a graph decodes ~30%
# faster at batch 1 on an H100 (docs/PERFORMANCE.md). MLX reads it at its first GPU evaluation.
CUDA_OPS_PER_GRAPH = "200"


def mlx_settings() -> dict:
    """Environment variables of MLX's that the fused step is tuned for, on this machine's back end (empty where
    none applies): MLX_MAX_OPS_PER_BUFFER on CUDA."""
    return {"MLX_MAX_OPS_PER_BUFFER": CUDA_OPS_PER_GRAPH} if mx.cuda.is_available() else {}


__all__ = ["DecodeOptions", "FusedDecoder", "StepCache", "kv_capacity", "KV_GROWTH", "KV_MIN_POSITIONS",
           "mlx_settings", "CUDA_OPS_PER_GRAPH"]
