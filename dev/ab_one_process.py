"""Decode speed with one change on and off, alternating in one process.

Separate processes on one machine differ by tens of percent, more than the changes being
measured; in one process both sides share the host's state. Each round times both sides, in alternating order, on
one model. The changes:

- ``source``: the kernel sources as assembled (compacted, only the helpers a body reaches) or whole, every helper
  and comment in each (MLX-CUDA hashes a kernel's source at every launch);
- ``include``: on CUDA, the helpers and the body as includes of saved files (as assembled) or inline;
- ``bodies``: the kernels as they are, or with their bodies emptied (lab.empty_kernels): how much of a step
  the GPU's work adds to the host's floor; with ``--bodies``, only those kernels' (how much of a step is theirs,
  without ncu), several sets in the same rounds with ``;``;
- ``cca-inside``: the CCA step inside attention's launch wherever the kernel covers it, or never (by default
  attention.cca_inside_pays chooses by shape);
- ``fused``: the fused decode step, or the plain decode step (decode/plain.py);
- ``heads``: with the CCA step in its own launch, attention serving all query heads of a KV head in one
  threadgroup (each key read once, 256 threads), or one query head a threadgroup;
- ``head-rows``: the LM head's kernel (metal/matvec.h) for up to head.MAX_ROWS rows and MLX's quantized matmul
  beyond, as it is, or the kernel up to 32 rows (at batch 8-32);
- ``attention``: attention's launch shape as it is, or as each of ``--configs`` sets it, in the same rounds: the
  attention module's constants, e.g. ``CHUNK=2048`` (keys a threadgroup past one pass: fewer, longer chunks merge
  less but fill fewer SMs), ``LANES_PER_KEY=16`` (two keys a SIMD group, a 16-byte load a lane), ``FUSED_COMBINE=1``
  (on CUDA, the chunks merged in attention's launch: a launch less a layer) or
  ``HEADS_PER_THREADGROUP=4,CHUNK=256`` (each key read once a KV head, in more chunks). With the CCA step inside
  attention's launch, one query head a threadgroup whatever the setting.

    python dev/ab_one_process.py --what source --rounds 6 --steps 200    # 40 layers, full width, MXFP4, 2 experts
    python dev/ab_one_process.py --what include --experts 16            # ZAYA1-8B's full size
"""

import argparse
import copy
import dataclasses
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lab import empty_kernels, reset_kernels  # noqa: E402

from zaya_mlx import benchmark  # noqa: E402
from zaya_mlx.decode import DecodeOptions  # noqa: E402
from zaya_mlx.kernels import _build, attention, head  # noqa: E402

ASSEMBLED = _build.kernel_source
SAVED = _build.saved_file


def whole_source(body, back, absent=(), views=(), inplace=()):
    """A kernel's source with every helper and comment, not compacted to what its body reaches."""
    header, prologue = _build._prelude(back)
    return (header + "\n" + _build._source("common.h"),
            prologue + "\n" + _build.declarations(absent, views, inplace) + _build._source(body))


def set_source(model, on: bool):
    _build.kernel_source = ASSEMBLED if on else whole_source
    reset_kernels(model)


def set_include(model, on: bool):
    _build.saved_file = SAVED if on else (lambda text: None)
    reset_kernels(model)


_EMPTIED = []  # the entered empty_kernels, while the bodies are off


def set_bodies(model, on: bool, bodies=None):
    """The kernels as they are (on), or with ``bodies`` (default: all) emptied."""
    while _EMPTIED:
        _EMPTIED.pop().__exit__(None, None, None)
    if not on:
        _EMPTIED.append(empty_kernels(model, bodies))
        _EMPTIED[-1].__enter__()


def set_cca_inside(model, on: bool):
    """The CCA step inside attention's launch wherever the kernel covers it, or never (whatever it pays)."""
    attention.cca_inside_pays = lambda *args, **kwargs: on
    reset_kernels(model)


HEADS = attention.HEADS_PER_THREADGROUP


def set_heads(model, on: bool):
    """The CCA step in its own launch either way; attention with every query head of a KV head in one threadgroup
    (each key and value read once a chunk) or one a threadgroup."""
    attention.HEADS_PER_THREADGROUP = 8 if on else HEADS
    set_cca_inside(model, False)


