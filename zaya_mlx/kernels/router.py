"""ZAYA router MLP for decode: the fused op and its plain-MLX reference.

After the router's down-projection ``r_down = W_d x + b_d``: ``r = r_down + r_prev * router_states_scale``
(layers >= 1; ``r`` is the state passed to the next layer's router), ``logits =
out(gelu(fc2(gelu(fc1(rmsnorm(r))))))`` over E experts + 1 skip, ``p = softmax(logits)``,
``choice = argmax(p + balancing_biases)``, ``weight = p[choice]``. The kernel (metal/router_mlp.h) does
it in one launch per layer and step, where the reference is about a dozen primitives.
Semantics follow transformers' ``ZayaRouter``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ._build import backend, constant, dummy, get_kernel, use_kernel


def router_mlp_reference(r_down, r_prev, r_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, bal, eps):
    """Plain MLX ops. r_down [N, R]; r_prev [N, R] or None (first layer); r_scale [R] or None; norm_w [R];
    fc1/fc2 [R, R] + bias [R]; out_w [E+1, R]; bal [E+1] float32; eps: the RMSNorm eps.
    Returns (r_next [N, R], choice [N] int32, weight [N] float32): softmax in float32 over the logits."""
    r = r_down
    if r_prev is not None:
        r = r + r_prev * r_scale
    h = mx.fast.rms_norm(r, norm_w, eps)
    h = nn.gelu(mx.addmm(fc1_b, h, fc1_w.T))
    h = nn.gelu(mx.addmm(fc2_b, h, fc2_w.T))
    p = mx.softmax((h @ out_w.T).astype(mx.float32), axis=-1)
    choice = mx.argmax(p + bal, axis=-1).astype(mx.int32)
    weight = mx.take_along_axis(p, choice[..., None], axis=-1)[..., 0]
    return r, choice, weight


_INPUTS = ("rdown", "rprev", "rscale", "nw", "w1", "b1", "w2", "b2", "wo", "bal", "fparams")
_OUTPUTS = ("rnext", "choice", "prob")


def _threads(R: int) -> int:
    """Threads of the threadgroup: 512 for ZAYA's width (1024 would need <= 64 registers each)."""
    return 512 if R >= 256 else 256


def kernel_supported(r_down, fc1_w, fc2_w, out_w) -> bool:
    R = r_down.shape[-1]
    ws = (fc1_w, fc2_w, out_w)
    return (
        all(isinstance(w, mx.array) for w in ws)
        and len({w.dtype for w in ws}) == 1
        and fc1_w.dtype in (mx.bfloat16, mx.float32)
        and R % 8 == 0
        and R <= 1024
        and out_w.shape[0] <= 1024
    )


def router_mlp_kernel(r_down, r_prev, r_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, bal, eps, *, back=None):
    back = back or backend()
    R = r_down.shape[-1]
    N = r_down.size // R
    dtype = r_down.dtype
    ne1 = out_w.shape[0]
    has_prev = r_prev is not None
    nt = _threads(R)
    kern = get_kernel("router_mlp.h", back, _INPUTS, _OUTPUTS)
    outs = kern(
        inputs=[
            r_down,
            r_prev if has_prev else dummy(dtype),
            r_scale if has_prev else dummy(dtype),
            norm_w,
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b.astype(fc1_b.dtype),
            out_w,
            bal if bal.dtype == mx.float32 else bal.astype(mx.float32),
            constant((float(eps),)),
        ],
        template=[
            ("T", dtype),
            ("R", R),
            ("NE1", ne1),
            ("HAS_PREV", has_prev),
            ("WQ", 0 if fc1_w.dtype == mx.bfloat16 else 1),
            ("NT", nt),
        ],
        grid=(N * nt, 1, 1),
        threadgroup=(nt, 1, 1),
        output_shapes=[tuple(r_down.shape), tuple(r_down.shape[:-1]), tuple(r_down.shape[:-1])],
        output_dtypes=[dtype, mx.int32, mx.float32],
    )
    return tuple(outs)


def router_mlp(r_down, r_prev, r_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, bal, eps, *, impl="auto"):
    """The router MLP (see ``router_mlp_reference``); impl: 'auto', 'kernel' or 'reference'."""
    args = (r_down, r_prev, r_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, bal, eps)
    back = backend()
    if use_kernel(impl, back, lambda: kernel_supported(r_down, fc1_w, fc2_w, out_w), "the router kernel"):
        return router_mlp_kernel(*args, back=back)
    return router_mlp_reference(*args)
