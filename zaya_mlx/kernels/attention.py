"""Decode attention over a KV cache's buffers: the fused op and its plain-MLX reference.

One query token per sequence attends to the first ``filled`` positions of the cache's preallocated
key/value buffers ([B, NKV, capacity, D], as mlx-lm's KVCache and BatchKVCache keep them), less a batch
row's left padding and, for a sliding-window layer, the keys that fell out of the window. The kernel
(metal/decode_attention.h, plus metal/attention_combine.h for buffers of more than ``SINGLE_PASS_MAX``
positions) reads the buffers in place: no slices, no mask array, and none of
mx.fast.scaled_dot_product_attention's per-call host setup, which on MLX-CUDA costs more than the attention
itself for one token. ``filled`` may be an array: the kernel reads it on the GPU, so its launch depends only
on shapes and one compiled decode step serves every position until the buffers grow.

Given o_proj, the kernel also applies it: each threadgroup adds its heads' share, ``W_o[:, heads] o_heads``, and
the shares come back as partial sums for the residual norm to add up (no launch, and no graph node, for o_proj).
"""

from __future__ import annotations

import mlx.core as mx

from ._build import backend, constant, float_bits, launch, use_kernel
from .cca import filled_array
from .experts import _parts, _qm, _vpv, as_stack

SINGLE_PASS_MAX = 1024  # buffer positions a threadgroup takes in one pass; larger buffers split into CHUNK-key chunks
CHUNK = 512
HEADS_PER_THREADGROUP = 1  # query heads a threadgroup: 1 spreads a batch row over NH threadgroups (see the body)


def decode_attention_reference(q, keys, values, filled, *, scale: float, left_padding=None, window=None,
                               o_proj=None):
    """q [B, NH, 1, D]; keys, values [B, NKV, CAP, D] with positions [0, filled) filled (filled: an int or an
    int32 array [1]); left_padding [B] (int array) or None; window: a sliding window's size or None. Returns
    [B, 1, NH * D] (o_proj's input) in q's dtype; given o_proj (a linear layer), o_proj's output [B, 1, HO] in
    float32 (the kernel's form: P partial sums [B, P, HO], here P = 1). Masks the whole buffer, so its shapes
    do not follow filled."""
    B, NH, _, D = q.shape
    length = filled_array(filled)
    k = mx.arange(keys.shape[2])
    mask = k < length
    if window is not None:
        mask = mask & (k > length - 1 - window)
    mask = mask[None, None, None, :]
    if left_padding is not None:
        mask = mask & (k[None] >= left_padding[:, None])[:, None, None, :]
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask).reshape(B, 1, NH * D)
    return out if o_proj is None else o_proj(out).astype(mx.float32)


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


