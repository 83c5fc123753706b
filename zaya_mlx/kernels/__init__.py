"""Fused decode ops, one a file, each with its plain-MLX reference.

Dispatch by back end: on a Metal GPU the kernels run through ``mx.fast.metal_kernel``, on an NVIDIA GPU
(MLX-CUDA) through ``mx.fast.cuda_kernel``, and on the CPU the references run. The kernel sources live
in metal/ (installed as ``zaya_mlx.metal``): one portable body a kernel plus a Metal and a CUDA prelude.
Each op takes ``impl='reference'`` to run its reference on any back end.
"""

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
