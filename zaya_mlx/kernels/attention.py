"""Decode attention over a KV cache's buffers: the fused op and its plain-MLX reference.

One query token per sequence attends to the first ``filled`` positions of the cache's preallocated
key/value buffers ([B, NKV, capacity, D], as mlx-lm's KVCache and BatchKVCache keep them), less a batch
row's left padding and, for a sliding-window layer, the keys that fell out of the window. The kernel
(metal/decode_attention.h, plus metal/attention_combine.h for buffers of more than ``SINGLE_PASS_MAX``
positions) reads the buffers in place: no slices, no mask array, and none of
mx.fast.scaled_dot_product_attention's per-call host setup, which on MLX-CUDA costs more than the attention
itself for one token. ``filled`` may be an array: the kernel reads it on the GPU, so its launch depends only
on shapes and one compiled decode step serves every position until the buffers grow.
"""

from __future__ import annotations

import mlx.core as mx

from ._build import backend, constant, get_kernel, use_kernel
from .cca import filled_array

SINGLE_PASS_MAX = 1024  # buffer positions a threadgroup takes in one pass; larger buffers split into CHUNK-key chunks
CHUNK = 512
HEADS_PER_THREADGROUP = 1  # query heads a threadgroup: 1 spreads a batch row over NH threadgroups (see the body)


def decode_attention_reference(q, keys, values, filled, *, scale: float, left_padding=None, window=None):
    """q [B, NH, 1, D]; keys, values [B, NKV, CAP, D] with positions [0, filled) filled (filled: an int or an
    int32 array [1]); left_padding [B] (int array) or None; window: a sliding window's size or None. Returns
    [B, 1, NH * D] (o_proj's input) in q's dtype. Masks the whole buffer, so its shapes do not follow filled."""
    B, NH, _, D = q.shape
    length = filled_array(filled)
    k = mx.arange(keys.shape[2])
    mask = k < length
    if window is not None:
        mask = mask & (k > length - 1 - window)
    mask = mask[None, None, None, :]
    if left_padding is not None:
        mask = mask & (k[None] >= left_padding[:, None])[:, None, None, :]
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    return out.reshape(B, 1, NH * D)


def _heads_per_threadgroup(n_heads: int, n_kv_heads: int) -> int:
    rep = n_heads // n_kv_heads
    hb = min(HEADS_PER_THREADGROUP, rep)
    while rep % hb:
        hb -= 1
    return hb


def _threads(heads: int, head_dim: int) -> int:
    """Threads of a threadgroup serving ``heads`` query heads: at most 16 SIMD groups, whose partial results
    fit in 28 KB of threadgroup memory (Metal allows 32 KB in all)."""
    per_group = heads * (head_dim + 2) * 4
    return 32 * max(1, min(16, 28672 // per_group))


def kernel_supported(q, keys) -> bool:
    B, NH, L, D = q.shape
    NKV = keys.shape[1]
    return (
        L == 1
        and D % 32 == 0
        and D <= 256
        and NH % NKV == 0
        and NH // NKV <= 8
        and q.dtype == keys.dtype
        and q.dtype in (mx.bfloat16, mx.float32)  # the dtypes its GPU tests cover
    )


def decode_attention_kernel(q, keys, values, filled, *, scale: float, left_padding=None, window=None, back=None):
    back = back or backend()
    B, NH, _, D = q.shape
    NKV, cap = keys.shape[1], keys.shape[2]
    split = cap > SINGLE_PASS_MAX
    hb = _heads_per_threadgroup(NH, NKV)
    nt, rows = _threads(hb, D), B * NH // hb
    template = [("T", q.dtype), ("D", D), ("NH", NH), ("NKV", NKV), ("HB", hb), ("NT", nt), ("SPLIT", split)]
    chunk = CHUNK if split else cap
    nc = (cap + chunk - 1) // chunk
    meta = constant((window or 0, chunk, cap, nc), mx.int32)
    lpad = left_padding.astype(mx.int32) if left_padding is not None else constant((0,) * B, mx.int32)
    kern = get_kernel("decode_attention.h", back, ("q", "keys", "values", "lpad", "filled", "meta", "fparams"),
                      ("out", "ml"))
    out_shape = (B, 1, NH * D)  # o_proj's input: the same memory as [B, NH, 1, D], no reshape node
    inputs = [q, keys, values, lpad, filled_array(filled), meta, constant((scale,), mx.float32)]
    if not split:
        return kern(inputs=inputs, template=template, grid=(nt, rows, 1), threadgroup=(nt, 1, 1),
                    output_shapes=[out_shape, (1,)], output_dtypes=[q.dtype, mx.float32])[0]
    part, ml = kern(inputs=inputs, template=template, grid=(nc * nt, rows, 1), threadgroup=(nt, 1, 1),
                    output_shapes=[(B, NH, nc, D), (B, NH, nc, 2)], output_dtypes=[mx.float32, mx.float32])
    combine = get_kernel("attention_combine.h", back, ("part", "ml", "meta"), ("out",))
    nt2 = max(32, D)
    return combine(inputs=[part, ml, meta], template=[("T", q.dtype), ("D", D), ("NT", nt2)],
                   grid=(B * NH * nt2, 1, 1), threadgroup=(nt2, 1, 1), output_shapes=[out_shape],
                   output_dtypes=[q.dtype])[0]


def decode_attention(q, keys, values, filled, *, scale: float, left_padding=None, window=None, impl="auto"):
    """Attention of one new token per row (see ``decode_attention_reference``): [B, 1, NH * D]. impl: 'auto',
    'kernel' or 'reference'."""
    back = backend()
    if use_kernel(impl, back, lambda: kernel_supported(q, keys), "the decode attention kernel"):
        return decode_attention_kernel(q, keys, values, filled, scale=scale, left_padding=left_padding,
                                       window=window, back=back)
    return decode_attention_reference(q, keys, values, filled, scale=scale, left_padding=left_padding,
                                      window=window)
