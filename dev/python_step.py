"""The Python time of a fused decode step, on any machine: the step functions stubbed, so what is timed is
FusedDecoder's own work (cache bookkeeping, argument passing) for a 40-layer model.

Batch 1 is bound by the host, and the Python around the compiled step functions is part of it (docs/PERFORMANCE.md).
The stubs return the arrays they are given, so no graph is built and nothing runs on a device.

    python dev/python_step.py --steps 300
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx.core as mx  # noqa: E402

from zaya_mlx import kernels  # noqa: E402
from zaya_mlx.benchmark import build_zaya, small_config  # noqa: E402
from zaya_mlx.decode import DecodeOptions, FusedDecoder  # noqa: E402


def stubbed_steps(decoder, model):
    """Step functions with the real signatures that pass their arrays through."""
    done = mx.zeros((1, 1, model.args.hidden_size), mx.bfloat16)

    def first(tokens, q_into, last, state, v_prev, positions, keys, values, filled, lpad):
        return done, done, keys, values, state, v_prev

    def middle(out, h, r, last, h_attn, h_mlp, r_into, zeros, q_into, state, v_prev, positions, keys, values, filled,
               lpad):
        return h, r, out, keys, values, state, v_prev

    def final(out, h, r, last, *into):
        return done

    return [first] + [middle] * (len(model.layers) - 1) + [final]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=40)
    args = ap.parse_args(argv)
    small = small_config()
    types = [small.layer_types[i % len(small.layer_types)] for i in range(args.layers)]
    config = dataclasses.replace(small, num_hidden_layers=args.layers, layer_types=types)
    model = build_zaya(config, None, seed=0, dtype=mx.bfloat16)
    cache = model.make_cache()
    mx.eval(model(mx.zeros((1, 8), mx.int32), cache))  # the prompt, through the plain ops
    FusedDecoder._step_functions = stubbed_steps
    kernels.backend = lambda: "cuda"
    model.decode_options = DecodeOptions(fused=True)  # no check: the stubs compute nothing
    token = mx.zeros((1, 1), mx.int32)
    for _ in range(5):
        model(token, cache)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model(token, cache)
    print(f"{1e3 * (time.perf_counter() - t0) / args.steps:.3f} ms of Python a step, {args.layers} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
