"""How far a quantized KV cache moves a checkpoint's next-token distributions (benchmark.kv_divergence).

    python bench/kv_quality.py --model PATH --prompt 40 --steps 200 --kv 8,4

A random prompt of --prompt tokens, then --steps greedy tokens chosen on the model's own cache and fed alike to a
quantized one; prints, for each format, KL(p_own || p_quantized) in nats a position (mean, 99th percentile,
largest) and the share of positions whose greedy choice agrees. docs/kv-cache.md gives the figures.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx.core as mx  # noqa: E402

from zaya_mlx.benchmark import kv_divergence  # noqa: E402
from zaya_mlx.kv_cache import parse_kv  # noqa: E402
from zaya_mlx.loading import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint folder (any layout)")
    ap.add_argument("--prompt", type=int, default=40, help="random prompt tokens")
    ap.add_argument("--steps", type=int, default=200, help="greedy tokens after the prompt")
    ap.add_argument("--kv", default="8,4", help="comma-separated bits")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = load_model(args.model)
    mx.random.seed(args.seed)
    prompt = mx.random.randint(3, model.args.vocab_size, (1, args.prompt)).astype(mx.int32)
    for bits in (parse_kv(k) for k in args.kv.split(",")):
        kls, agree = kv_divergence(model, prompt, args.steps, bits)
        ranked = sorted(kls)
        print(f"{bits}-bit KV: KL mean {sum(kls) / len(kls):.2e}, p99 {ranked[int(0.99 * (len(kls) - 1))]:.2e}, "
              f"max {ranked[-1]:.2e} nats; greedy choice agrees at {agree:.1%} of {len(kls)} positions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
