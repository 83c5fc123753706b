"""ZAYA router MLP for decode: the fused op and its plain-MLX reference.

From the router state ``r`` (the router's down-projection plus, from the second layer on, the previous layer's
state times ``router_states_scale``; ``kernels.residual_norm`` adds that with its ``prev_state``):
``logits = out(gelu(fc2(gelu(fc1(rmsnorm(r))))))`` over E experts + 1 skip, ``p = softmax(logits)``,
``choice = argmax(p + balancing_biases)``, ``weight = p[choice]``. The kernel (metal/router_mlp.h) does it in
one launch per layer and step, where the reference is about a dozen primitives; the expert kernel runs the same
code itself (``experts.routed_expert_gather``). Semantics follow transformers' ``ZayaRouter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ._build import backend, float_bits, launch, use_kernel


@dataclass(frozen=True)
class RouterWeights:
    """A layer's router MLP as the kernels read it: norm_w [R], fc1_w/fc2_w [R, R] + biases [R], out_w [E+1, R]
    (dense), bal [E+1] (the balancing biases) and the RMSNorm's eps."""

    norm_w: mx.array
    fc1_w: mx.array
    fc1_b: mx.array
    fc2_w: mx.array
    fc2_b: mx.array
    out_w: mx.array
    bal: mx.array
    eps: float

    def kernel_inputs(self) -> list:
        """The kernels' inputs (INPUT_NAMES); the vectors among them travel packed in float32 (PACKED)."""
        return [self.norm_w, self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b, self.out_w, self.bal]

    def template(self) -> list:
        """The kernels' template arguments for the router's shape, weights and eps: R, NE1, WQ, REPS."""
        return [("R", self.fc1_w.shape[0]), ("NE1", self.out_w.shape[0]),
                ("WQ", 0 if self.fc1_w.dtype == mx.bfloat16 else 1), ("REPS", float_bits(self.eps))]


def router_mlp_reference(r, router: RouterWeights):
    """Plain MLX ops. r [..., R] (the router state). Returns (choice [...] int32, weight [...] float32): softmax in
    float32 over the logits."""
    h = mx.fast.rms_norm(r, router.norm_w, router.eps)
    h = nn.gelu(mx.addmm(router.fc1_b, h, router.fc1_w.T))
    h = nn.gelu(mx.addmm(router.fc2_b, h, router.fc2_w.T))
    p = mx.softmax((h @ router.out_w.T).astype(mx.float32), axis=-1)
    choice = mx.argmax(p + router.bal, axis=-1).astype(mx.int32)
    weight = mx.take_along_axis(p, choice[..., None], axis=-1)[..., 0]
    return choice, weight


INPUT_NAMES = ("nw", "w1", "b1", "w2", "b2", "wo", "bal")  # RouterWeights.kernel_inputs, in order
PACKED = ("nw", "b1", "b2", "bal")  # the vectors, which the kernels read as float32 (_build.launch's pack)


def threads(R: int) -> int:
    """Threads of a threadgroup that routes a token: 512 for ZAYA's width (1024 would need <= 64 registers each)."""
    return 512 if R >= 256 else 256


def kernel_supported(r, router: RouterWeights) -> bool:
    ws = (router.fc1_w, router.fc2_w, router.out_w)
    R = r.shape[-1]
    return (
        all(isinstance(w, mx.array) for w in ws)
        and len({w.dtype for w in ws}) == 1
        and router.fc1_w.dtype in (mx.bfloat16, mx.float32)
        and router.fc1_w.shape == (R, R)
        and R % 8 == 0
        and R <= 1024
        and router.out_w.shape[0] <= 1024
    )


def router_mlp_kernel(r, router: RouterWeights, *, back=None):
    back = back or backend()
    R = r.shape[-1]
    N = r.size // R
    nt = threads(R)
    return tuple(launch(
        "router_mlp.h", back, [("r", r), *zip(INPUT_NAMES, router.kernel_inputs())],
        [("choice", tuple(r.shape[:-1]), mx.int32), ("prob", tuple(r.shape[:-1]), mx.float32)],
        template=[("T", r.dtype), *router.template(), ("NT", nt)],
        grid=(N * nt, 1, 1),
        threadgroup=(nt, 1, 1),
        pack=PACKED,
    ))


def router_mlp(r, router: RouterWeights, *, impl="auto"):
    """The router MLP (see ``router_mlp_reference``); impl: 'auto', 'kernel' or 'reference'."""
    back = backend()
    if use_kernel(impl, back, lambda: kernel_supported(r, router), "the router kernel"):
        return router_mlp_kernel(r, router, back=back)
    return router_mlp_reference(r, router)
