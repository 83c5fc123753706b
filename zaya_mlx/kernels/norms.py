"""Residual scaling + RMSNorm (+ a projection of the normed row) for decode: fused op and reference.

ZAYA's residual step is ``h = (o + b_o) * s_o + (h + b_h) * s_h`` with the residual stream ``h`` in
float32, followed by an RMSNorm of ``h`` cast to the activation dtype. What reads that normalised ``x`` comes
next: after attention, the MoE router's down-projection; after the MoE, the next layer's in_proj. The kernel
(metal/residual_norm.h) does the residual, the norm and that projection in one launch, where the plain path
takes about seven primitives and a matmul. Semantics follow transformers' ``ZayaResidualScaling`` and
``ZayaRMSNorm``.
"""

from __future__ import annotations

import mlx.core as mx

from ._build import backend, dummy, float_bits, launch, shape_or_into, use_kernel
from .weights import as_stack, chunk_values, kernel_parts, weight_format


def residual_norm_reference(o, h, hs, hb, rs, rb, norm_w, eps, proj=None, dtype=None, prev_state=None, zeros=False,
                            after=None, normed=True, into=None):
    """Plain MLX ops. o [..., H] (attention or MoE output), or P partial sums of it [..., P, H] where h is
    [..., 1, H] (o_proj's shares from the attention kernel), h [..., H] float32 (the residual stream),
    hs/hb/rs/rb [H] (hidden_states_scale/bias, residual_scale/bias), norm_w [H], eps; proj: a linear layer
    (nn.Linear or nn.QuantizedLinear) that reads the normed row, or None; dtype: the activation dtype when o
    comes in float32 (the expert kernel's sum), which o is rounded to first (default: o's); prev_state: with
    proj, (state [..., P], scale [P]) added to its output as state * scale (the previous layer's router state);
    zeros: also return a float32 zero row of h's shape (for the expert kernel to add into, see
    experts.expert_gather_kernel); after: an array the kernel must run after (ignored here); normed: with proj,
    False when the caller reads only proj(x) (x comes back None: the kernel then writes no x); into: (h_new,
    proj's output, zeros) arrays the kernel writes those into in place, each or None (a new array; see
    _build.launch for what the caller owes; ignored here).
    Returns (h_new float32, x = rmsnorm(h_new), proj(x) (+ state * scale) or None), then the zeros with zeros."""
    if o.size != h.size:
        o = o.reshape(*h.shape[:-1], -1, h.shape[-1]).sum(axis=-2)
    if dtype is not None:
        o = o.astype(dtype)
    h_new = (o + hb) * hs + (h + rb) * rs
    x = mx.fast.rms_norm(h_new.astype(o.dtype), norm_w, eps)
    p = None if proj is None else proj(x)
    if prev_state is not None:
        p = p + prev_state[0] * prev_state[1]
    if not normed and proj is not None:
        x = None
    return (h_new, x, p, mx.zeros(h.shape, mx.float32)) if zeros else (h_new, x, p)


_NT = 256
_MAX_CHUNKS = 16  # 16-byte weight chunks a lane holds in registers (one float32 row of 2,048)
_MAX_PARTS = 16  # partial sums of o a thread adds (the attention kernel's head blocks)


