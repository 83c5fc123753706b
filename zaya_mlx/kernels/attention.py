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

from ._build import backend, constant, filled_array, float_bits, launch, use_kernel
from . import cca
from .cca import kv_layout
from .weights import as_stack, chunk_values, kernel_parts, weight_format

SINGLE_PASS_MAX = 1024  # buffer positions a threadgroup takes in one pass; larger buffers split into CHUNK-key chunks
CHUNK = 512
HEADS_PER_THREADGROUP = 1  # query heads a threadgroup: 1 spreads a batch row over NH threadgroups (see the body)
LANES_PER_KEY = 32  # a SIMD group's lanes a key, 32 or 16 (two keys at once, a 16-byte load a lane: see the body)
# in chunks on CUDA: the last chunk's threadgroup of a head block merges the chunks in the same launch (a launch less
# a layer; see the body), where a device-scope fence makes that safe; Metal keeps the combine launch
FUSED_COMBINE = False
# the most repeated CCA steps a head (summed over the batch) for which the step still runs inside attention's launch
CCA_INSIDE_MAX_REPEATS = 32
# with o_proj: threadgroups to spread o_proj's rows over, each computing its heads' attention in one pass or merging
# its head's chunks (see the bodies)
O_PROJ_THREADGROUPS = 32


def dequantized(keys, head_dim: int):
    """A KV buffer as values: the array itself, or a quantized cache's (words, scales, biases) expanded."""
    _, _, bits, group = kv_layout(keys, head_dim)
    return mx.dequantize(*keys, group_size=group, bits=bits) if bits else keys


