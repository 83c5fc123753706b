"""How big things are: a model's weights, the keys and values a token adds, and sizes written for people."""

from __future__ import annotations

from typing import Optional

from mlx.utils import tree_flatten


def weight_bytes(model) -> int:
    """Bytes of all the model's parameters, as they are held (quantized weights packed)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def weight_bytes_per_token(model, num_experts: int) -> int:
    """Bytes a decoded token reads at batch 1: every weight but the experts it is not routed to (top-1 routing
    reads one expert of ``num_experts`` a layer)."""
    total = expert = 0
    for name, v in tree_flatten(model.parameters()):
        total += v.nbytes
        if "experts" in name or "switch_mlp" in name:
            expert += v.nbytes
    return total - expert + expert // num_experts


def kv_bytes_per_token(args, dtype_bytes: int = 2) -> int:
    """Keys and values of every layer for one token: layers x 2 x kv heads x head_dim x dtype bytes."""
    return args.num_hidden_layers * 2 * args.num_key_value_heads * args.head_dim * dtype_bytes


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