def set_fused(model, on: bool):
    """The fused decode step (its kernels), or the plain decode step (MLX ops only): what a GPU whose kernels failed
    their check runs."""
    model.decode_options = dataclasses.replace(model.decode_options, fused=on)


ATTENTION = {name: getattr(attention, name) for name in ("CHUNK", "SINGLE_PASS_MAX", "HEADS_PER_THREADGROUP",
                                                          "LANES_PER_KEY", "FUSED_COMBINE", "O_PROJ_THREADGROUPS",
                                                          "CCA_INSIDE_MAX_REPEATS")}


def set_attention(model, on: bool, config: str = ""):
    """Attention's constants as they are (on), or as ``config`` sets them (NAME=VALUE, comma-separated)."""
    for name, value in ATTENTION.items():
        setattr(attention, name, value)
    for item in ([] if on else config.split(",")):
        name, value = item.split("=")
        if name not in ATTENTION:
            raise SystemExit(f"--configs: {name} is not one of {', '.join(ATTENTION)}")
        setattr(attention, name, int(value))
    reset_kernels(model)


HEAD_ROWS = head.MAX_ROWS


def set_head_rows(model, on: bool):
    """The LM head's kernel up to head.MAX_ROWS rows as it is, or up to 32."""
    head.MAX_ROWS = HEAD_ROWS if on else 32
    reset_kernels(model)


CHANGES = {"source": set_source, "include": set_include, "bodies": set_bodies,
           "cca-inside": set_cca_inside, "heads": set_heads, "fused": set_fused, "attention": set_attention,
           "head-rows": set_head_rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=sorted(CHANGES), default="source")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--experts", type=int, default=2, help="experts a layer (16: ZAYA1-8B's; a step reads one)")
    ap.add_argument("--small", action="store_true", help="the few-MB model (a smoke run on a CPU)")
    ap.add_argument("--bodies", default="", help="with --what bodies: the kernel bodies to empty, e.g. "
                    "expert_mlp.h or decode_attention.h,attention_combine.h (default: all); several sets separated "
                    "by ';' are each timed against the step as it is, in the same rounds")
    ap.add_argument("--configs", default="CHUNK=1024;CHUNK=2048", help="with --what attention: settings of the "
                    "attention module's constants (NAME=VALUE, comma-separated), several separated by ';', each timed "
                    "against the constants as they are, in the same rounds")
    args = ap.parse_args(argv)
    change = CHANGES[args.what]
    variants = [(f"{args.what} on", functools.partial(change, on=True)),
                (f"{args.what} off", functools.partial(change, on=False))]
    if args.what == "bodies" and args.bodies:
        variants = [("as is", functools.partial(set_bodies, on=True))] + [
            (f"{b} emptied", functools.partial(set_bodies, on=False, bodies=tuple(b.split(","))))
            for b in args.bodies.split(";")]
    if args.what == "attention":
        variants = [("as it is", functools.partial(set_attention, on=True))] + [
            (c, functools.partial(set_attention, on=False, config=c)) for c in args.configs.split(";")]
    config = benchmark.small_config() if args.small else benchmark.full_config(num_experts=args.experts)
    model = benchmark.build_zaya(config, "mxfp4")
    model.decode_options = DecodeOptions(fused=True)
    # one prompt for every run, each from a copy of its cache: at 16 x 16,384 a prefill takes longer than a run
    t0 = time.perf_counter()
    prompt = model.make_cache()
    first = benchmark.fill_context(model, prompt, args.batch, args.context, config.vocab_size)
    print(f"prompt: {args.batch} x {args.context} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    rates = {name: [] for name, _ in variants}
    for r in range(args.rounds):
        for name, setter in variants if r % 2 == 0 else variants[::-1]:
            setter(model)
            timing, _ = benchmark.decode_run(model, copy.deepcopy(prompt), first, args.steps, warmup=3)
            rates[name].append(timing.tps)
            print(f"round {r} {name}: {timing.tps:.1f} tok/s (graph building {timing.build_ms:.2f} ms/step)",
                  flush=True)
    base_name = variants[0][0]
    base = statistics.median(rates[base_name])
    for name, _ in variants[1:]:
        other = statistics.median(rates[name])
        share = f" (their share of the step: {1 - base / other:.1%})" if args.what == "bodies" else ""
        print(f"median tok/s: {base_name} {base:.1f}, {name} {other:.1f}, ratio {base / other:.3f}{share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
