"""The KV cache's formats: the activation dtype (bf16), or keys and values quantized as they are written.

A quantized cache is mlx-lm's ``QuantizedKVCache``: each key or value row of ``head_dim`` values is stored as
``bits``-bit integers packed into uint32 words, with a scale and a bias (the activation dtype) for each
``group_size`` values (MLX's affine quantization, ``mx.quantize``); attention reads it without expanding it
(``mx.quantized_matmul``, or the decode kernel's quantized loads). At 8 bits a token's KV takes 53% of bf16's
bytes, at 4 bits 28%: the bytes decode reads a step at long context, and the memory that decides how many long
sequences fit. docs/kv-cache.md gives the quality figures.
"""

from __future__ import annotations

from typing import Optional

from .errors import ZayaError
from .sizes import KV_GROUP_SIZE  # values sharing a scale and a bias; sizes.py counts the bytes

KV_BITS = (8, 4)  # the quantized formats


def check_kv_bits(kv_bits: Optional[int]) -> Optional[int]:
    """None (the activation dtype) or one of KV_BITS; anything else is a ZayaError."""
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise ZayaError(f"kv_bits {kv_bits!r}: choose {', '.join(map(str, KV_BITS))}, or none for the model's dtype")
    return kv_bits


def parse_kv(name: str) -> Optional[int]:
    """A command line's KV format: 'bf16' (or 'none') -> None, '8' or '4' -> bits."""
    name = name.strip().lower()
    if name in ("bf16", "none", "16"):
        return None
    try:
        return check_kv_bits(int(name))
    except ValueError:
        raise ZayaError(f"KV format {name!r}: choose bf16, {', '.join(map(str, KV_BITS))}") from None
