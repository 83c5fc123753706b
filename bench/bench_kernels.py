"""Each fused decode kernel alone, at ZAYA1-8B's shapes: microseconds a call, kernel against its reference.

A decode step is ~40 layers of these launches, so a kernel's latency, not its bandwidth, is what a step pays.
Each case builds random inputs, then evaluates CALLS independent calls in one graph, best of REPS; the
wall-clock figure includes MLX's per-op host work (several us on MLX-CUDA), so for a kernel's own GPU time run
it under Nsight Compute:

    ncu --metrics gpu__time_duration.sum --csv -k regex:zaya python3 bench/bench_kernels.py --calls 5 > kernels.csv
    python3 bench/bench_kernels.py --summarize kernels.csv    # median us per kernel variant

Usage: python bench/bench_kernels.py [--batch 1,8] [--calls 100] [--only expert,router,...]
"""

import argparse
import collections
import csv
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from zaya_mlx import kernels  # noqa: E402
from zaya_mlx.config import ZayaConfig  # noqa: E402
from zaya_mlx.kernels import attention  # noqa: E402
from zaya_mlx.decode import kv_capacity  # noqa: E402


def _rnd(*shape, scale=1.0, dtype=mx.bfloat16):
    return (mx.random.normal(shape) * scale).astype(dtype)


def cases(cfg: ZayaConfig, B: int, context: int):
    """(name, fn(impl)) for each fused op, with inputs at cfg's shapes and batch B."""
    H, I, E, R = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.router_hidden_size
    NH, NKV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    C = (NH + NKV) * D

    gu = kernels.QuantizedStack.quantize(_rnd(E, 2 * I, H, scale=H**-0.5), group_size=32, bits=4, mode="mxfp4")
    dn = kernels.QuantizedStack.quantize(_rnd(E, H, I, scale=I**-0.5), group_size=32, bits=4, mode="mxfp4")
    x = _rnd(B, H)
    choice = mx.array([(5 + 3 * b) % E for b in range(B)], dtype=mx.int32)
    weight = mx.random.uniform(shape=(B,)).astype(mx.bfloat16)

    r, r_prev = _rnd(B, R), _rnd(B, R)
    router = kernels.RouterWeights(_rnd(R) + 1, _rnd(R, R, scale=R**-0.5), _rnd(R, scale=0.1),
                                   _rnd(R, R, scale=R**-0.5), _rnd(R, scale=0.1), _rnd(E + 1, R, scale=R**-0.5),
                                   mx.random.normal((E + 1,)) * 0.02, 1e-5)
    carried = (r_prev, _rnd(R) + 1)  # the previous layer's router state and its scale
    o, h = _rnd(B, H), mx.random.normal((B, H))
    nparams = [_rnd(H) + 1 for _ in range(5)]
    down = nn.Linear(H, R)  # the router's down-projection (bf16, with a bias)
    down.weight, down.bias = _rnd(R, H, scale=H**-0.5), _rnd(R, scale=0.1)
    in_proj = nn.Linear(H, C + NKV * D, bias=False)  # the next layer's, MXFP4 as `zaya quantize` writes it
    in_proj.weight = _rnd(C + NKV * D, H, scale=H**-0.5)
    in_proj = in_proj.to_quantized(group_size=32, bits=4, mode="mxfp4")

    cap = kv_capacity(context + 1)  # as the fused step sizes its buffers
    q, keys, values = _rnd(B, NH, 1, D), _rnd(B, NKV, cap, D), _rnd(B, NKV, cap, D)

    S = cfg.conv_state_size
    cca = dict(qkv=_rnd(B, C + NKV * D), conv_state=_rnd(B, S, C), v_prev=_rnd(B, NKV * D // 2),
               dw_w=_rnd(C, cfg.cca_time0, 1, scale=0.5), dw_b=_rnd(C, scale=0.1),
               gw_w=_rnd(C, cfg.cca_time1, D, scale=0.1), gw_b=_rnd(C, scale=0.1), temp=_rnd(NKV) + 1)
    layer = cfg.layer_types[0]
    positions = kernels.offset_array(context, B)
    filled = mx.array([context], mx.int32)
    o_proj = nn.Linear(NH * D, H, bias=False)  # MXFP4 as `zaya quantize` writes it
    o_proj.weight = _rnd(H, NH * D, scale=(NH * D) ** -0.5)
    o_proj = o_proj.to_quantized(group_size=32, bits=4, mode="mxfp4")
    mx.eval(gu.weight, gu.scales, dn.weight, dn.scales, x, choice, weight, r, carried, vars(router), o, h, nparams,
            down.parameters(), in_proj.parameters(), o_proj.parameters(), q, keys, values, cca, positions, filled)
    step_kw = dict(n_heads=NH, n_kv_heads=NKV, head_dim=D, rope_dims=cfg.rope_dims(layer),
                   rope_base=cfg.rope_theta(layer))

    def cca_attention(impl, o_proj=None):
        """The CCA step, attention and o_proj: on 'auto', one launch (decode_attention.h with HAS_CCA) where the
        step pays inside attention's launch (attention.cca_inside_pays), else the step's launch and attention's."""
        return kernels.cca_decode_attention(**cca, offset=positions, keys=keys, values=values, filled=filled,
                                            scale=D**-0.5, o_proj=o_proj, impl=impl, **step_kw)[0]

    head = {}

    def lm_head(impl, cache=head):
        """The tied MXFP4 LM head at batch B (built on first use: a vocab x hidden random matrix). 'auto' takes
        the kernel up to kernels.head.MAX_ROWS rows and MLX's quantized matmul above."""
        if not cache:
            emb = nn.Embedding(cfg.vocab_size, H)
            emb.weight = _rnd(cfg.vocab_size, H, scale=H**-0.5)
            cache["layer"] = emb.to_quantized(group_size=32, bits=4, mode="mxfp4")
            mx.eval(cache["layer"].parameters())
        return kernels.lm_head(x[:, None], cache["layer"], impl=impl)

    return [
        ("LM head", lm_head),
        ("expert MLP (gate/up + down)", lambda impl: kernels.expert_gather(x, choice, weight, gu, dn, impl=impl)),
        ("expert MLP with its router", lambda impl: kernels.routed_expert_gather(x, r, router, gu, dn, impl=impl)),
        ("expert MLP grouped by expert", lambda impl: kernels.expert_gather(x, choice, weight, gu, dn, grouped=True,
                                                                             impl=impl)),
        ("router MLP, then the experts grouped", lambda impl: kernels.routed_expert_gather(x, r, router, gu, dn,
                                                                                            grouped=True, impl=impl)),
        ("router MLP", lambda impl: kernels.router_mlp(r, router, impl=impl)[0]),
        ("residual + norm + router down", lambda impl: kernels.residual_norm(o, h, *nparams[:4], nparams[4], 1e-5, down,
                                                                           prev_state=carried, impl=impl)[2]),
        ("residual + norm + in_proj", lambda impl: kernels.residual_norm(o, h, *nparams[:4], nparams[4], 1e-5, in_proj,
                                                                       impl=impl)[2]),
        ("residual + norm", lambda impl: kernels.residual_norm(o, h, *nparams[:4], nparams[4], 1e-5, impl=impl)[1]),
        ("CCA step", lambda impl: kernels.cca_decode_step(**cca, offset=positions, keys=keys, values=values,
                                                           filled=filled, impl=impl, **step_kw)[0]),
        (f"attention, {context} keys", lambda impl: kernels.decode_attention(q, keys, values, filled, scale=D**-0.5,
                                                                             impl=impl)),
        (f"attention + o_proj, {context} keys", lambda impl: kernels.decode_attention(
            q, keys, values, filled, scale=D**-0.5, o_proj=o_proj, impl=impl)),
        (f"CCA step + attention, {context} keys", cca_attention),
        (f"CCA step + attention + o_proj, {context} keys", lambda impl: cca_attention(impl, o_proj)),
    ]


def time_calls(fn, calls: int, reps: int) -> float:
    """Microseconds a call: `calls` independent calls evaluated together, best of `reps`."""
    mx.eval(fn())  # compile
    best = None
    for _ in range(reps):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(calls)])
        mx.synchronize()
        dt = (time.perf_counter() - t0) / calls * 1e6
        best = dt if best is None else min(best, dt)
    return best


