"""Top-1 expert gather for decode: the fused ops and their plain-MLX reference.

For each token, its one selected expert's SwiGLU: ``gate, up = split(W_gu[e] x)`` (gate rows first),
``y = W_down[e](silu(gate) * up) * weight``; the skip choice (index E) gives zero. The kernel
(metal/expert_mlp.h) does both projections in one launch, reading only the selected expert's rows, from
bfloat16/float32 stacks or MLX's quantized layouts (affine 4/8-bit, MXFP4). It replaces mlx-lm's SwitchGLU
path (expand, gather_mm or gather_qmm twice, split, silu, multiply, scale, mask). ``routed_expert_gather``
also chooses the expert, running the router MLP inside the same launch.

Weights are given as a stacked array ``[E, 2I, H]`` / ``[E, H, I]``, or as anything with mlx-lm's
``QuantizedSwitchLinear`` fields (``weight`` packed uint32, ``scales``, ``biases`` or None,
``group_size``, ``bits``, ``mode``): the module itself, or a ``QuantizedStack``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import router as router_op
from ._build import backend, float_bits, launch, use_kernel
from .weights import MAX_K, QuantizedStack, as_stack, chunk_values, kernel_parts, weight_format


def gather_matmul(x, w, idx, rows=None, transposed: bool = False):
    """x [*N, M, K] times the expert matrices ``w[idx]`` ([E, O, K] stack, dense or QuantizedStack; idx [*N]):
    [*N, M, O]. rows: the indices of x's batch entries, ``arange`` shaped as idx, as an array (else MLX makes one in
    the graph). transposed: a dense stack given as [E, K, O] (an evaluated transposed view, so a call builds no
    transpose)."""
    if not isinstance(w, QuantizedStack):
        w_t = w if transposed else w.swapaxes(-1, -2)
        if w.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm takes float32 only: gather the chosen experts' matrices, then matmul
            return x @ mx.take(w_t, idx, axis=0)
        return mx.gather_mm(x, w_t, lhs_indices=rows, rhs_indices=idx)
    return mx.gather_qmm(
        x,
        w.weight,
        w.scales,
        w.biases,
        lhs_indices=rows,
        rhs_indices=idx,
        transpose=True,
        group_size=w.group_size,
        bits=w.bits,
        mode=w.mode,
        global_scale=w.global_scale,
    )


def expert_gather_reference(x, expert, weight, gate_up, down):
    """Top-1 expert SwiGLU in plain MLX ops (what the kernels replace).

    x [N, H] (or [B, 1, H]); expert [N] int32 (E = skip: zero output); weight [N] (the router's
    probability of the choice); gate_up [E, 2I, H] and down [E, H, I], dense or quantized. Returns an
    array of x's shape in float32, its values rounded to x's dtype (the kernel sums its blocks' shares in
    float32; the consumer, residual_norm, rounds to the activation dtype).
    """
    gu, dn = as_stack(gate_up), as_stack(down)
    E = gu.shape[0]
    H = x.shape[-1]
    N = x.size // H
    expert = expert.reshape(N)
    idx = mx.minimum(expert, E - 1)
    h = gather_matmul(x.reshape(N, 1, H), gu, idx)
    gate, up = mx.split(h, 2, axis=-1)
    y = gather_matmul(nn.silu(gate) * up, dn, idx).reshape(N, H)
    y = y * weight.reshape(N, 1).astype(y.dtype)
    y = mx.where((expert < E).reshape(N, 1), y, mx.zeros((), y.dtype)).reshape(x.shape)
    return y.astype(mx.float32)


# --- kernel --------------------------------------------------------------------------------------

_NT = 512
_CW = 32  # intermediate channels a threadgroup: 64 threadgroups for ZAYA's 2048, one 4-bit chunk of a down row
MAX_TILE = 2  # tokens a tile of the grouped form: with 3, a thread's registers pass 128 at ZAYA's widths, the most a
# launch of 512 threads may hold (dev/nvcc_check.py)


def kernel_supported(x, gate_up, down) -> bool:
    gu, dn = as_stack(gate_up), as_stack(down)
    a, b = weight_format(gu), weight_format(dn)
    if a is None or b is None:
        return False
    H = x.shape[-1]
    E, two_i, Hg = gu.shape
    I = two_i // 2
    fits = H <= MAX_K
    return (fits and Hg == H and dn.shape[1:] == (H, I) and H % chunk_values(*a[:2]) == 0 and I % _CW == 0
            and _CW % chunk_values(*b[:2]) == 0)


def _threadgroup_floats(H: int, tokens: int = 1, R: int = 8, ne1: int = 1) -> int:
    """The body's threadgroup memory in floats: a tile of ``tokens`` padded x rows with their gate/up sums and
    SwiGLU, and the router's vectors (R, ne1: the placeholders where the launch does not route)."""
    row = -(-(H + H // 8) // 4) * 4
    return tokens * (row + 3 * _CW) + 2 * (R + R // 32) + ne1 + _NT // 32


def tile_tokens(H: int, qm: int = 0) -> int:
    """Tokens a threadgroup of the grouped form takes at a time: as many padded x rows as fit its 32 KB, at most
    MAX_TILE; one for float32 weights (QM 1), whose chunks hold the fewest values and take the most registers."""
    most = 1 if qm == 1 else MAX_TILE
    return max((t for t in range(1, most + 1) if 4 * _threadgroup_floats(H, t) <= 32768), default=0)


def grouped_kernel_supported(x, gate_up, down) -> bool:
    """The grouped form's check: the one-token form's, and a tile of at least one token in threadgroup memory."""
    return kernel_supported(x, gate_up, down) and tile_tokens(x.shape[-1]) >= 1


def routed_kernel_supported(x, r, router: router_op.RouterWeights, gate_up, down) -> bool:
    """Both kernels' checks, with threadgroup memory for the router's vectors next to the expert's (32 KB)."""
    if not (kernel_supported(x, gate_up, down) and router_op.kernel_supported(r, router)):
        return False
    H, R, ne1 = x.shape[-1], r.shape[-1], router.out_w.shape[0]
    return (router_op.threads(R) == _NT and 4 * _threadgroup_floats(H, 1, R, ne1) <= 32768
            and r.size // R == x.size // H)


def expert_gather_kernel(x, expert, weight, gate_up, down, *, routing=None, into=None, grouped=False, back=None):
    """The fused launch; the result has x's shape ([N, H], or [B, 1, H] for a decode step), float32.
    routing: (r, router.RouterWeights) to choose each token's expert in the launch (expert and weight: None).
    grouped: a threadgroup an (expert, channel block), taking the tokens that chose its expert a tile at a time, so
    each chosen expert's rows are read once for all its tokens (a batch; not with routing).
    into: a float32 zero row of x's shape, made for this launch alone (residual_norm's zeros=True), which the kernel
    adds into in place instead of a new output that MLX fills with zeros first (a launch less). Then the result
    is (into, after): a reader of into must also take ``after`` (residual_norm's after=), so that it runs after the
    adds."""
    # expert and weight may be [N] or [B, 1]: the kernel reads them flat (no reshape in the graph)
    back = back or backend()
    gu, dn = as_stack(gate_up), as_stack(down)
    H = x.shape[-1]
    N = x.size // H
    I = gu.shape[1] // 2
    if routing is None:
        if expert.dtype != mx.int32:
            expert = expert.astype(mx.int32)
        r, router_inputs = None, [None] * len(router_op.INPUT_NAMES)
        router_template = [("TR", mx.float32), ("R", 8), ("NE1", 1), ("WQ", 1), ("REPS", float_bits(1.0))]
    else:
        r, router = routing
        expert, weight, router_inputs = None, None, router.kernel_inputs()
        router_template = [("TR", r.dtype), *router.template()]
    if grouped and routing is not None:
        raise ValueError("the grouped expert kernel takes the tokens' choices, not the router's state")
    wgu, sgu, bgu, (qa, ba, ga) = kernel_parts(gu)
    wd, sd, bd, (qb, bb, gb) = kernel_parts(dn)
    out = launch(
        "expert_mlp.h", back,
        [("x", x), ("expert", expert), ("rweight", weight), ("wgu", wgu), ("sgu", sgu), ("bgu", bgu), ("wd", wd),
         ("sd", sd), ("bd", bd), ("r", r), *zip(router_op.INPUT_NAMES, router_inputs), ("yin", into)],
        [("y", tuple(x.shape) if into is None else (1,), mx.float32)],
        template=[("T", x.dtype), ("H", H), ("I", I), ("CW", _CW), ("QA", qa), ("BA", ba), ("GA", ga),
                  ("QB", qb), ("BB", bb), ("GB", gb), ("NE", gu.shape[0]), ("ROUTED", routing is not None),
                  *router_template, ("IN_PLACE", into is not None), ("NT", _NT), ("GROUPED", grouped),
                  ("NTOK", N if grouped else 0), ("TT", tile_tokens(H, qa) if grouped else 1)],
        grid=((I // _CW) * _NT, gu.shape[0] if grouped else N, 1),
        threadgroup=(_NT, 1, 1),
        init_value=0.0 if into is None else None,
        pack=router_op.PACKED,
    )[0]
    return out if into is None else (into, out)


def _in_place_supported(x, into) -> bool:
    return into is None or (into.dtype == mx.float32 and into.shape == x.shape)


def expert_gather(x, expert, weight, gate_up, down, *, into=None, grouped=False, impl: str = "auto"):
    """Top-1 expert SwiGLU (see ``expert_gather_reference``); impl: 'auto', 'kernel' or 'reference'. With into (see
    expert_gather_kernel), returns (into + the result, after), after None where no kernel wrote into in place.
    grouped: the kernel's grouped form (see expert_gather_kernel), the same function."""
    back = backend()
    supported = grouped_kernel_supported if grouped else kernel_supported
    if use_kernel(impl, back, lambda: supported(x, gate_up, down) and _in_place_supported(x, into),
                  "the expert kernel"):
        return expert_gather_kernel(x, expert, weight, gate_up, down, into=into, grouped=grouped, back=back)
    y = expert_gather_reference(x, expert, weight, gate_up, down)
    return y if into is None else (into + y, None)


def routed_expert_gather_reference(x, r, router: router_op.RouterWeights, gate_up, down):
    """The router MLP on the router state r [..., R] (see router.router_mlp_reference), then the chosen experts."""
    return expert_gather_reference(x, *router_op.router_mlp_reference(r, router), gate_up, down)


def routed_expert_gather(x, r, router: router_op.RouterWeights, gate_up, down, *, into=None, grouped=False,
                         impl: str = "auto"):
    """The router MLP, then top-1 expert SwiGLU (see ``routed_expert_gather_reference``): one launch where the
    expert kernel can route, else the router's op and the experts' op. into: as for ``expert_gather``. grouped:
    the router's op, then the experts' grouped form (every token's choice is known before any expert runs).
    impl: 'auto', 'kernel' or 'reference'."""
    back = backend()
    if not grouped and use_kernel(impl, back, lambda: routed_kernel_supported(x, r, router, gate_up, down)
                                  and _in_place_supported(x, into), "the routed expert kernel"):
        return expert_gather_kernel(x, None, None, gate_up, down, routing=(r, router), into=into, back=back)
    return expert_gather(x, *router_op.router_mlp(r, router, impl=impl), gate_up, down, into=into, grouped=grouped,
                         impl=impl)
