"""Decode speed with the fused step's in-place outputs on and off, alternating in one process.

Separate processes on one lent machine differ by tens of percent (bench/RESULTS.md), more than the change being
measured; in one process both settings share the host's state. Each round times both settings (``ZAYA_IN_PLACE``,
see zaya_mlx/model.py), in alternating order, on one model.

    python bench/ab_in_place.py --rounds 6 --steps 200       # 40 layers, full width, MXFP4, 2 experts
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zaya_mlx import benchmark  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--small", action="store_true", help="the few-MB model (a smoke run on a CPU)")
    args = ap.parse_args(argv)
    config = benchmark.small_config() if args.small else benchmark.full_config(num_experts=2)
    model = benchmark.build_zaya(config, "mxfp4")
    os.environ["ZAYA_FUSED"] = "1"
    rates = {"1": [], "0": []}
    for r in range(args.rounds):
        for setting in ("1", "0") if r % 2 == 0 else ("0", "1"):
            os.environ["ZAYA_IN_PLACE"] = setting
            tps = benchmark.time_decode(model, model.make_cache, args.batch, args.context, args.steps,
                                        config.vocab_size)
            rates[setting].append(tps)
            print(f"round {r} in place {setting}: {tps:.1f} tok/s "
                  f"(graph building {benchmark.BUILD_MS[args.batch]:.2f} ms/step)", flush=True)
    on, off = statistics.median(rates["1"]), statistics.median(rates["0"])
    print(f"median tok/s: in place {on:.1f}, new outputs {off:.1f}, ratio {on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
