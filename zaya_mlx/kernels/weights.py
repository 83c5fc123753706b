"""Weights as the kernels read them: dense stacks or MLX's quantized layouts, and the format codes the bodies take.

Shared by every kernel that reads a weight matrix (the experts, attention's o_proj, the residual norm's projection,
the LM head): the same forms, checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class QuantizedStack:
    """Quantized weights in MLX's layout (as ``mx.quantize`` writes): a stack of E matrices [E, rows, cols], or one
    matrix [rows, cols] (a linear layer's, for the LM head and the residual norm's projection)."""

    weight: mx.array
    scales: mx.array
    biases: mx.array | None
    group_size: int
    bits: int
    mode: str = "affine"
    global_scale: mx.array | None = None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], self.scales.shape[-1] * self.group_size)

    @classmethod
    def quantize(cls, w: mx.array, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedStack":
        q, s, *b = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
        return cls(q, s, b[0] if b else None, group_size, bits, mode)

    def dequantize(self, dtype=mx.float32) -> mx.array:
        return mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits, mode=self.mode
        ).astype(dtype)


def as_stack(w):
    """An ``mx.array`` (dense stack) or a ``QuantizedStack`` for any accepted weight form."""
    if isinstance(w, (mx.array, QuantizedStack)):
        return w
    if getattr(w, "scales", None) is not None:
        return QuantizedStack(
            w.weight,
            w.scales,
            getattr(w, "biases", None),
            int(w.group_size),
            int(w.bits),
            str(getattr(w, "mode", "affine")),
            getattr(w, "global_scale", None),
        )
    if getattr(w, "weight", None) is not None:  # mlx-lm SwitchLinear
        return w.weight
    raise TypeError(f"not an expert weight stack: {type(w).__name__}")


MAX_K = 6144  # input width: the padded input row in 32 KB of threadgroup memory (here and in metal/matvec.h)


def weight_format(w) -> tuple[int, int, int] | None:
    """(QM, BITS, GS) for the kernel, or None when it does not cover this weight form."""
    if isinstance(w, QuantizedStack):
        if w.global_scale is not None:
            return None
        if w.mode == "mxfp4" and w.bits == 4 and w.group_size == 32:
            return 3, 4, 32
        if w.mode == "affine" and w.bits in (4, 8) and w.biases is not None:
            vpv = 4 * 32 // w.bits
            if w.group_size % vpv == 0:
                return 2, w.bits, w.group_size
        return None
    if w.dtype == mx.bfloat16:
        return 0, 16, 1
    if w.dtype == mx.float32:
        return 1, 16, 1
    return None


def chunk_values(qm: int, bits: int) -> int:
    """Values in a 16-byte chunk of a weight row."""
    return 4 * (2 if qm == 0 else 1 if qm == 1 else 32 // bits)


def kernel_parts(w):
    """(weight, scales, biases, (QM, BITS, GS)) as the kernel reads them; None where a form has none."""
    if isinstance(w, QuantizedStack):
        return w.weight, w.scales, w.biases, weight_format(w)
    return w, None, None, weight_format(w)
