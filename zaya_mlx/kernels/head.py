"""The LM head for a few rows (a decode step): the fused op and its plain-MLX reference.

``logits = W h (+ b)`` with W the tied embedding's matrix or an untied head's, dense or in MLX's quantized
layouts. The kernel is the expert matvec body (metal/expert_matvec.h) with a single "expert". On an H100 with
ZAYA1-8B's MXFP4 head (262,144 x 2,048), MLX's quantized matmul took 863 us a call at batch 1 and this 183 us;
at batch 8, 1,161 us against 894, since the body reads the matrix once a row (``bench/bench_kernels.py --only
"LM head"``). So it serves up to MAX_ROWS rows, and MLX's matmul the rest.
"""

from __future__ import annotations

import mlx.core as mx

from ._build import backend, constant, use_kernel
from .experts import MAX_K, _matvec, _qm, _vpv, as_stack

MAX_ROWS = 4


def lm_head_reference(h, layer):
    """h [..., H]; layer: an nn.Embedding / nn.QuantizedEmbedding (tied: its as_linear) or an nn.Linear /
    nn.QuantizedLinear. Returns [..., V] in h's dtype."""
    return layer.as_linear(h) if hasattr(layer, "as_linear") else layer(h)


def kernel_supported(h, layer) -> bool:
    w = as_stack(layer)
    qm = _qm(w)
    H = h.shape[-1]
    return qm is not None and h.size // H <= MAX_ROWS and H <= MAX_K and H % _vpv(qm[0], qm[1]) == 0


def lm_head(h, layer, *, impl: str = "auto"):
    """The LM head (see ``lm_head_reference``); impl: 'auto', 'kernel' or 'reference'."""
    back = backend()
    if use_kernel(impl, back, lambda: kernel_supported(h, layer), "the LM head kernel"):
        n = h.size // h.shape[-1]
        w = as_stack(layer)
        out = _matvec(h, constant((0,) * n, mx.int32), constant((1.0,) * n), w, glu=False, nout=w.shape[0],
                      back=back, ne=1)
        return out + layer["bias"] if "bias" in layer else out
    return lm_head_reference(h, layer)
