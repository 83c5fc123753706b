"""CCA decode step: the fused op for one new token, and its plain-MLX reference.

For each layer and decode step, everything between the fused q/k/v projection (``in_proj``) and
attention: append the new q/k inputs to the conv state, the causal depthwise conv (kernel t0, bias)
and causal grouped conv (kernel t1, one group per head, bias), the residual means
``q_res = (q + repeat_kv(k)) / 2`` and ``k_res`` (the mean of ``q_res`` over each KV group), L2
normalisation of query and key to norm ``sqrt(d)`` with an eps clamp, the key temperature, NeoX RoPE on
the first ``rope_dims`` channels of each head, and the value made of the current half and the previous
token's delayed half; then the new key and value into the layer's KV cache. The kernel
(metal/cca_decode.h) does all of it in one launch; the reference is about 30 MLX primitives and two slice
updates.

The kernel writes the key and value into the cache's buffers in place (MLX's custom kernels only make
new outputs, and a new buffer a step would copy the whole cache). That is safe only for buffers no other
array shares: the fused decode step makes and keeps them so (``decode.StepCache.own_kv_buffers``).

Semantics follow transformers' ``ZayaCCAProjection`` + ``ZayaQKNorm`` + ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import mlx.core as mx

from ._build import backend, constant, filled_array, float_bits, launch, shape_or_into, use_kernel


def _eps(dtype) -> float:
    return float(mx.finfo(dtype).eps)


def cca_decode_step_reference(
    qkv,
    conv_state,
    v_prev,
    dw_w,
    dw_b,
    gw_w,
    gw_b,
    temp,
    offset,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    rope_dims: int,
    rope_base: float,
    norm_eps: float | None = None,
):
    """One CCA decode step in plain MLX ops (what the kernel replaces).

    qkv [B, Q+K+V] (or [B, 1, Q+K+V]): ``in_proj`` of the new token, rows q (nh*d), k (nkv*d),
    v_current (nkv*d/2), v_delayed (nkv*d/2). conv_state [B, S, C]: the last S = (t0-1)+(t1-1) q/k
    inputs (C = Q+K). v_prev [B, nkv*d/2]: the previous token's v_delayed (zeros before the first
    token). dw_w [C, t0, 1], dw_b [C], gw_w [C, t1, C/(nh+nkv)], gw_b [C]: the two convs in MLX layout.
    temp [nkv]: key temperature. offset: the token's position, an int or an int32 array [B].
    norm_eps: the clamp of the L2 norm (default: the dtype's machine epsilon, as transformers).

    Returns q [B, nh, 1, d], k [B, nkv, 1, d] (both normalised and rotated), v [B, nkv, 1, d],
    new_conv_state [B, S, C], new_v_prev [B, nkv*d/2].
    """
    B = qkv.shape[0]
    qkv = qkv.reshape(B, -1)
    nh, nkv, d = n_heads, n_kv_heads, head_dim
    Q, K = nh * d, nkv * d
    C = Q + K
    VH = K // 2
    G = nh + nkv
    rep = nh // nkv
    dtype = qkv.dtype
    eps = _eps(dtype) if norm_eps is None else norm_eps

    window = mx.concatenate([conv_state.astype(dtype), qkv[:, None, :C]], axis=1)  # [B, S+1, C]
    new_state = window[:, 1:, :]
    y = mx.conv1d(window, dw_w.astype(dtype), groups=C) + dw_b.astype(dtype)  # [B, t1, C]
    y = mx.conv1d(y, gw_w.astype(dtype), groups=G) + gw_b.astype(dtype)  # [B, 1, C]
    y = y[:, -1, :]

    q = qkv[:, :Q].reshape(B, nh, d)
    k = qkv[:, Q:C].reshape(B, nkv, d)
    q_res = (q + mx.repeat(k, rep, axis=1)) * 0.5
    k_res = q_res.reshape(B, nkv, rep, d).mean(axis=2)
    query = y[:, :Q].reshape(B, nh, d) + q_res
    key = y[:, Q:].reshape(B, nkv, d) + k_res

    def l2(t):  # in float32, one rounding (as the model's QKNorm)
        t32 = t.astype(mx.float32)
        n = mx.maximum(mx.sqrt(mx.sum(t32 * t32, axis=-1, keepdims=True)), eps)
        return (t32 * (math.sqrt(d) / n)).astype(t.dtype)

    query = l2(query)
    key = l2(key) * temp.astype(dtype)[:, None]

    query, key = query[:, :, None, :], key[:, :, None, :]
    if rope_dims > 0:
        query = mx.fast.rope(query, rope_dims, traditional=False, base=rope_base, scale=1.0, offset=offset)
        key = mx.fast.rope(key, rope_dims, traditional=False, base=rope_base, scale=1.0, offset=offset)

    value = mx.concatenate([qkv[:, C : C + VH], v_prev.astype(dtype)], axis=-1).reshape(B, nkv, 1, d)
    return query, key, value, new_state, qkv[:, C + VH :]


@functools.cache
def _inv_freq(rope_dims: int, rope_base: float) -> mx.array:
    # As mx.fast.rope computes it: base ** (-i / (dims / 2)) for i < dims / 2.
    half = rope_dims // 2
    f = mx.power(mx.array(2.0, mx.float32), -(mx.arange(half, dtype=mx.float32) / half) * math.log2(rope_base))
    mx.eval(f)
    return f


def offset_array(offset, batch: int) -> mx.array:
    """Positions as the kernel reads them: int32 [batch]. Pass one array to every layer of a step: an
    int becomes a constant (no graph primitive), an array is used as it is."""
    if isinstance(offset, mx.array):
        off = offset if offset.dtype == mx.int32 else offset.astype(mx.int32)
        if off.ndim != 1:
            off = off.reshape(-1)
        if off.size == 1 and batch > 1:
            off = mx.broadcast_to(off, (batch,))
        return off
    return mx.array([int(offset)] * batch, dtype=mx.int32)


def _threads(dtype) -> int:
    """Threads of a threadgroup. Each lane holds its SIMD group's grouped-conv rows in registers (16 bytes a
    lane and channel); 1024 threads leave 64 registers a thread, enough for bfloat16 rows, so float32 takes 512
    (more channels a SIMD group, 128 registers a thread)."""
    return 1024 if dtype.size == 2 else 512


def kv_layout(keys, head_dim: int) -> tuple:
    """(dtype, [B, NKV, CAP, D], bits, group size) of a KV cache's buffer: an array (bits 0), or a quantized cache's
    (packed uint32 words, scales, biases), mlx-lm's QuantizedKVCache layout."""
    if isinstance(keys, (tuple, list)):
        words, scales, _ = keys
        return scales.dtype, (*words.shape[:3], head_dim), words.shape[-1] * 32 // head_dim, head_dim // scales.shape[-1]
    return keys.dtype, tuple(keys.shape), 0, 0


