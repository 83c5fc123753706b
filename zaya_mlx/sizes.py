"""How big things are: a model's weights, the keys and values a token adds, and sizes written for people."""

from __future__ import annotations

from typing import Optional

from mlx.utils import tree_flatten


def weight_bytes(model) -> int:
    """Bytes of all the model's parameters, as they are held (quantized weights packed)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def expert_weight_bytes(model) -> int:
    """Bytes of the experts' parameters: a decode step reads only those of the experts its tokens choose."""
    return sum(v.nbytes for name, v in tree_flatten(model.parameters()) if "experts" in name or "switch_mlp" in name)


def weight_bytes_per_token(model, num_experts: int) -> int:
    """Bytes a decoded token reads at batch 1: every weight but the experts it is not routed to (top-1 routing
    reads one expert of ``num_experts`` a layer)."""
    expert = expert_weight_bytes(model)
    return weight_bytes(model) - expert + expert // num_experts


KV_GROUP_SIZE = 64  # values of a quantized KV row sharing a scale and a bias (mlx-lm's default)


def kv_row_bytes(head_dim: int, kv_bits: Optional[int] = None, dtype_bytes: int = 2,
                 group_size: int = KV_GROUP_SIZE) -> int:
    """Bytes of one key (or value) row of one KV head: head_dim values, or (kv_bits, a quantized cache) packed
    integers plus a scale and a bias a group."""
    if kv_bits is None:
        return head_dim * dtype_bytes
    return head_dim * kv_bits // 8 + 2 * dtype_bytes * (head_dim // group_size)


def kv_bytes_per_token(args, dtype_bytes: int = 2, kv_bits: Optional[int] = None) -> int:
    """Keys and values of every layer for one token: layers x 2 x kv heads x a row's bytes (kv_row_bytes)."""
    return args.num_hidden_layers * 2 * args.num_key_value_heads * kv_row_bytes(args.head_dim, kv_bits, dtype_bytes)


def _decimal(n: float, unit: str) -> str:
    prefixes = ("", "K", "M", "G", "T")
    i = 0
    while abs(n) >= 1000 and i < len(prefixes) - 1:
        n, i = n / 1000, i + 1
    text = f"{n:.0f}" if i == 0 else f"{n:.2f}"
    return f"{text} {prefixes[i]}{unit}".rstrip()


def format_bytes(n: Optional[float]) -> str:
    """1234567 -> '1.23 MB' (decimal units, as every figure zaya prints in GB); None -> '?'."""
    return "?" if n is None else _decimal(float(n), "B")


def format_count(n: float) -> str:
    """1234567 -> '1.23 M'."""
    return _decimal(float(n), "")
