"""Peak memory of `zaya quantize`, and of the first run's MXFP4 copy, against the source shard size (a benchmark,
not a test).

Writes one random bf16 ZAYA checkpoint in transformers' layout (the layout of `Zyphra/ZAYA1-8B`: q/k/v split,
torch conv layout, stacked experts), re-sharded at several shard sizes, and quantizes each copy in a fresh
process, recording the process's peak RSS over its RSS just before quantizing and MLX's own peak allocation.
The quantizer reads tensors shard by shard and streams its output to disk, so the peak should follow the
source shard size, not the model size; an mlx-lm style convert (load all, quantize, save) holds the whole
model (and its quantized copy) instead. The first run's copy (`model_cache.make_copy`) fetches each shard from a
local stand-in for the hub, quantizes it and writes it as one part, so its peak should follow the shard size too.

    python bench/bench_quantize.py                       # ~0.9 GB model, shards of 100/250/500/1000 MB
    python bench/bench_quantize.py --layers 4 --shards 64 128 --recipe mixed
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _status_mb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory now (Linux); elsewhere the peak so far."""
    now = _status_mb("VmRSS")
    return peak_rss_mb() if now is None else now


def peak_rss_mb() -> float:
    """Peak resident memory of this process image. On Linux VmHWM, not ru_maxrss: ru_maxrss survives exec and
    so starts at the parent's RSS when it forked us."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def write_checkpoint(folder: Path, args) -> tuple[int, int]:
    """A random bf16 checkpoint in transformers' layout, all tensors in one file first; returns (bytes, params)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from zaya_mlx import layouts
    from zaya_mlx.config import ZayaConfig
    from zaya_mlx.model import Model

    cfg = ZayaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.hidden // 128, num_key_value_heads=2, head_dim=128,
                     moe_intermediate_size=args.intermediate, num_experts=16, router_hidden_size=256)
    model = Model(cfg)  # lazy random init
    canonical = dict(tree_flatten(model.parameters()))
    d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    sizes = [nh * d, nkv * d, nkv * d // 2, nkv * d // 2]
    tensors = {}
    for name, src in layouts.transformers_map(cfg).items():  # invert the loader's map
        a = canonical[name].astype(mx.float32 if name.endswith("balancing_biases") else mx.bfloat16)
        if src.combine is layouts.concat_rows:
            bounds = [sum(sizes[: i + 1]) for i in range(3)]
            for part_name, part in zip(src.names, mx.split(a, bounds, axis=0)):
                tensors[part_name] = part
        elif src.combine is layouts.conv_to_mlx:
            tensors[src.names[0]] = a.swapaxes(1, 2)
        else:
            tensors[src.names[0]] = a
    folder.mkdir(parents=True)
    config = cfg.to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    total = params = 0
    from zaya_mlx.quantization import _ShardWriter

    writer = _ShardWriter(folder, 1 << 62)
    for name, a in tensors.items():
        mx.eval(a)
        writer.add(name, a)
        total += a.nbytes
        params += a.size
    writer.finish(params)
    return total, params


def reshard(src: Path, dst: Path, shard_bytes: int) -> int:
    import mlx.core as mx

    from zaya_mlx.quantization import _ShardWriter

    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    writer = _ShardWriter(dst, shard_bytes)
    for f in sorted(src.glob("model-*.safetensors")):
        for name, a in mx.load(str(f)).items():
            writer.add(name, a)
    return len(writer.finish(0))


def worker(src: str, out: str, recipe: str) -> None:
    import mlx.core as mx

    import zaya_mlx

    base = rss_mb()
    mx.reset_peak_memory()
    t = time.perf_counter()
    report = zaya_mlx.quantize(src, out, recipe=recipe)
    print(json.dumps({"base_rss_mb": base, "peak_rss_mb": peak_rss_mb(), "mlx_peak_mb": mx.get_peak_memory() / 1e6,
                      "seconds": time.perf_counter() - t, "out_bytes": report.bytes, "bpw": report.bits_per_weight}))


def first_run_worker(src: str, out: str, recipe: str) -> None:
    """`model_cache.make_copy` with `hf_hub_download` answered from the folder `src` (a local stand-in for the hub)."""
    import huggingface_hub
    import mlx.core as mx

    from zaya_mlx import model_cache

    def hf_hub_download(repo_id, filename, local_dir, **kwargs):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        return shutil.copy(Path(src) / filename, Path(local_dir) / filename)

    huggingface_hub.hf_hub_download = hf_hub_download
    base = rss_mb()
    mx.reset_peak_memory()
    t = time.perf_counter()
    model_cache.make_copy("bench/zaya", Path(src), Path(out), recipe)
    print(json.dumps({"base_rss_mb": base, "peak_rss_mb": peak_rss_mb(), "mlx_peak_mb": mx.get_peak_memory() / 1e6,
                      "seconds": time.perf_counter() - t}))


def whole_model_worker(src: str) -> None:
    """The mlx-lm `convert` way, for comparison: load the whole model, quantize it in memory (then it would save)."""
    import mlx.core as mx
    import mlx.nn as nn

    import zaya_mlx

    base = rss_mb()
    mx.reset_peak_memory()
    t = time.perf_counter()
    model = zaya_mlx.load_model(src)
    nn.quantize(model, 32, 4, mode="mxfp4", class_predicate=lambda p, m: hasattr(m, "to_quantized") and ".gate." not in p)
    mx.eval(model.parameters())
    print(json.dumps({"base_rss_mb": base, "peak_rss_mb": peak_rss_mb(), "mlx_peak_mb": mx.get_peak_memory() / 1e6,
                      "seconds": time.perf_counter() - t}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--shards", type=float, nargs="+", default=[100, 250, 500, 1000], help="source shard sizes, MB")
    p.add_argument("--recipe", default="mxfp4")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    p.add_argument("--worker", nargs=3, metavar=("SRC", "OUT", "RECIPE"), help=argparse.SUPPRESS)
    p.add_argument("--whole-model-worker", metavar="SRC", help=argparse.SUPPRESS)
    p.add_argument("--first-run-worker", nargs=3, metavar=("SRC", "OUT", "RECIPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.first_run_worker:
        return first_run_worker(*args.first_run_worker)
    if args.whole_model_worker:
        return whole_model_worker(args.whole_model_worker)

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="zaya-bench-quantize-"))
    try:
        full = scratch / "full"
        model_bytes, params = write_checkpoint(full, args)
        print(f"model: {params / 1e6:.0f} M params, {model_bytes / 1e6:.0f} MB bf16, {args.layers} layers, "
              f"recipe {args.recipe}")
        print(f"{'src shard MB':>12} {'shards':>6} {'largest tensor MB':>17} {'peak RSS - base MB':>18} "
              f"{'MLX peak MB':>11} {'peak/shard':>10} {'peak/model':>10} {'s':>5} {'first-run peak/shard':>20}")
        from zaya_mlx.loading import open_checkpoint

        largest = max(_numel(shape) * (4 if dtype == "F32" else 2)
                      for shape, dtype in open_checkpoint(full).tensors.values()) / 1e6
        for mb in args.shards:
            src = scratch / f"src-{mb:g}"
            n = reshard(full, src, int(mb * 1e6))
            out = scratch / f"out-{mb:g}"
            res = subprocess.run([sys.executable, __file__, "--worker", str(src), str(out), args.recipe],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            peak = r["peak_rss_mb"] - r["base_rss_mb"]
            shard_mb = min(mb, model_bytes / 1e6)
            copy = scratch / f"copy-{mb:g}"
            res = subprocess.run([sys.executable, __file__, "--first-run-worker", str(src), str(copy), args.recipe],
                                 capture_output=True, text=True, check=True)
            f = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{mb:>12g} {n:>6} {largest:>17.0f} {peak:>18.0f} {r['mlx_peak_mb']:>11.0f} "
                  f"{peak / shard_mb:>10.2f} {peak / (model_bytes / 1e6):>10.2f} {r['seconds']:>5.1f} "
                  f"{(f['peak_rss_mb'] - f['base_rss_mb']) / shard_mb:>20.2f}")
            shutil.rmtree(src)
            shutil.rmtree(out)
            shutil.rmtree(copy)
        print(f"output: {r['out_bytes'] / 1e6:.0f} MB at {r['bpw']:.2f} bits per weight")
        res = subprocess.run([sys.executable, __file__, "--whole-model-worker", str(full)],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        peak = r["peak_rss_mb"] - r["base_rss_mb"]
        print(f"for comparison, whole model in memory (mlx-lm convert style: load all, nn.quantize mxfp4): "
              f"peak RSS - base {peak:.0f} MB = {peak / (model_bytes / 1e6):.2f} x model, MLX peak "
              f"{r['mlx_peak_mb']:.0f} MB, {r['seconds']:.1f} s")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
