"""The graph primitives of a fused decode step as a GPU would build it, on any machine: every kernel launch
stubbed by one primitive (MLX's Depends, on the launch's inputs, of outputs made beforehand), the back end read as
CUDA, so the step's graph has the GPU's shape without a GPU. A 40-layer model of the small config's widths but
ZAYA's router width, 256, which the expert kernel routes at (the count depends on the layers, the weight format and
which launches cover the shapes, not on the widths), batch, expert grouping and attention in chunks as asked.

    python dev/step_primitives.py --batch 16 --group-experts-from off,8
    python dev/step_primitives.py --batch 16 --split --group-experts-from off [--fused-combine]

Not compiled (mx.compile would trace the stubs' outputs as new arrays): the figures compare forms, and a GPU run of
`zaya bench` gives the compiled count.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx.core as mx  # noqa: E402

from zaya_mlx.benchmark import build_zaya, count_primitives, small_config  # noqa: E402
from zaya_mlx.decode import DecodeOptions  # noqa: E402
from zaya_mlx.kernels import _build, attention, kernels_from  # noqa: E402


def stub_kernel(body, inputs, outputs, absent=(), views=(), inplace=()):
    """A launch as one primitive: evaluated zero outputs made to depend on the inputs."""
    def call(*, inputs, output_shapes, output_dtypes, **_):
        outs = [_build.constant((0,) * int(mx.zeros(s).size), d).reshape(s) for s, d in
                zip(output_shapes, output_dtypes)]
        mx.eval(outs)
        return mx.depends(outs, inputs)
    return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--quant", default="mxfp4", help="bf16 or a recipe of zaya quantize")
    ap.add_argument("--group-experts-from", default="off,8", help="comma-separated batch sizes or off")
    ap.add_argument("--split", action="store_true",
                    help="attention in chunks, as over a KV buffer past SINGLE_PASS_MAX positions (the count does "
                         "not depend on the length)")
    ap.add_argument("--fused-combine", action="store_true",
                    help="with --split: the chunks merged in attention's launch (attention.FUSED_COMBINE)")
    args = ap.parse_args(argv)
    small = small_config()
    types = [small.layer_types[i % len(small.layer_types)] for i in range(args.layers)]
    config = dataclasses.replace(small, num_hidden_layers=args.layers, layer_types=types, router_hidden_size=256)
    model = build_zaya(config, None if args.quant == "bf16" else args.quant, seed=0)
    if args.split:
        attention.SINGLE_PASS_MAX = 0
        attention.FUSED_COMBINE = args.fused_combine
    with kernels_from(stub_kernel):
        for g in args.group_experts_from.split(","):
            threshold = None if g.strip() == "off" else int(g)
            model.decode_options = DecodeOptions(fused=True, compile=False, group_experts_from=threshold)
            n, kinds, (ins, outs) = count_primitives(model, model.make_cache, args.batch)
            print(f"batch {args.batch}, {args.quant}, {'attention in chunks, ' if args.split else ''}experts grouped "
                  f"from {g.strip()}: {n} primitives ({kinds.get('Depends', 0)} launches), {ins} inputs, {outs} "
                  f"outputs; {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
