"""Benchmark (not a test): Markovian RSA's decoding on the 8B's shapes with random weights.

1. One round (`--ns`): N rollouts sharing a head, decoded together by the engine's backend (mlx-lm's
   BatchGenerator, the head prefilled once), against N one after another as single streams (N x the N = 1 time);
   the peak memory MLX reports against the plan; `--kv bf16,8,4` repeats it for each KV cache format.
2. Scheduling on rollouts of mixed lengths (`--mixed`): the same run (N rollouts a round, T + 1 rounds, fewer
   slots than N) through the engine three ways: "batches" (sub-batches one after another, each waiting for its
   slowest rollout: how rounds were decoded before), "rounds" (continuous batching inside a round, rounds one
   after another) and "stream" (the default: a next-round rollout starts as soon as its K candidates finished).
   Every schedule decodes the same tokens; the table gives wall time, tokens/s, decode steps and the idle
   slot-steps (a slot with no rollout during a decode step), and the speedup over "batches". The lengths are
   forced: each rollout stops after a length drawn from its key (a quarter at the full budget, the rest uniform
   between 10% and 100% of it), since random weights never write an end-of-turn where a model would.
   Every schedule first runs once untimed at a short budget (`--warmup-budget`), so the back end's kernel
   compilation does not fall on the schedule timed first.

Shapes are the 8B's (hidden 2048, 8 query / 2 KV heads of 128, 16 experts of 2048, vocab 262,272); `--layers`
cuts the depth for slow machines (the figures then are per that depth: say so when quoting them). Prompts are
made of word ids by a stand-in tokenizer (one id a whitespace word), so a tail of W words is W ids.

    python bench/bench_rsa.py                                              # GPU: 40 layers, bf16, both parts
    python bench/bench_rsa.py --ns 1,16 --kv bf16,8 --mixed-n 0             # part 1 with an 8-bit KV cache too
    python bench/bench_rsa.py --layers 2 --ns 1,2 --decode 16 --mixed-n 4 --slots 2 --budget 24 --tail 8   # a CPU
"""

import argparse
import json
import platform
import random
import time

import mlx.core as mx
from mlx.utils import tree_map

from zaya_mlx import rsa
from zaya_mlx.config import ZayaConfig
from zaya_mlx.kv_cache import parse_kv
from zaya_mlx.model import Model
from zaya_mlx.rsa.memory import model_layer_bytes, model_weight_bytes


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


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace word (ids 3..vocab), a plain chat template."""

    has_chat_template, has_thinking, eos_token_ids = True, False, []

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text, add_special_tokens=False):
        return [3 + (sum(w.encode()) * 2654435761) % (self.vocab - 3) for w in text.split()]

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs):
        text = " ".join(f"<{m['role']}> {m['content']} </{m['role']}>" for m in messages)
        return text + (" <assistant>" if add_generation_prompt else "")


class MixedLengths:
    """The engine's backend with each rollout stopped after a length drawn from its key."""

    def __init__(self, inner, seed: int = 0):
        self.inner, self.seed = inner, seed

    def length(self, key, budget: int) -> int:
        rng = random.Random(f"{self.seed}:{key}")
        return budget if rng.random() < 0.25 else max(1, int(budget * rng.uniform(0.1, 1.0)))

    def start(self, key, prompt, *, max_tokens, sampling, seed, prefix):
        self.inner.start(key, prompt, max_tokens=self.length(key, max_tokens), sampling=sampling, seed=seed,
                         prefix=prefix)

    def step(self):
        return self.inner.step()

    def counters(self):
        return self.inner.counters()

    def close(self):
        self.inner.close()