def kernel_supported(q, keys, o_proj=None) -> bool:
    B, NH, L, D = q.shape
    NKV = keys.shape[1]
    if o_proj is not None:
        w = as_stack(o_proj)
        qm = _qm(w)
        if qm is None or w.shape[-1] != NH * D:
            return False
        vpv = _vpv(qm[0], qm[1])
        if D % vpv:
            return False
        # zk_slice_matvec's lanes a row: a head's (one pass: a head block's) chunks, a power of two or 32s
        chunks = [D // vpv * hb for hb in (1, _heads_per_threadgroup(NH, NKV))]
        if any(c % 32 and c & (c - 1) for c in chunks):
            return False
    return (
        L == 1
        and D % 32 == 0
        and D <= 256
        and NH % NKV == 0
        and NH // NKV <= 8
        and q.dtype == keys.dtype
        and q.dtype in (mx.bfloat16, mx.float32)  # the dtypes its GPU tests cover
    )


def decode_attention_kernel(q, keys, values, filled, *, scale: float, left_padding=None, window=None, o_proj=None,
                            after=None, back=None):
    back = back or backend()
    B, NH, _, D = q.shape
    NKV, cap = keys.shape[1], keys.shape[2]
    split = cap > SINGLE_PASS_MAX
    hb = _heads_per_threadgroup(NH, NKV)
    nt, rows = _threads(hb, D), B * NH // hb
    if o_proj is not None:
        wo, wos, wob, (qm, bits, gs) = _parts(as_stack(o_proj))
        ho = wo.shape[0]
        bo = o_proj["bias"] if "bias" in o_proj else None
    else:
        wo, wos, wob, (qm, bits, gs), ho, bo = None, None, None, (1, 16, 1), 1, None
    o_template = [("HAS_O", o_proj is not None), ("HO", ho), ("QM", qm), ("BITS", bits), ("GS", gs),
                  ("HAS_OB", bo is not None)]
    o_inputs = [("wo", wo), ("wos", wos), ("wob", wob), ("bo", bo)]
    chunk = CHUNK if split else cap
    nc = (cap + chunk - 1) // chunk
    template = [("T", q.dtype), ("D", D), ("NH", NH), ("NKV", NKV), ("HB", hb), ("NT", nt), ("SPLIT", split),
                *o_template, ("SCALE", float_bits(scale))]
    # read at run time: a grown buffer (a new capacity) then compiles no new variant
    meta = constant((window or 0, chunk, cap, nc), mx.int32)
    lpad = left_padding.astype(mx.int32) if left_padding is not None else constant((0,) * B, mx.int32)
    inputs = [("q", q), ("keys", keys), ("values", values), ("lpad", lpad), ("filled", filled_array(filled)),
              ("meta", meta), *o_inputs, ("after", after)]
    # o_proj's input: [B, 1, NH * D], the same memory as [B, NH, 1, D] (no reshape node); or o_proj's partial sums
    out_shape, out_dtype = ((B, 1, NH * D), q.dtype) if o_proj is None else ((B, rows // B, ho), mx.float32)
    if not split:
        return launch("decode_attention.h", back, inputs, [("out", out_shape, out_dtype), ("ml", None, mx.float32)],
                      template=template, grid=(nt, rows, 1), threadgroup=(nt, 1, 1))[0]
    part, ml = launch("decode_attention.h", back, inputs,
                      [("out", (B, NH, nc, D), mx.float32), ("ml", (B, NH, nc, 2), mx.float32)],
                      template=template, grid=(nc * nt, rows, 1), threadgroup=(nt, 1, 1))
    nt2 = max(32, D) if o_proj is None else max(256, D)  # with o_proj, 256 threads share its rows
    if o_proj is not None:
        out_shape = (B, NH, ho)
    return launch("attention_combine.h", back, [("part", part), ("ml", ml), ("meta", meta), *o_inputs],
                  [("out", out_shape, out_dtype)],
                  template=[("T", q.dtype), ("D", D), ("NH", NH), ("NT", nt2), *o_template],
                  grid=(B * NH * nt2, 1, 1), threadgroup=(nt2, 1, 1))[0]


def decode_attention(q, keys, values, filled, *, scale: float, left_padding=None, window=None, o_proj=None,
                     after=None, impl="auto"):
    """Attention of one new token per row (see ``decode_attention_reference``): [B, 1, NH * D], or given o_proj,
    its output as P partial sums [B, P, HO] float32 (P: 1 on the reference path). after: an array the kernel must
    run after (not read: an output of the launch that wrote q or the cache in place); the reference ignores it.
    impl: 'auto', 'kernel' or 'reference'."""
    back = backend()
    if use_kernel(impl, back, lambda: kernel_supported(q, keys, o_proj), "the decode attention kernel"):
        return decode_attention_kernel(q, keys, values, filled, scale=scale, left_padding=left_padding,
                                       window=window, o_proj=o_proj, after=after, back=back)
    return decode_attention_reference(q, keys, values, filled, scale=scale, left_padding=left_padding,
                                      window=window, o_proj=o_proj)