def summarize(path: str) -> None:
    """Median GPU microseconds per kernel variant and grid in an ncu --csv file of gpu__time_duration.sum. The
    grid tells batch sizes apart (a kernel's template does not name the batch)."""
    with open(path) as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    head = rows[0]
    name, grid, value = head.index("Kernel Name"), head.index("Grid Size"), head.index("Metric Value")
    times = collections.defaultdict(list)
    for row in rows[1:]:
        kernel = re.sub(r"^custom_kernel_", "", row[name].split("(")[0])
        times[(kernel, row[grid])].append(float(row[value].replace(",", "")) / 1000)
    for (kernel, g), us in times.items():
        print(f"{statistics.median(us):8.1f} us  (n={len(us)})  grid {g:14s} {kernel}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--context", type=int, default=256, help="keys attention reads")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated words a case name must contain one of")
    ap.add_argument("--summarize", metavar="CSV", help="print an ncu CSV's median time per kernel, then exit")
    ap.add_argument("--o-proj-threadgroups", type=int, metavar="N",
                    help="attention with o_proj: spread o_proj's rows over N threadgroups (default: the library's)")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if args.o_proj_threadgroups:
        attention.O_PROJ_THREADGROUPS = args.o_proj_threadgroups
    back = kernels.backend()
    print(f"device {mx.default_device()}, kernels on: {back}")
    cfg = ZayaConfig()
    only = [w for w in args.only.split(",") if w]
    for B in (int(b) for b in args.batch.split(",")):
        for name, fn in cases(cfg, B, args.context):
            if only and not any(w in name for w in only):
                continue
            ker = time_calls(lambda: fn("auto"), args.calls, args.reps)
            ref = time_calls(lambda: fn("reference"), args.calls, args.reps)
            print(f"B={B:<2d} {name:44s} fused {ker:8.1f} us/call   reference {ref:8.1f} us/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
