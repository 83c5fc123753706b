"""Residual scaling + RMSNorm (+ the router's down-projection) for decode: fused op and reference.

ZAYA's residual step is ``h = (o + b_o) * s_o + (h + b_h) * s_h`` with the residual stream ``h`` in
float32, followed by an RMSNorm of ``h`` cast to the activation dtype; after attention the MoE router's
down-projection ``W_d x + b_d`` reads that normalised ``x`` too. The kernel (metal/residual_norm.h)
does the three in one launch, where the plain path takes about seven primitives.
Semantics follow transformers' ``ZayaResidualScaling`` and ``ZayaRMSNorm``.
"""

from __future__ import annotations

import mlx.core as mx

from ._build import backend, constant, dummy, get_kernel, use_kernel


def residual_norm_reference(o, h, hs, hb, rs, rb, norm_w, eps, router_w=None, router_b=None, dtype=None):
    """Plain MLX ops. o [..., H] (attention or MoE output), h [..., H] float32 (the residual stream),
    hs/hb/rs/rb [H] (hidden_states_scale/bias, residual_scale/bias), norm_w [H], eps; dtype: the activation
    dtype when o comes in float32 (the expert kernel's sum), which o is rounded to first (default: o's).
    Returns (h_new float32, x = rmsnorm(h_new), r_down = router_w x + router_b or None)."""
    if dtype is not None:
        o = o.astype(dtype)
    h_new = (o + hb) * hs + (h + rb) * rs
    x = mx.fast.rms_norm(h_new.astype(o.dtype), norm_w, eps)
    r = None if router_w is None else mx.addmm(router_b, x, router_w.T)
    return h_new, x, r


_INPUTS = ("o", "h", "hs", "hb", "rs", "rb", "nw", "wd", "bd", "fparams")
_OUTPUTS = ("h_out", "x_out", "r_out")
_NT = 256
_RPB = 8  # router rows a threadgroup: one a SIMD group, 32 threadgroups for ZAYA's 256


def kernel_supported(o, h, router_w=None) -> bool:
    H = o.shape[-1]
    ok = h.dtype == mx.float32 and H % 8 == 0 and H <= 7168  # the padded row in 32 KB of threadgroup memory
    if router_w is not None:
        ok = ok and isinstance(router_w, mx.array) and router_w.dtype in (mx.bfloat16, mx.float32)
        ok = ok and H * router_w.dtype.size <= 8192  # a SIMD group holds its router row in registers
    return ok


def residual_norm_kernel(o, h, hs, hb, rs, rb, norm_w, eps, router_w=None, router_b=None, dtype=None, *, back=None):
    back = back or backend()
    H = o.shape[-1]
    N = o.size // H
    dtype = dtype or o.dtype
    has_router = router_w is not None
    R = router_w.shape[0] if has_router else 1
    nblk = (R + _RPB - 1) // _RPB if has_router else 1
    # the dtype of (o + hb): the activation dtype, unless the residual parameters are float32
    rt = mx.float32 if (hs.dtype == mx.float32 or hb.dtype == mx.float32 or dtype == mx.float32) else dtype
    kern = get_kernel("residual_norm.h", back, _INPUTS, _OUTPUTS)
    outs = kern(
        inputs=[
            o,
            h,
            hs,
            hb,
            rs,
            rb,
            norm_w,
            router_w if has_router else dummy(dtype),
            router_b if has_router else dummy(dtype),
            constant((float(eps),)),
        ],
        template=[
            ("T", dtype),
            ("RT", rt),
            ("H", H),
            ("HAS_ROUTER", has_router),
            ("R", R),
            ("RPB", _RPB),
            ("WQ", 0 if (not has_router or router_w.dtype == mx.bfloat16) else 1),
            ("NT", _NT),
        ],
        grid=(nblk * _NT, N, 1),
        threadgroup=(_NT, 1, 1),
        output_shapes=[tuple(h.shape), tuple(o.shape), tuple(o.shape[:-1]) + (R,) if has_router else (1,)],
        output_dtypes=[mx.float32, dtype, dtype],
    )
    return outs[0], outs[1], (outs[2] if has_router else None)


def residual_norm(o, h, hs, hb, rs, rb, norm_w, eps, router_w=None, router_b=None, dtype=None, *, impl="auto"):
    """Residual scaling + RMSNorm (+ router down-projection); impl: 'auto', 'kernel' or 'reference'."""
    back = backend()
    if use_kernel(impl, back, lambda: kernel_supported(o, h, router_w), "the residual-norm kernel"):
        return residual_norm_kernel(o, h, hs, hb, rs, rb, norm_w, eps, router_w, router_b, dtype, back=back)
    return residual_norm_reference(o, h, hs, hb, rs, rb, norm_w, eps, router_w, router_b, dtype)
