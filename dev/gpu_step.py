"""GPU time of one fused decode step, kernel by kernel, on full-size ZAYA1-8B shapes with random weights.

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --print-kernel-base function \
        --cache-control none --clock-control none python3 dev/gpu_step.py --quant mxfp4 --batch 1 > step.csv
    python3 dev/gpu_step.py --summarize step.csv [--steps 2]

With --cca-apart the CCA step runs in its own launch (the path for shapes attention's launch does not cover), so
one call can time both.

Decode tokens/s on one machine moves by tens of percent from run to run with its host. The GPU's own time
for a step does not: this sums what every kernel of a few decode steps took (Nsight Compute times each launch
alone, so there are no gaps between them), after a prompt and warm-up steps, and splits it by kernel. Only the
profiled steps run between cuProfilerStart and cuProfilerStop.
"""

import argparse
import collections
import csv
import ctypes
import os
import re
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx.core as mx  # noqa: E402

from zaya_mlx.benchmark import build_zaya, fill_context, full_config  # noqa: E402
from zaya_mlx.kernels import attention  # noqa: E402


def _profiler(start: bool) -> None:
    """Start or stop Nsight's collection (CUDA driver API) in MLX's context, the device's primary one."""
    cuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    for call in (lambda: cuda.cuInit(0), lambda: cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0),
                 lambda: cuda.cuCtxSetCurrent(ctx), cuda.cuProfilerStart if start else cuda.cuProfilerStop):
        rc = call()
        if rc != 0:
            raise RuntimeError(f"CUDA driver call failed with error {rc}")


def profile_steps(quant: str, batch: int, context: int, steps: int, experts: int | None, cca_apart: bool) -> None:
    if cca_apart:  # the CCA step in a launch of its own, as for shapes attention's launch does not cover
        attention.cca_kernel_supported = lambda *args, **kwargs: False
    config = full_config()
    if experts:
        config = replace(config, num_experts=experts)
    model = build_zaya(config, None if quant == "bf16" else quant)
    cache = model.make_cache()
    tok = fill_context(model, cache, batch, context, config.vocab_size)  # the prompt, in chunks
    for i in range(3 + steps):  # three warm-up steps (compiles, the first step's KV copy), then these
        if i == 3:
            mx.synchronize()
            _profiler(True)
        logits = model(tok, cache)
        tok = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)
        mx.eval(tok)
    mx.synchronize()
    _profiler(False)


def _family(kernel: str) -> str:
    """A kernel's function name without MLX's prefix and template hash for custom kernels: one line per kind."""
    return re.sub(r"^custom_kernel_|_[0-9a-f]{6,}$", "", kernel.split("(")[0].split("<")[0].strip())


def summarize(path: str, steps: int) -> None:
    """µs of GPU time and launches a step, by kind of kernel, from an ncu --csv file of gpu__time_duration.sum."""
    with open(path) as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    head = rows[0]
    name, value = head.index("Kernel Name"), head.index("Metric Value")
    us, count = collections.Counter(), collections.Counter()
    for row in rows[1:]:
        fam = _family(row[name])
        us[fam] += float(row[value].replace(",", "")) / 1000
        count[fam] += 1
    total = sum(us.values())
    print(f"{total / steps:9.1f} us of GPU time a step, {sum(count.values()) / steps:.0f} launches a step "
          f"({steps} steps)")
    for fam, t in us.most_common():
        print(f"{t / steps:9.1f} us  {count[fam] / steps:6.1f} launches  {fam}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="mxfp4", help="bf16, mxfp4, affine4 or affine8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=256, help="prompt tokens before the profiled steps")
    ap.add_argument("--steps", type=int, default=2, help="decode steps profiled")
    ap.add_argument("--experts", type=int, help="fewer experts, to build faster (a step reads one either way)")
    ap.add_argument("--cca-apart", action="store_true",
                    help="the CCA step in its own launch at every shape (by default inside attention's where "
                    "attention.cca_inside_pays says so)")
    ap.add_argument("--summarize", metavar="CSV", help="print an ncu CSV's GPU time a step by kernel, then exit")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.steps)
    else:
        profile_steps(args.quant, args.batch, args.context, args.steps, args.experts, args.cca_apart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