def sampling(temperature: float = 1.0) -> dict:
    return {"temperature": temperature, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def one_round(model, n: int, head: int, rest: int, decode: int, seed: int, kv_bits=None) -> dict:
    vocab = model.args.vocab_size
    k1, k2 = mx.random.split(mx.random.key(seed), 2)
    head_ids = mx.random.randint(3, vocab, (head,), key=k1).tolist()
    rests = mx.random.randint(3, vocab, (n, rest), key=k2).tolist()
    backend = rsa.ModelBackend(model, slots=n, stop_ids=(), kv_bits=kv_bits)
    mx.synchronize()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    first = None
    for i in range(n):
        backend.start((0, i), head_ids + rests[i], max_tokens=decode, sampling=sampling(), seed=seed + i,
                      prefix=head_ids)
    tokens, live = 0, n
    while live:
        for _, _, reason in backend.step():
            tokens += 1
            live -= reason is not None
        if first is None and tokens:
            first = time.perf_counter()
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    c = backend.counters()
    backend.close()
    return {"n": n, "kv": "bf16" if kv_bits is None else f"{kv_bits}-bit", "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "prefill_s": first - tic, "decode_tokens_per_s": c["generation_tokens"] / max(c["decode_s"], 1e-9),
            "peak_bytes": peak}


SCHEDULES = ("batches", "rounds", "stream")


def mixed(model, a) -> list[dict]:
    tok = WordTokenizer(model.args.vocab_size)
    problem = " ".join(f"q{i}" for i in range(a.head))

    def run(schedule: str, budget: int):
        params = rsa.RSAParams(rsa_n=a.mixed_n, rsa_k=a.c, rsa_t=a.rounds, tail_window_len=a.tail,
                               short_resp_len=budget, max_tokens=budget, rsa_final_n=0, temperature=1.0,
                               final_temperature=1.0, final_top_p=1.0, final_top_k=0)
        backend = MixedLengths(rsa.ModelBackend(model, slots=a.slots, stop_ids=()), seed=a.seed)
        mx.synchronize()
        result = rsa.run(problem, params, model=model, tokenizer=tok, seed=a.seed, backend=backend, stop_ids=[],
                         max_batch=a.slots, schedule=schedule, memory_budget=1 << 50)
        backend.close()
        return result

    # Untimed first: every schedule at a short budget, so the back end's compiled kernels (on MLX-CUDA, NVRTC
    # compiles each one the first time it runs, seconds each) are built before the schedule timed first.
    for schedule in SCHEDULES:
        run(schedule, a.warmup_budget)
    rows = []
    for schedule in SCHEDULES:
        result = run(schedule, a.budget)
        t = result.timings
        rows.append({"schedule": schedule, "seconds": t["total_s"], "tokens": result.tokens_generated,
                     "tokens_per_s": t["tokens_per_s"], "steps": t["steps"], "idle_slot_steps": t["idle_slot_steps"],
                     "slot_steps": t["steps"] * a.slots,
                     "tokens_by_round": [[len(r.tokens) for r in rd.rollouts] for rd in result.rounds]})
    same = len({json.dumps(r["tokens_by_round"]) for r in rows}) == 1
    base = rows[0]["seconds"]
    print(f"\nmixed lengths: N {a.mixed_n}, K {a.c}, T {a.rounds} ({a.rounds + 1} rounds), {a.slots} slots, budget "
          f"{a.budget} tokens, tails {a.tail} words, head {a.head} words; same tokens in every schedule: {same}")
    print(f"{'schedule':>9} {'wall s':>8} {'tokens':>7} {'tok/s':>9} {'steps':>6} {'idle slot-steps':>16} "
          f"{'vs batches':>10}")
    for r in rows:
        r["speedup_vs_batches"] = base / r["seconds"]
        print(f"{r['schedule']:>9} {r['seconds']:>8.2f} {r['tokens']:>7} {r['tokens_per_s']:>9.1f} {r['steps']:>6} "
              f"{r['idle_slot_steps']:>7} ({r['idle_slot_steps'] / r['slot_steps']:>5.1%}) "
              f"{r['speedup_vs_batches']:>9.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--ns", default="1,4,8,16", help="populations of part 1 (empty: skip it)")
    ap.add_argument("--head", type=int, default=256, help="tokens every prompt shares (chat, template, problem)")
    ap.add_argument("--c", type=int, default=4, help="candidates a prompt (K)")
    ap.add_argument("--tail", type=int, default=512, help="tokens (words) a candidate carries")
    ap.add_argument("--decode", type=int, default=256, help="part 1: tokens each rollout generates")
    ap.add_argument("--kv", default="bf16", help="part 1: KV cache formats, e.g. bf16,8,4")
    ap.add_argument("--mixed-n", type=int, default=16, help="part 2: rollouts a round (0: skip it)")
    ap.add_argument("--slots", type=int, default=8, help="part 2: rollouts decoding together")
    ap.add_argument("--rounds", type=int, default=2, help="part 2: T (T + 1 rounds)")
    ap.add_argument("--budget", type=int, default=512, help="part 2: most tokens a rollout")
    ap.add_argument("--warmup-budget", type=int, default=32, help="part 2: budget of the untimed first pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()

    dtype = getattr(mx, a.dtype)
    model = build(a.layers, dtype)
    weights = model_weight_bytes(model)
    device = str(mx.default_device())
    info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    print(f"device {device} {info.get('device_name', '')} ({platform.machine()}), mlx {mx.__version__}; "
          f"{a.layers} of the 8B's 40 layers, {a.dtype}, weights {weights / 1e9:.2f} GB")

    rows = []
    ns = [int(x) for x in a.ns.split(",") if x.strip()]
    kvs = [parse_kv(x) for x in a.kv.split(",")]
    if ns:
        rest = a.c * a.tail
        print(f"one round: {a.head} shared + {a.c} x {a.tail} tail tokens of prompt per rollout, {a.decode} tokens "
              "each")
        for kv_bits, n in [(kv_bits, n) for kv_bits in kvs for n in ns]:
            one_round(model, n, a.head, rest, 8, seed=99 + n, kv_bits=kv_bits)  # warm-up: compile, allocate
            r = one_round(model, n, a.head, rest, a.decode, seed=n, kv_bits=kv_bits)
            params = rsa.RSAParams(rsa_n=n, rsa_k=a.c, rsa_t=1, tail_window_len=a.tail, tail_unit="tokens",
                                   short_resp_len=a.decode, max_tokens=a.decode, rsa_final_n=0, kv_bits=kv_bits)
            plan = rsa.plan_memory(model.args, params, prompt_tokens=a.head, aggregate_tokens=a.head + rest,
                                   head_tokens=a.head, weights_bytes=weights,
                                   layer_bytes=model_layer_bytes(model), dtype_bytes=dtype.size,
                                   budget_bytes=1 << 50, budget_source="unbounded")
            r["plan_bytes"] = plan.peak_bytes - plan.host_bytes  # the device's share of the plan
            rows.append(r)
        singles = {r["kv"]: r for r in rows if r["n"] == 1}
        print(f"{'KV':>6} {'N':>3} {'round s':>8} {'prefill s':>9} {'tok/s':>9} {'decode tok/s':>12} "
              f"{'vs N x single':>13} "
              f"{'peak GB':>8} {'plan GB':>8}")
        for r in rows:
            single = singles.get(r["kv"])
            speed = (r["n"] * single["seconds"] / r["seconds"]) if single else float("nan")
            r["speedup_vs_single_streams"] = speed
            print(f"{r['kv']:>6} {r['n']:>3} {r['seconds']:>8.2f} {r['prefill_s']:>9.2f} {r['tokens_per_s']:>9.1f} "
                  f"{r['decode_tokens_per_s']:>12.1f} {speed:>12.2f}x {r['peak_bytes'] / 1e9:>8.2f} "
                  f"{r['plan_bytes'] / 1e9:>8.2f}")
    mixed_rows = mixed(model, a) if a.mixed_n else []
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "device_info": info, "mlx": mx.__version__, "args": vars(a),
                       "weights_bytes": weights, "rows": rows, "mixed": mixed_rows}, f, indent=1)


if __name__ == "__main__":
    main()
