"""How a model decodes: the options of its fused decode step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ZayaError


@dataclass(frozen=True)
class DecodeOptions:
    """fused: run one-token steps through the fused decode step (True), through the plain ops (False), or decide
    (None): on a Metal or CUDA GPU, once the step has passed its check against the plain ops for the model's
    weights. kernels: run the GPU kernels where they cover the shapes (False: their plain-MLX references, which
    compute the same function). compile: run the step's fixed-shape parts as ``mx.compile``'d functions.
    group_experts_from: the batch size from which the expert kernel runs grouped by expert (each chosen expert's
    rows read once for its tokens, after the router's own launch) instead of a token a threadgroup (None, the
    default: never: on an H100 it gains nothing at batches 8 to 32, docs/PERFORMANCE.md); the same function either
    way."""

    fused: Optional[bool] = None
    kernels: bool = True
    compile: bool = True
    group_experts_from: Optional[int] = None

    def __post_init__(self):
        g = self.group_experts_from
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise ZayaError(f"DecodeOptions.group_experts_from is a batch size >= 1, or None for never; got {g!r}")

    def groups_experts(self, batch: int) -> bool:
        """Whether a step of ``batch`` tokens runs the expert kernel grouped by expert."""
        return self.group_experts_from is not None and batch >= self.group_experts_from

    @property
    def impl(self) -> str:
        """What the kernel ops are asked to run: 'auto' (their kernel where it covers the call) or 'reference'."""
        return "auto" if self.kernels else "reference"