def _chunks_a_lane(H: int, qm: int, bits: int) -> int:
    return -(-(H // chunk_values(qm, bits)) // 32)


def _rows_per_simd_group(H: int, qm: int, bits: int) -> int:
    """Projection rows a SIMD group: up to 4 while they take at most 8 chunks a lane (ZAYA's MXFP4 in_proj: 4;
    the bf16 router down-projection: 1, i.e. 32 threadgroups for its 256 rows)."""
    return max(1, min(4, 8 // _chunks_a_lane(H, qm, bits)))


def kernel_supported(o, h, proj=None, prev_state=None) -> bool:
    H = h.shape[-1]
    parts = o.size // h.size
    ok = (h.dtype == mx.float32 and H % 8 == 0 and H <= 7168  # the padded row in 32 KB of threadgroup memory
          and o.shape[-1] == H and o.size == parts * h.size and parts <= _MAX_PARTS)
    if proj is not None:
        w = as_stack(proj)
        qm = weight_format(w)
        if qm is None or w.shape[-1] != H or H % chunk_values(qm[0], qm[1]):
            return False
        ok = ok and _chunks_a_lane(H, qm[0], qm[1]) <= _MAX_CHUNKS  # a row in a SIMD group's registers
        if prev_state is not None:
            P = w.shape[0]
            ok = ok and prev_state[0].size == (h.size // H) * P and prev_state[1].shape == (P,)
    return ok and (prev_state is None or proj is not None)


def residual_norm_kernel(o, h, hs, hb, rs, rb, norm_w, eps, proj=None, dtype=None, prev_state=None, zeros=False,
                         after=None, normed=True, into=None, *, back=None):
    back = back or backend()
    H = h.shape[-1]
    N = h.size // H
    parts = o.size // h.size
    dtype = dtype or o.dtype
    if proj is not None:
        w, ws, wb, (qm, bits, gs) = kernel_parts(as_stack(proj))
        P = w.shape[0]
        bias = proj["bias"] if "bias" in proj else None
        rpw = _rows_per_simd_group(H, qm, bits)
        nblk = -(-P // ((_NT // 32) * rpw))
    else:
        # w: read, and dropped, by the loads that are issued with no branch in front (zk_load_chunk)
        w, ws, wb, (qm, bits, gs), P, bias, rpw, nblk = dummy(dtype), None, None, (0, 16, 1), 1, None, 1, 1
    write_x = normed or proj is None
    ps, pss = prev_state or (None, None)
    # the dtype of (o + hb): the activation dtype, unless the residual parameters are float32
    rt = mx.float32 if (hs.dtype == mx.float32 or hb.dtype == mx.float32 or dtype == mx.float32) else dtype
    h_into, p_into, z_into = into or (None, None, None)
    if any(a is not None and (a is h or a is o) for a in (h_into, p_into, z_into)):  # other threadgroups read them
        raise ValueError("the residual norm cannot write into its own inputs h or o")
    h_new, x, p, z = launch(
        "residual_norm.h", back,
        [("o", o), ("h", h), ("hs", hs), ("hb", hb), ("rs", rs), ("rb", rb), ("nw", norm_w), ("w", w), ("ws", ws),
         ("wb", wb), ("bp", bias), ("ps", ps), ("pss", pss), ("after", after)],
        [("h_out", shape_or_into(h.shape, h_into), mx.float32),
         ("x_out", tuple(h.shape) if write_x else None, dtype),
         ("p_out", shape_or_into(h.shape[:-1] + (P,), p_into) if proj is not None else None, dtype),
         ("z_out", shape_or_into(h.shape, z_into) if zeros else None, mx.float32)],
        template=[("T", dtype), ("RT", rt), ("H", H), ("HAS_PROJ", proj is not None), ("P", P), ("RPW", rpw),
                  ("QM", qm), ("BITS", bits), ("GS", gs), ("HAS_BIAS", bias is not None),
                  ("HAS_PREV", prev_state is not None), ("NP", parts), ("ZEROS", zeros), ("WRITE_X", write_x),
                  ("EPS", float_bits(eps)), ("NT", _NT)],
        grid=(nblk * _NT, N, 1),
        threadgroup=(_NT, 1, 1),
        pack=("hs", "hb", "rs", "rb", "nw", "bp", "pss"),
    )
    return (h_new, x, p, z) if zeros else (h_new, x, p)


def residual_norm(o, h, hs, hb, rs, rb, norm_w, eps, proj=None, dtype=None, prev_state=None, zeros=False,
                  after=None, normed=True, into=None, *, impl="auto"):
    """Residual scaling + RMSNorm (+ a projection of the normed row, + a carried state, + a zero row); impl:
    'auto', 'kernel' or 'reference'."""
    back = backend()
    args = (o, h, hs, hb, rs, rb, norm_w, eps, proj, dtype, prev_state, zeros, after, normed, into)
    if use_kernel(impl, back, lambda: kernel_supported(o, h, proj, prev_state), "the residual-norm kernel"):
        return residual_norm_kernel(*args, back=back)
    return residual_norm_reference(*args)
