"""Fused decode ops, one a file, each with its plain-MLX reference.

Dispatch by back end: on a Metal GPU the kernels run through ``mx.fast.metal_kernel``, on an NVIDIA GPU
(MLX-CUDA) through ``mx.fast.cuda_kernel``, and on the CPU the references run. The kernel sources live
in metal/ (installed as ``zaya_mlx.metal``): one portable body a kernel plus a Metal and a CUDA prelude.
Each op takes ``impl='reference'`` to run its reference on any back end.
"""

import contextlib
import sys

from . import _build, attention, cca, experts, head, norms, router
from ._build import backend, constant
from .attention import cca_decode_attention, decode_attention, decode_attention_reference
from .cca import cca_decode_step, cca_decode_step_reference, offset_array
from .experts import (
    expert_gather,
    expert_gather_reference,
    routed_expert_gather,
    routed_expert_gather_reference,
    routed_kernel_supported,
)
from .head import lm_head, lm_head_reference
from .norms import residual_norm, residual_norm_reference
from .router import RouterWeights, router_mlp, router_mlp_reference
from .weights import QuantizedStack, as_stack

__all__ = [
    "backend",
    "constant",
    "kernels_from",
    "cca_decode_attention",
    "decode_attention",
    "decode_attention_reference",
    "cca_decode_step",
    "cca_decode_step_reference",
    "offset_array",
    "QuantizedStack",
    "as_stack",
    "expert_gather",
    "expert_gather_reference",
    "routed_expert_gather",
    "routed_expert_gather_reference",
    "routed_kernel_supported",
    "lm_head",
    "lm_head_reference",
    "residual_norm",
    "residual_norm_reference",
    "RouterWeights",
    "router_mlp",
    "router_mlp_reference",
]


# The modules that ask backend() where their ops run: what a test or a tool that runs the launchers for another back
# end than this machine's must redirect.
BACKEND_READERS = (_build, attention, cca, experts, head, norms, router, sys.modules[__name__])


@contextlib.contextmanager
def kernels_from(make_kernel, back: str = "cuda"):
    """Inside, the launchers get their kernels from ``make_kernel(body, inputs, outputs, absent, views, inplace)``
    instead of MLX (None: from MLX, as outside), and every module here reads ``back`` as the back end: how a body
    runs where its GPU is not (tests/kernel_emulator.py runs it on the CPU; dev/nvcc_check.py --step records a
    decode step's launches; dev/step_primitives.py stands one primitive in for each; tests/metal_source.py
    records the Metal sources MLX would compile)."""
    saved = [_build.get_kernel] + [m.backend for m in BACKEND_READERS]
    if make_kernel is not None:
        _build.get_kernel = lambda body, _back, inputs, outputs, absent=(), views=(), inplace=(): make_kernel(
            body, inputs, outputs, absent, views, inplace)
    for m in BACKEND_READERS:
        m.backend = lambda: back
    try:
        yield
    finally:
        _build.get_kernel = saved[0]
        for m, b in zip(BACKEND_READERS, saved[1:]):
            m.backend = b