def kv_parts(buffer) -> tuple:
    """A KV buffer as a launch takes it: (the array, None, None), or a quantized cache's (words, scales, biases)."""
    return tuple(buffer) if isinstance(buffer, (tuple, list)) else (buffer, None, None)


def kernel_supported(qkv, conv_state, gw_w, keys, *, n_heads, n_kv_heads, head_dim, rope_dims, **_) -> bool:
    """Whether the fused kernel covers these shapes (else the reference runs)."""
    dtype, shape, bits, group = kv_layout(keys, head_dim)
    return (
        conv_state.shape[1] >= 1
        # a quantized cache: whole groups a head, and a word's values in one group (zk_quantize_kv)
        and (bits == 0 or (bits in (4, 8) and head_dim % group == 0 and group % (32 // bits) == 0))
        and dtype == qkv.dtype
        and shape[1] == n_kv_heads
        and shape[3] == head_dim
        and math.prod(shape) < 2**31  # int32 indexing
        and n_heads % n_kv_heads == 0
        and head_dim % 2 == 0
        and 0 <= rope_dims <= head_dim
        and rope_dims % 2 == 0
        and head_dim <= 256
        and gw_w.shape[1] <= 4  # grouped-conv taps: a lane holds T1 * D / 32 weights a channel in registers
        and gw_w.dtype in (mx.bfloat16, mx.float32)
        and (gw_w.shape[1] * head_dim * gw_w.dtype.size) % 16 == 0  # a channel's weights in 16-byte chunks
        and max(conv_state.shape[1], gw_w.shape[1]) * head_dim <= _threads(gw_w.dtype)  # one item a thread
    )


def write_kv_reference(keys, values, k, v, filled):
    """Plain MLX: keys/values [B, NKV, CAP, D] with position filled - 1 set to k/v [B, NKV, 1, D] (new arrays); a
    quantized cache's (words, scales, biases) with k/v quantized (mx.quantize) into each."""
    start = filled_array(filled) - 1
    _, _, bits, group = kv_layout(keys, k.shape[-1])

    def put(buf, x):
        if not bits:
            return mx.slice_update(buf, x, start, axes=(2,))
        return tuple(mx.slice_update(b, p, start, axes=(2,))
                     for b, p in zip(buf, mx.quantize(x, group_size=group, bits=bits)))

    return put(keys, k), put(values, v)


def _as(a, dtype):
    """a in dtype: the array itself where it already is (the same object, which a caller tracking arrays sees)."""
    return a if a.dtype == dtype else a.astype(dtype)


# the step's weights a body reads one scalar at a time: one float32 input (see _build.launch)
PACKED = ("dw_w", "dw_b", "gw_b", "temp", "inv_freq")


class StepLaunch(NamedTuple):
    """The CCA step's part of a kernel launch, as cca_decode.h and decode_attention.h (HAS_CCA) take it."""

    inputs: list  # (name, array) pairs
    template: list  # all but NT, which the kernel sets
    outputs: list  # the new states: (name, shape, dtype)


STEP_INPUTS = ("qkv", "conv_state", "v_prev", "dw_w", "dw_b", "gw_w", "gw_b", "temp", "offset", "inv_freq")


def step_launch(qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, *, n_heads, n_kv_heads, head_dim,
                rope_dims, rope_base, norm_eps) -> StepLaunch:
    """The step's inputs, template arguments and new states for a launch (arguments as cca_decode_step's)."""
    B = qkv.shape[0]
    dtype = qkv.dtype
    nh, nkv, d = n_heads, n_kv_heads, head_dim
    eps = _eps(dtype) if norm_eps is None else norm_eps
    inv = _inv_freq(rope_dims, float(rope_base)) if rope_dims > 0 else constant((0.0,))
    inputs = list(zip(STEP_INPUTS, (qkv, _as(conv_state, dtype), _as(v_prev, dtype), dw_w, dw_b, gw_w, gw_b, temp,
                                    offset_array(offset, B), inv)))
    template = [("T", dtype), ("D", d), ("NH", nh), ("NKV", nkv), ("T0", dw_w.shape[1]), ("T1", gw_w.shape[1]),
                ("RD", rope_dims), ("EPS", float_bits(eps))]
    outputs = [("conv_out", (B, conv_state.shape[1], (nh + nkv) * d), dtype), ("vprev_out", (B, nkv * d // 2), dtype)]
    return StepLaunch(inputs, template, outputs)


def no_step(dtype) -> StepLaunch:
    """The step's part of a launch that runs none (decode_attention.h without HAS_CCA): its inputs and outputs
    absent, placeholder template arguments."""
    return StepLaunch([(n, None) for n in STEP_INPUTS], [("T0", 1), ("T1", 1), ("RD", 0), ("EPS", 0)],
                      [("conv_out", None, dtype), ("vprev_out", None, dtype)])


def threads_fit(nt: int, dtype, head_dim: int, t1: int, state: int) -> bool:
    """Whether nt threads can run one head group's step: an item a thread (head_dim, t1 * head_dim and state *
    head_dim of them), and each lane's grouped-conv rows (16 bytes a lane and channel, see _threads) in at most 16
    chunks, as many registers as _threads leaves the widest case it takes (float32, 512 threads)."""
    warps = nt // 32
    chunks = -(-(t1 * head_dim * dtype.size // 16) // 32)
    return warps > 0 and max(state, t1, 1) * head_dim <= nt and -(-head_dim // warps) * chunks <= 16


def _cca_kernel(
    qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, keys, values, filled, *, n_heads, n_kv_heads,
    head_dim, rope_dims, rope_base, norm_eps, back, q_into=None, after=None
):
    B = qkv.shape[0]
    dtype = qkv.dtype
    nh, nkv, d = n_heads, n_kv_heads, head_dim
    nt = _threads(dtype)
    if q_into is not None and any(q_into is a for a in (qkv, conv_state, v_prev, keys, values)):
        raise ValueError("the CCA step cannot write its query into one of its inputs")
    step = step_launch(qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, n_heads=nh, n_kv_heads=nkv,
                       head_dim=d, rope_dims=rope_dims, rope_base=rope_base, norm_eps=norm_eps)
    _, (_, _, cap, _), bits, group = kv_layout(keys, d)
    (kw, ks, kb), (vw, vs, vb) = kv_parts(keys), kv_parts(values)
    q, state, vprev = launch(
        "cca_decode.h", back,
        [*step.inputs, ("kcache", kw), ("vcache", vw), ("kscales", ks), ("kbiases", kb), ("vscales", vs),
         ("vbiases", vb), ("filled", filled_array(filled)), ("capacity", constant((cap,), mx.int32)), ("after", after)],
        [("q_out", shape_or_into((B, nh, 1, d), q_into), dtype), *step.outputs],
        template=[*step.template, ("NT", nt), ("KVB", bits), ("KVG", group or 64)],
        grid=((nh + nkv) * nt, B, 1),
        threadgroup=(nt, 1, 1),
        pack=PACKED,
    )
    return q, keys, values, state, vprev


def cca_decode_step(
    qkv,
    conv_state,
    v_prev,
    dw_w,
    dw_b,
    gw_w,
    gw_b,
    temp,
    offset,
    keys,
    values,
    filled,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    rope_dims: int,
    rope_base: float,
    norm_eps: float | None = None,
    q_into=None,
    after=None,
    impl: str = "auto",
):
    """One CCA decode step and the cache write: ``cca_decode_step_reference``, then the key and value into
    keys/values [B, NKV, CAP, D] at position filled - 1 (filled: an int or int32 [1], the positions held after
    the write). Returns q [B, nh, 1, d], the keys and values buffers holding the new token (on the kernel path
    the same arrays, written in place; on the reference path new ones), new_conv_state, new_v_prev.

    q_into: an array the kernel writes the query into, in place (see _build.launch for what the caller owes), or
    None; after: an array the kernel must run after (not read). The reference ignores both.
    impl: 'auto' (the fused kernel on a Metal or CUDA GPU, the reference on the CPU), 'kernel' or
    'reference'.
    """
    kw = dict(
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, rope_dims=rope_dims, rope_base=rope_base,
        norm_eps=norm_eps,
    )
    back = backend()
    if use_kernel(impl, back, lambda: kernel_supported(qkv, conv_state, gw_w, keys, **kw), "the fused CCA kernel"):
        return _cca_kernel(qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, keys, values, filled,
                           back=back, q_into=q_into, after=after, **kw)
    q, k, v, state, vprev = cca_decode_step_reference(qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset,
                                                      **kw)
    keys, values = write_kv_reference(keys, values, k, v, filled)
    return q, keys, values, state, vprev
