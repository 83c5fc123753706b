"""`zaya bench`'s decode figures with what only a lab run needs: vMLX's port in the same run, the host's floor.

    python dev/bench_lab.py --quant mxfp4 --batch 1 --vmlx path/to/vmlx/models/zaya.py   # ratio to vMLX's port
    python dev/bench_lab.py --quant mxfp4 --batch 1 --host-floor                         # kernel bodies emptied

Prints the benchmark's Markdown table (and writes it, and the JSON, where asked).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dataclasses import replace  # noqa: E402

from lab import bench_vmlx, empty_kernels, load_vmlx_module  # noqa: E402

from zaya_mlx import benchmark, kernels  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="mxfp4", help="comma-separated: bf16, mxfp4, affine4, affine8, mxfp8")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--experts", type=int, default=None, help="fewer experts (a token still reads one)")
    ap.add_argument("--small", action="store_true", help="the few-MB model (a smoke run on a CPU)")
    ap.add_argument("--vmlx", help="vMLX's models/zaya.py, or 'pip' for the installed vmlx package")
    ap.add_argument("--host-floor", action="store_true", help="also time the fused step with its kernel bodies empty")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    batches = tuple(int(b) for b in args.batch.split(","))
    results = benchmark.run(quants=quants, batches=batches, context=args.context, steps=args.steps, small=args.small,
                            experts=args.experts, runs=args.runs)
    config = benchmark.small_config() if args.small else benchmark.full_config()
    if args.experts is not None:
        config = replace(config, num_experts=args.experts)
    for q in quants:
        q = None if q in benchmark.UNQUANTIZED else q
        if args.host_floor and kernels.backend() != "cpu":
            print(f"zaya-mlx {q or 'bf16'} (fused, kernel bodies empty):")
            model = benchmark.build_zaya(config, q)
            with empty_kernels(model):
                results.append(benchmark.bench_zaya(config, q, batches, context=args.context, steps=args.steps,
                                                    check=False, model=model, prefill=False, runs=args.runs,
                                                    label="zaya-mlx (fused, kernel bodies empty)"))
            del model
        if args.vmlx:
            mod = load_vmlx_module(None if args.vmlx == "pip" else args.vmlx)
            print(f"vMLX {q or 'bf16'}:")
            results.append(bench_vmlx(config, q, mod, (1,), args.context, 16, runs=args.runs))
    table = benchmark.markdown(results, "python dev/bench_lab.py " + " ".join(sys.argv[1:]))
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([benchmark.to_dict(r) for r in results], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
