"""The LM head for a few rows (a decode step): the fused op and its plain-MLX reference.

``logits = W h (+ b)`` with W the tied embedding's matrix or an untied head's, dense or in MLX's quantized
layouts. The kernel (metal/matvec.h) reads the weights in the expert kernel's formats. On an H100 with
ZAYA1-8B's MXFP4 head (262,144 x 2,048), MLX's quantized matmul took 863 us a call at batch 1 and this 183 us;
at batch 8, 1,161 us against 894, since the body reads the matrix once a row (``bench/bench_kernels.py --only
"LM head"``). So it serves up to MAX_ROWS rows, and MLX's matmul the rest.
"""

from __future__ import annotations

from ._build import backend, launch, use_kernel
from .weights import MAX_K, as_stack, chunk_values, kernel_parts, weight_format

MAX_ROWS = 4
_NT = 256
_RPW = 1  # weight rows a SIMD group: one keeps the most SIMD groups in flight


def lm_head_reference(h, layer):
    """h [..., H]; layer: an nn.Embedding / nn.QuantizedEmbedding (tied: its as_linear) or an nn.Linear /
    nn.QuantizedLinear. Returns [..., V] in h's dtype."""
    return layer.as_linear(h) if hasattr(layer, "as_linear") else layer(h)


MAX_BLOCKS = 65535  # the grid's rows of threadgroups (CUDA's limit on a grid's y)


def _blocks(nout: int) -> int:
    """Threadgroups a row of x: blocks of weight rows."""
    return -(-nout // ((_NT // 32) * _RPW))


def kernel_supported(h, layer) -> bool:
    w = as_stack(layer)
    qm = weight_format(w)
    H = h.shape[-1]
    return (qm is not None and w.shape[-1] == H and h.size // H <= MAX_ROWS and H <= MAX_K
            and H % chunk_values(qm[0], qm[1]) == 0 and _blocks(w.shape[0]) <= MAX_BLOCKS)


def lm_head(h, layer, *, impl: str = "auto"):
    """The LM head (see ``lm_head_reference``); impl: 'auto', 'kernel' or 'reference'."""
    back = backend()
    if use_kernel(impl, back, lambda: kernel_supported(h, layer), "the LM head kernel"):
        out = _matvec(h, as_stack(layer), back)
        return out + layer["bias"] if "bias" in layer else out
    return lm_head_reference(h, layer)


def _matvec(x, w, back):
    """One launch of metal/matvec.h: W x for each row of x [..., K], W [NOUT, K] dense or quantized."""
    wt, sc, bi, (qm, bits, gs) = kernel_parts(w)
    K = x.shape[-1]
    nout = wt.shape[0]
    return launch(
        "matvec.h", back, [("x", x), ("w", wt), ("scales", sc), ("biases", bi)],
        [("y", tuple(x.shape[:-1]) + (nout,), x.dtype)],
        template=[("T", x.dtype), ("K", K), ("NOUT", nout), ("QM", qm), ("BITS", bits), ("GS", gs), ("RPW", _RPW),
                  ("NT", _NT)],
        grid=(x.size // K * _NT, _blocks(nout), 1),
        threadgroup=(_NT, 1, 1),
    )[0]
