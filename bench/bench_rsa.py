"""Benchmark (not a test): one Markovian RSA round on the 8B's shapes with random weights.

For N = 1, 4, 8, 16 rollouts, one aggregation round as the engine runs it (`zaya_mlx.rsa.ModelBackend`: the shared
head prefilled once, each rollout's remainder prefilled on a copy, then one batched decode of all N): its wall
time and aggregate tokens/s, the decode-only tokens/s, and the speedup over running the N rollouts one after
another as single streams (N x the N = 1 time). Then the peak memory MLX reports against `rsa.plan_memory`.

Shapes are the 8B's (hidden 2048, 8 query / 2 KV heads of 128, 16 experts of 2048, vocab 262,272); `--layers`
cuts the depth for slow machines (the figures then are per that depth: say so when quoting them). Tokens are
random and the sampler adds a random offset to the argmax, so rows route to different experts as real text does.

    python bench/bench_rsa.py                                   # GPU: 40 layers, bf16
    python bench/bench_rsa.py --layers 2 --dtype float32 --tail 64 --decode 32   # a CPU
"""

import argparse
import json
import platform
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from zaya_mlx import rsa
from zaya_mlx.config import ZayaConfig
from zaya_mlx.model import Model


def build(layers: int, dtype) -> Model:
    args = ZayaConfig(num_hidden_layers=layers)
    model = Model(args)
    # Random weights at the default init; key temperatures of 1 so attention is not degenerate.
    params = tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters())
    model.update(params)
    for layer in model.model.layers:
        layer.self_attn.qk_norm.temp = mx.ones_like(layer.self_attn.qk_norm.temp)
    mx.eval(model.parameters())
    return model


def one_round(model, n: int, head: int, rest: int, decode: int, seed: int) -> dict:
    vocab = model.args.vocab_size
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    head_ids = mx.random.randint(3, vocab, (head,), key=k1).tolist()
    rests = mx.random.randint(3, vocab, (n, rest), key=k2).tolist()
    prompts = [head_ids + r for r in rests]
    state = {"key": k3}

    def sampler(logprobs):  # depends on the logits (so the forward runs), random so routing varies
        state["key"], sub = mx.random.split(state["key"])
        offset = mx.random.randint(0, vocab, (logprobs.shape[0],), key=sub)
        return (mx.argmax(logprobs, axis=-1) + offset) % vocab

    stamps = []
    backend = rsa.ModelBackend(model, sampler=sampler, stop_ids=())
    mx.synchronize()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    outs = backend.generate(prompts, max_tokens=decode, prefix_len=head,
                            on_token=lambda i, t: stamps.append(time.perf_counter()))
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    backend.release()
    tokens = sum(len(o) for o in outs)
    decode_s = stamps[-1] - stamps[n - 1] if len(stamps) > n else float("nan")
    return {"n": n, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "prefill_s": stamps[n - 1] - tic, "decode_tokens_per_s": (tokens - n) / decode_s, "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--ns", default="1,4,8,16")
    ap.add_argument("--head", type=int, default=256, help="tokens every prompt shares (chat, template, problem)")
    ap.add_argument("--c", type=int, default=2, help="tails per prompt")
    ap.add_argument("--tail", type=int, default=1024, help="tokens per tail (tau)")
    ap.add_argument("--decode", type=int, default=256, help="tokens generated per rollout (the round's beta)")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()

    dtype = getattr(mx, a.dtype)
    model = build(a.layers, dtype)
    args = model.args
    weights = rsa.model_weight_bytes(model)
    rest = a.c * a.tail
    device = str(mx.default_device())
    info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    print(f"device {device} {info.get('device_name', '')} ({platform.machine()}), mlx {mx.__version__}; "
          f"{a.layers} of the 8B's 40 layers, {a.dtype}, weights {weights / 1e9:.2f} GB")
    print(f"one round: {a.head} shared + {a.c} x {a.tail} tail tokens of prompt per rollout, {a.decode} tokens each")

    rows = []
    for n in [int(x) for x in a.ns.split(",")]:
        one_round(model, n, a.head, rest, 8, seed=99 + n)  # warm-up at this N's shapes: compile kernels, allocate
        r = one_round(model, n, a.head, rest, a.decode, seed=n)
        plan = rsa.plan_memory(args, n=n, c=a.c, tau=a.tail, beta=a.decode, prompt_tokens=a.head,
                               context_bound=a.head + rest + a.decode, head_tokens=a.head, weights_bytes=weights,
                               layer_bytes=rsa.model_layer_bytes(model), dtype_bytes=dtype.size,
                               budget_bytes=1 << 50, budget_source="unbounded")
        r["plan_bytes"] = plan.peak_bytes
        rows.append(r)
    single = rows[0] if rows[0]["n"] == 1 else None
    print(f"{'N':>3} {'round s':>8} {'prefill s':>9} {'tok/s':>9} {'decode tok/s':>12} {'vs N x single':>13} "
          f"{'peak GB':>8} {'plan GB':>8}")
    for r in rows:
        speed = (r["n"] * single["seconds"] / r["seconds"]) if single else float("nan")
        r["speedup_vs_single_streams"] = speed
        print(f"{r['n']:>3} {r['seconds']:>8.2f} {r['prefill_s']:>9.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['decode_tokens_per_s']:>12.1f} {speed:>12.2f}x {r['peak_bytes'] / 1e9:>8.2f} "
              f"{r['plan_bytes'] / 1e9:>8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "device_info": info, "mlx": mx.__version__, "args": vars(a),
                       "weights_bytes": weights, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
