"""Where the host's time goes in a fused decode step, native frames included: py-spy on the decode loop.

Batch 1 is bound by the host as much as by the GPU (docs/PERFORMANCE.md): MLX-CUDA's encoding of a step's ~200 nodes and the graph building
take longer than the kernels. This samples the running decode loop's native stacks (MLX's C++ under Python) for a
few seconds after warm-up, then prints which functions the samples are in (self), under (inclusive), and, for the
functions with the most self samples, which functions called them.

    python dev/profile_native.py --rate 20 --seconds 6 --out DIR   # needs py-spy (pip install py-spy) and a GPU
    python dev/profile_native.py --summarize stacks.txt            # the summary of py-spy's raw output

--out also gets the raw stacks, gzipped (native_stacks.txt.gz: small at these rates).

The prompt leaves the KV buffers room for the whole loop: a buffer that grows mid-loop retraces the step functions
which would swamp the profile. Sampling native stacks slows the loop (181 to 57 tok/s at 40 Hz, 2-expert model on
an H100), so use a low rate.
"""

import argparse
import collections
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPT = 4100  # the KV buffers get 8,192 positions (decode.kv_capacity): room for ~4,000 steps


def frame_name(frame: str) -> str:
    """py-spy's "function (path/to/file:line)" as "function [file]": one name for every line of a function."""
    m = re.match(r"^(.*) \(([^()]*)\)$", frame)
    if not m:
        return frame
    where = os.path.basename(m.group(2).rsplit(":", 1)[0])
    return f"{m.group(1)} [{where}]"


def summarize(lines, top: int = 40, callers_of: int = 8, callers: int = 5) -> str:
    """The summary of py-spy's raw output (one "frame;...;frame count" line a distinct stack, outermost first)."""
    self_counts, inclusive, parents = collections.Counter(), collections.Counter(), collections.defaultdict(
        collections.Counter)
    total = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        total += n
        self_counts[frames[-1]] += n
        parents[frames[-1]][frames[-2] if len(frames) > 1 else "(no caller)"] += n
        for f in set(frames):
            inclusive[f] += n
    if total == 0:
        return "no samples\n"

    def pct(n):
        return f"{100 * n / total:6.2f}%"

    out = [f"samples: {total}", "", "# self"]
    out += [f"{pct(n)} {f}" for f, n in self_counts.most_common(top)]
    out += ["", "# callers of the functions with the most self samples (share of all samples)"]
    for f, _ in self_counts.most_common(callers_of):
        out.append(f"{pct(self_counts[f])} {f}")
        out += [f"    {pct(n)} <- {p}" for p, n in parents[f].most_common(callers)]
    out += ["", "# inclusive"]
    out += [f"{pct(n)} {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def decode_loop(model, cache, tok, seconds: float, max_steps: int):
    """Pipelined greedy decode steps for about ``seconds`` (at most max_steps): (tokens/s, steps, last token)."""
    import mlx.core as mx

    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and steps + 10 <= max_steps:
        for _ in range(10):
            tok = mx.argmax(model(tok, cache)[:, -1, :], axis=-1)[:, None].astype(mx.int32)
            mx.async_eval(tok)
        steps += 10
    mx.eval(tok)
    return steps / (time.perf_counter() - t0), steps, tok


def profile(rate: int, seconds: float, experts: int, out_dir: str) -> int:
    spy = shutil.which("py-spy")
    if spy is None:
        print("error: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    import mlx.core as mx

    from zaya_mlx import benchmark
    from zaya_mlx.decode import DecodeOptions, kv_capacity

    config = benchmark.full_config(num_experts=experts)
    model = benchmark.build_zaya(config, "mxfp4")
    model.decode_options = DecodeOptions(fused=True)
    cache = model.make_cache()
    prompt = mx.random.randint(0, config.vocab_size, (1, PROMPT)).astype(mx.int32)
    tok = mx.argmax(model(prompt, cache)[:, -1, :], axis=-1)[:, None].astype(mx.int32)
    mx.eval(tok)
    room = kv_capacity(PROMPT + 1) - PROMPT - 1
    _, warm, tok = decode_loop(model, cache, tok, float("inf"), 20)  # the step functions' trace and compiles
    rate_before, used, tok = decode_loop(model, cache, tok, 3.0, room // 3)
    used += warm
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "stacks.txt")
        proc = subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--native", "--rate", str(rate),
                                 "--duration", str(int(seconds)), "--format", "raw", "--output", raw],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        rate_during, more, tok = decode_loop(model, cache, tok, seconds + 2.0, room - used)
        err = proc.communicate()[1]
        if proc.returncode != 0 or not os.path.exists(raw):
            print(f"error: py-spy failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}",
                  file=sys.stderr)
            return 1
        with open(raw) as fh:
            text = summarize(fh)
        with open(raw, "rb") as fh, gzip.open(os.path.join(out_dir, "native_stacks.txt.gz"), "wb") as gz:
            shutil.copyfileobj(fh, gz)  # the raw stacks too, for a look from another angle afterwards
    head = (f"decode tok/s: {rate_before:.1f} before, {rate_during:.1f} while sampled at {rate} Hz; "
            f"{used + more} steps, no KV growth\n")
    path = os.path.join(out_dir, "native_summary.txt")
    with open(path + ".tmp", "w") as fh:
        fh.write(head + text)
    os.replace(path + ".tmp", path)
    print(head + text, end="")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", metavar="RAW", help="summarise py-spy raw output and exit")
    ap.add_argument("--rate", type=int, default=20, help="samples a second")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--experts", type=int, default=2, help="experts of the full-width model (the step is the same)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for native_summary.txt")
    args = ap.parse_args(argv)
    if args.summarize:
        try:
            with open(args.summarize) as fh:
                print(summarize(fh), end="")
        except OSError as e:
            print(f"error: cannot read {args.summarize}: {e.strerror}", file=sys.stderr)
            return 2
        return 0
    return profile(args.rate, args.seconds, args.experts, args.out)


if __name__ == "__main__":
    sys.exit(main())