def decode_attention_reference(q, keys, values, filled, *, scale: float, left_padding=None, window=None,
                               o_proj=None):
    """q [B, NH, 1, D]; keys, values [B, NKV, CAP, D] (or a quantized cache's (words, scales, biases)) with positions
    [0, filled) filled (filled: an int or an int32 array [1]); left_padding [B] (int array) or None; window: a
    sliding window's size or None. Returns [B, 1, NH * D] (o_proj's input) in q's dtype; given o_proj (a linear
    layer), o_proj's output [B, 1, HO] in float32 (the kernel's form: P partial sums [B, P, HO], here P = 1). Masks
    the whole buffer, so its shapes do not follow filled."""
    B, NH, _, D = q.shape
    keys, values = dequantized(keys, D), dequantized(values, D)
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
    fit in 28 KB of threadgroup memory (Metal allows 32 KB in all); with more than one head, at most 8, so that a
    thread's registers fit (each head's query and accumulator slices beside the keys and values it loads: 4 heads
    of 128 take 160 registers a thread in float32 or over a 4-bit cache, which 416 threads could not have;
    dev/nvcc_check.py)."""
    per_group = heads * (head_dim + 2) * 4
    return 32 * max(1, min(16 if heads == 1 else 8, 28672 // per_group))


def kernel_supported(q, keys, o_proj=None) -> bool:
    B, NH, L, D = q.shape
    return L == 1 and _heads_supported(NH, D, q.dtype, keys, o_proj)


def _heads_supported(NH: int, D: int, dtype, keys, o_proj) -> bool:
    kv_dtype, (_, NKV, _, _), bits, group = kv_layout(keys, D)
    dpl = D // LANES_PER_KEY
    # a quantized cache: a lane's D / LANES_PER_KEY values in one group, and in whole 32-bit words or within one
    if bits and not (bits in (4, 8) and group % dpl == 0 and D % group == 0
                     and (dpl * bits % 32 == 0 or 32 % (dpl * bits) == 0)):
        return False
    if o_proj is not None:
        w = as_stack(o_proj)
        qm = weight_format(w)
        if qm is None or w.shape[-1] != NH * D:
            return False
        vpv = chunk_values(qm[0], qm[1])
        if D % vpv:
            return False
        # zk_slice_matvec's lanes a row: a head's (one pass: a head block's) chunks, a power of two or 32s
        chunks = [D // vpv * hb for hb in (1, _heads_per_threadgroup(NH, NKV))]
        if any(c % 32 and c & (c - 1) for c in chunks):
            return False
    return (
        LANES_PER_KEY in (32, 16)
        and D % 32 == 0
        and D <= 256
        and NH % NKV == 0
        and NH // NKV <= 8
        and dtype == kv_dtype
        and dtype in (mx.bfloat16, mx.float32)  # the dtypes its GPU tests cover
    )


def cca_kernel_supported(qkv, conv_state, gw_w, keys, *, o_proj=None, **cca_kw) -> bool:
    """Whether one launch covers the CCA step and attention (decode_attention.h with HAS_CCA, one head a
    threadgroup): both kernels' shapes, and a head group's step in half the threadgroup's threads."""
    nh, d = cca_kw["n_heads"], cca_kw["head_dim"]
    return (
        _heads_supported(nh, d, qkv.dtype, keys, o_proj)
        and cca.kernel_supported(qkv, conv_state, gw_w, keys, **cca_kw)
        and cca.threads_fit(_threads(1, d) // 2, qkv.dtype, d, gw_w.shape[1], conv_state.shape[1])
    )


def key_chunks(capacity: int) -> int:
    """The chunks attention's launch splits a buffer of ``capacity`` positions into (1: one pass)."""
    return -(-capacity // CHUNK) if capacity > SINGLE_PASS_MAX else 1


def cca_inside_pays(keys, head_dim: int) -> bool:
    """Whether the CCA step should run inside attention's launch where it can. Inside, it saves a launch a layer; but
    a launch split into chunks computes each head's step again in every chunk, B x (chunks - 1) repeats a head,
    which at long context and batch 16 cost more than the launch saved (docs/PERFORMANCE.md has the figures)."""
    _, (B, _, cap, _), _, _ = kv_layout(keys, head_dim)
    return B * (key_chunks(cap) - 1) <= CCA_INSIDE_MAX_REPEATS


def decode_attention_kernel(q, keys, values, filled, *, scale: float, left_padding=None, window=None, o_proj=None,
                            after=None, back=None, step: cca.StepLaunch | None = None):
    """step: the CCA step's launch (cca.step_launch), run inside (HAS_CCA) in place of q (None): the keys and values
    are then written in place, and the new conv state and v_prev follow the output(s). keys, values: arrays, or a
    quantized cache's (words, scales, biases)."""
    back = back or backend()
    D = q.shape[-1] if step is None else dict(step.template)["D"]
    dtype, (B, NKV, cap, _), kv_bits, kv_group = kv_layout(keys, D)
    NH = q.shape[1] if step is None else dict(step.template)["NH"]
    split = cap > SINGLE_PASS_MAX
    hb = 1 if step is not None else _heads_per_threadgroup(NH, NKV)
    nt, rows = _threads(hb, D), B * NH // hb
    if o_proj is not None:
        wo, wos, wob, (qm, bits, gs) = kernel_parts(as_stack(o_proj))
        ho = wo.shape[0]
        bo = o_proj["bias"] if "bias" in o_proj else None
    else:
        wo, wos, wob, (qm, bits, gs), ho, bo = None, None, None, (1, 16, 1), 1, None
    o_template = [("HAS_O", o_proj is not None), ("HO", ho), ("QM", qm), ("BITS", bits), ("GS", gs),
                  ("HAS_OB", bo is not None)]
    o_inputs = [("wo", wo), ("wos", wos), ("wob", wob), ("bo", bo)]
    chunk = CHUNK if split else cap
    nc = key_chunks(cap)
    # with o_proj: RS threadgroups a head block in one pass (a head in the combine), each adding o_proj's rows of its
    # share (at least one)
    row_shares = min(ho, max(1, O_PROJ_THREADGROUPS // (B * NH if split else rows))) if o_proj is not None else 1
    has_cca = step is not None
    step = cca.no_step(dtype) if step is None else step
    shared = ("T", "D", "NH", "NKV")  # attention's own too
    step = step._replace(template=[(k, v) for k, v in step.template if k not in shared] + [("HAS_CCA", has_cca)])
    fuse = split and FUSED_COMBINE and back == "cuda"
    template = [("T", dtype), ("D", D), ("NH", NH), ("NKV", NKV), ("HB", hb), ("NT", nt), ("LPK", LANES_PER_KEY),
                ("SPLIT", split), ("FUSE", fuse),
                *o_template, ("SCALE", float_bits(scale)), *step.template, ("KVB", kv_bits), ("KVG", kv_group or 64)]
    # read at run time: a grown buffer (a new capacity) then compiles no new variant
    meta = constant((window or 0, chunk, cap, nc, row_shares, B * NH), mx.int32)
    lpad = left_padding.astype(mx.int32) if left_padding is not None else constant((0,) * B, mx.int32)
    (kw, ks, kb), (vw, vs, vb) = cca.kv_parts(keys), cca.kv_parts(values)
    inputs = [("q", q), ("keys", kw), ("values", vw), ("kscales", ks), ("kbiases", kb), ("vscales", vs),
              ("vbiases", vb), ("lpad", lpad), ("filled", filled_array(filled)), ("meta", meta), *o_inputs,
              ("after", after), *step.inputs]
    # o_proj's input: [B, 1, NH * D], the same memory as [B, NH, 1, D] (no reshape node); or o_proj's partial sums
    out_shape, out_dtype = ((B, 1, NH * D), dtype) if o_proj is None else ((B, rows // B, ho), mx.float32)
    if not split:
        out, _, _, *states = launch("decode_attention.h", back, inputs,
                                    [("out", out_shape, out_dtype), ("ml", None, mx.float32), ("fin", None, out_dtype),
                                     *step.outputs],
                                    template=template, grid=(nt * row_shares, rows, 1), threadgroup=(nt, 1, 1),
                                    pack=cca.PACKED)
        return (out, *states) if has_cca else out
    chunk_out = ("out", (B, NH, nc, D), mx.float32)
    if fuse:
        # the last chunk's threadgroup of each head block writes the output; ml ends in a ticket a head block, and
        # every output starts zeroed
        _, _, out, *states = launch("decode_attention.h", back, inputs,
                                    [chunk_out, ("ml", (B * NH * nc * 2 + rows,), mx.float32),
                                     ("fin", out_shape, out_dtype), *step.outputs],
                                    template=template, grid=(nc * nt, rows, 1), threadgroup=(nt, 1, 1),
                                    pack=cca.PACKED, init_value=0)
        return (out, *states) if has_cca else out
    part, ml, _, *states = launch("decode_attention.h", back, inputs,
                                  [chunk_out, ("ml", (B, NH, nc, 2), mx.float32), ("fin", None, out_dtype),
                                   *step.outputs],
                                  template=template, grid=(nc * nt, rows, 1), threadgroup=(nt, 1, 1), pack=cca.PACKED)
    nt2 = max(32, D) if o_proj is None else max(256, D)  # with o_proj, 256 threads share its rows
    if o_proj is not None:
        out_shape = (B, NH, ho)
    out = launch("attention_combine.h", back, [("part", part), ("ml", ml), ("meta", meta), *o_inputs],
                 [("out", out_shape, out_dtype)],
                 template=[("T", dtype), ("D", D), ("NH", NH), ("NT", nt2), *o_template],
                 grid=(B * NH * row_shares * nt2, 1, 1), threadgroup=(nt2, 1, 1))[0]
    return (out, *states) if has_cca else out


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


def cca_decode_attention(qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, keys, values, filled, *,
                         n_heads: int, n_kv_heads: int, head_dim: int, rope_dims: int, rope_base: float, scale: float,
                         left_padding=None, window=None, o_proj=None, norm_eps=None, q_into=None, after=None,
                         impl="auto"):
    """The CCA step with its cache write (cca.cca_decode_step), then attention (decode_attention), for one new token
    a row: one launch where the kernel covers the shapes and it pays (``cca_inside_pays``), else the two ops.
    Returns (attention's output, as decode_attention's; the keys and values buffers; the new conv state; the new
    delayed value).

    q_into, after: for the two ops. q_into: an array the CCA kernel writes the query into, used only where attention
    runs its kernel, which then takes the new delayed value (an output of the CCA launch) as its ``after``:
    attention's plain ops would take the query alone, and could run first. after: an array the CCA step must run
    after. The one launch needs neither: its query never leaves it, and it writes the cache only at the new
    position, which no launch before it reads. impl: 'auto', 'kernel' (the one launch, or raise) or 'reference'."""
    kw = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, rope_dims=rope_dims, rope_base=rope_base,
              norm_eps=norm_eps)
    back = backend()
    inside = impl == "kernel" or cca_inside_pays(keys, head_dim)
    if inside and use_kernel(impl, back, lambda: cca_kernel_supported(qkv, conv_state, gw_w, keys, o_proj=o_proj, **kw),
                             "the CCA step inside attention"):
        step = cca.step_launch(qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, **kw)
        out, state, v_prev = decode_attention_kernel(None, keys, values, filled, scale=scale, left_padding=left_padding,
                                                     window=window, o_proj=o_proj, back=back, step=step)
        return out, keys, values, state, v_prev
    if q_into is not None and not kernel_supported(q_into, keys, o_proj):
        q_into = None
    q, keys, values, state, v_prev = cca.cca_decode_step(qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset,
                                                         keys, values, filled, q_into=q_into, after=after, impl=impl,
                                                         **kw)
    out = decode_attention(q, keys, values, filled, scale=scale, left_padding=left_padding, window=window,
                           o_proj=o_proj, after=v_prev if q is q_into else None, impl=impl)
    return out, keys, values, state, v_prev
