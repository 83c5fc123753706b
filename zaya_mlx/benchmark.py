"""Decode/prefill benchmark on full-size random weights (`zaya bench`, bench/bench_decode.py).

Builds the model from a ZayaConfig in memory (no checkpoint needed), random weights, optionally quantized as a
recipe in quantize/ does (experts, attention projections, tied embedding; router kept), and measures:
weight bytes (all, and read per decoded token at batch 1), KV bytes per token, graph primitives per decoded
token (the nodes `mx.export_to_dot` writes for one decode step), prefill and decode tokens/s, peak memory.
Speeds are measured, never asserted: no timed tests.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import kernels
from .config import ZayaConfig
from .decode import DecodeOptions
from .model import Model
from .quantization import available_recipes, load_recipe
from .sizes import kv_bytes_per_token, weight_bytes, weight_bytes_per_token

UNQUANTIZED = ("bf16", "bfloat16", "none")  # --quant names for the bf16 model; the others name built-in recipes


def weight_choices() -> list[str]:
    """What --quant takes: bf16, or a built-in recipe of `zaya quantize` (quantize/*.json)."""
    return ["bf16", *available_recipes()]


def full_config(**overrides) -> ZayaConfig:
    """ZAYA1-8B's shapes (the ZayaConfig defaults), with overrides for smaller runs."""
    return ZayaConfig(**overrides)


def small_config() -> ZayaConfig:
    """A few-MB model with the same structure, for a smoke run on a CPU."""
    return ZayaConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, moe_intermediate_size=256, num_experts=4, router_hidden_size=64)


def quantize_as_recipe(model: nn.Module, recipe: str | None) -> None:
    """Quantize a built model in memory as `zaya quantize` writes it with a built-in recipe (None or bf16: not)."""
    if not recipe or recipe in UNQUANTIZED:
        return
    rec = load_recipe(recipe)
    layers = len(model.layers)

    def pred(path, module):
        fmt = rec.format_for(path, layers) if hasattr(module, "to_quantized") else None
        return False if fmt is None else fmt.to_config()

    nn.quantize(model, class_predicate=pred)


def materialize(model: nn.Module, dtype=mx.bfloat16) -> None:
    """Random init -> dtype, one layer at a time (bounded peak memory); router balancing biases stay fp32."""
    from mlx.utils import tree_unflatten

    groups = collections.OrderedDict()
    for k, v in tree_flatten(model.parameters()):
        m = re.match(r"(.*?layers\.\d+)\.", k)
        groups.setdefault(m.group(1) if m else k, []).append((k, v))
    for items in groups.values():
        new = [(k, v.astype(mx.float32 if "balancing_biases" in k else dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in items]
        model.update(tree_unflatten(new), strict=False)
        mx.eval([v for _, v in new])


def build_zaya(config: ZayaConfig, quant: str | None = None, seed: int = 0, dtype=mx.bfloat16) -> Model:
    """The port with random weights: bf16 (router biases fp32), temperatures at 1, optionally quantized."""
    mx.random.seed(seed)
    model = Model(config)
    for layer in model.layers:
        layer.self_attn.qk_norm.temp = mx.ones_like(layer.self_attn.qk_norm.temp)
        gate = layer.mlp.gate  # spread the routing: random balancing biases, a live skip choice
        gate.balancing_biases = mx.random.normal(gate.balancing_biases.shape) * 0.02
    materialize(model, dtype)
    quantize_as_recipe(model, quant)
    mx.eval(model.parameters())
    return model


# --- measurements ----------------------------------------------------------------------------------------------


def _cache_arrays(cache) -> list:
    out = []
    for c in cache:
        state = getattr(c, "state", None)
        for a in tree_flatten(state)[0:] if state is not None else []:
            if isinstance(a[1], mx.array):
                out.append(a[1])
    return out


def count_primitives(forward, make_cache, batch: int, prompt: int = 8) -> tuple[int, dict, tuple[int, int]]:
    """Graph primitives of a decode step (logits and updated caches), as mx.export_to_dot writes them: the second
    step after the prompt, as every later one (the first may also set up the cache, as the fused step does).
    Returns (primitives, their kinds, (inputs, outputs)): the arrays the primitives take and make, each of which
    costs host time to build and encode every step (docs/PERFORMANCE.md), as the primitives themselves do."""
    cache = make_cache()
    mx.eval(forward(mx.zeros((batch, prompt), mx.int32), cache))
    mx.eval(forward(mx.zeros((batch, 1), mx.int32), cache), _cache_arrays(cache))
    logits = forward(mx.zeros((batch, 1), mx.int32), cache)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "step.dot")
        mx.export_to_dot(path, logits, *_cache_arrays(cache))
        text = open(path).read()
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', text)
    inputs = len(re.findall(r'^"[^"\n]*" -> \d+$', text, re.M))  # array -> primitive
    outputs = len(re.findall(r'^\d+ -> "', text, re.M))  # primitive -> array
    mx.eval(logits)
    return len(labels), dict(collections.Counter(labels).most_common()), (inputs, outputs)


def _arguments(res: Result, batch: int) -> str:
    inputs, outputs = res.arguments_per_step[batch]
    return f"{inputs} inputs, {outputs} outputs"


def _argmax_last(logits):
    return mx.argmax(logits[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)


def time_prefill(hidden, head, make_cache, batch: int, length: int, vocab: int, reps: int = 2) -> float:
    """Prompt tokens/s: hidden states for the whole prompt + logits of the last position, into a fresh cache."""
    best = None
    for r in range(reps + 1):  # the first run compiles kernels and shapes
        cache = make_cache()
        tokens = mx.random.randint(0, vocab, (batch, length)).astype(mx.int32)
        mx.eval(tokens)
        mx.synchronize()
        t0 = time.perf_counter()
        out = head(hidden(tokens, cache)[:, -1:, :])
        mx.eval(out, _cache_arrays(cache))
        mx.synchronize()
        dt = time.perf_counter() - t0
        if r:
            best = dt if best is None else min(best, dt)
    return batch * length / best


@dataclass
class DecodeTiming:
    """Timed decode runs: tokens/s (all sequences together), ms of Python graph building a step, and each run's
    tokens/s (the first two are the runs' medians where there were several)."""
    tps: float
    build_ms: float
    rates: list[float]

    def runs(self) -> str:
        """The runs' range, for a log line."""
        n = len(self.rates)
        return "" if n == 1 else f", median of {n} runs: {min(self.rates):.1f}-{max(self.rates):.1f}"


def time_decode(forward, make_cache, batch: int, context: int, steps: int, vocab: int) -> DecodeTiming:
    """One timed run, greedy, each step's graph built while the last one runs."""
    cache = make_cache()
    tokens = mx.random.randint(0, vocab, (batch, context)).astype(mx.int32)
    tok = _argmax_last(forward(tokens, cache))
    mx.eval(tok, _cache_arrays(cache))
    for _ in range(3):  # warm-up: kernel compilation
        tok = _argmax_last(forward(tok, cache))
        mx.eval(tok)
    mx.synchronize()
    build = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tb = time.perf_counter()
        tok = _argmax_last(forward(tok, cache))
        build += time.perf_counter() - tb
        mx.async_eval(tok)
    mx.eval(tok)
    mx.synchronize()
    tps = batch * steps / (time.perf_counter() - t0)
    return DecodeTiming(tps, 1e3 * build / steps, [tps])


def median_decode(forward, make_cache, batch: int, context: int, steps: int, vocab: int, runs: int) -> DecodeTiming:
    """The median of ``runs`` timed runs (rate and building time each): one run lasts well under a second at batch
    1, and moves with the host's moment; the median moves less."""
    timed = [time_decode(forward, make_cache, batch, context, steps, vocab) for _ in range(runs)]
    return DecodeTiming(statistics.median(t.tps for t in timed), statistics.median(t.build_ms for t in timed),
                        [t.tps for t in timed])


def time_step_eval(forward, make_cache, batch: int, context: int, vocab: int, reps: int = 5) -> float:
    """ms of one synchronous eval of an already-built step (encoding + GPU), no overlap: the best of ``reps``."""
    cache = make_cache()
    tok = _argmax_last(forward(mx.random.randint(0, vocab, (batch, context)).astype(mx.int32), cache))
    mx.eval(tok)
    best = None
    for _ in range(reps):
        tok = _argmax_last(forward(tok, cache))
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(tok)
        mx.synchronize()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return 1e3 * best


@dataclass
class Result:
    name: str
    quant: str
    device: str
    weight_gb: float = 0.0
    weight_gb_per_token: float = 0.0
    kv_bytes_per_token: int = 0
    primitives_per_step: dict = field(default_factory=dict)  # batch -> count
    primitive_kinds: dict = field(default_factory=dict)
    arguments_per_step: dict = field(default_factory=dict)  # batch -> [inputs, outputs] of those primitives
    prefill_tps: dict = field(default_factory=dict)  # batch -> tokens/s
    decode_tps: dict = field(default_factory=dict)  # batch -> the median of decode_runs
    decode_runs: dict = field(default_factory=dict)  # batch -> tokens/s of each timed run
    peak_gb: float = 0.0
    max_rel_logit_diff: float | None = None  # fused decode vs the plain path, same weights
    build_ms: dict = field(default_factory=dict)  # batch -> ms per step spent building the graph in Python
    eval_ms: dict = field(default_factory=dict)  # batch -> ms of a synchronous eval of one built step

    def add_decode(self, batch: int, timing: DecodeTiming):
        """A batch size's decode timing, in the fields the JSON and the table read."""
        self.decode_tps[batch], self.decode_runs[batch] = timing.tps, timing.rates
        self.build_ms[batch] = timing.build_ms


def bench_zaya(config: ZayaConfig, quant: str | None, batches=(1, 8), prompt: int = 512, context: int = 256,
               steps: int = 64, fused: bool = True, check: bool = True, log=print, compiled: bool = True,
               model: Model | None = None, label: str | None = None, prefill: bool = True, runs: int = 1) -> Result:
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    own = model is None
    if own:
        model = build_zaya(config, quant)
        log(f"  built {quant or 'bf16'} model in {time.perf_counter() - t0:.1f} s")
    total, per_tok = weight_bytes(model), weight_bytes_per_token(model, config.num_experts)
    name = label or (("zaya-mlx (fused decode)" if compiled else "zaya-mlx (fused, not compiled)") if fused
                     else "zaya-mlx (plain ops)")
    res = Result(name, quant or "bf16", str(mx.default_device()), total / 1e9, per_tok / 1e9)
    res.kv_bytes_per_token = kv_bytes_per_token(config, mx.bfloat16.size)

    def hidden(tokens, cache):
        return model.model(tokens, cache)

    def head(h):
        return (model.lm_head(h) if "lm_head" in model else model.model.embed_tokens.as_linear(h)).astype(mx.float32)

    options = model.decode_options
    model.decode_options = DecodeOptions(fused=fused, kernels=options.kernels, compile=compiled)
    try:
        for b in batches:
            n, kinds, res.arguments_per_step[b] = count_primitives(model, model.make_cache, b)
            res.primitives_per_step[b] = n
            if b == batches[0]:
                res.primitive_kinds = kinds
            if prefill and fused and compiled:  # prefill runs the same ops either way
                res.prefill_tps[b] = time_prefill(hidden, head, model.make_cache, b, prompt, config.vocab_size)
            timing = median_decode(model, model.make_cache, b, context, steps, config.vocab_size, runs)
            res.add_decode(b, timing)
            res.eval_ms[b] = time_step_eval(model, model.make_cache, b, context, config.vocab_size)
            log(f"  batch {b}: {n} primitives/step ({_arguments(res, b)}), "
                f"prefill {res.prefill_tps.get(b, 0):.0f} tok/s, decode {timing.tps:.1f} tok/s{timing.runs()} "
                f"(graph building {timing.build_ms:.2f} ms/step, one step's eval {res.eval_ms[b]:.2f} ms)")
        if check and fused:
            res.max_rel_logit_diff = max(fused_vs_plain(model, config.vocab_size, batch=max(batches))[0])
            log(f"  fused vs plain decode logits: max |diff| / max |logit| = {res.max_rel_logit_diff:.2e}")
    finally:
        model.decode_options = options
    res.peak_gb = mx.get_peak_memory() / 1e9
    if own:
        del model
        gc.collect()  # the compiled step functions hold the model in a reference cycle
        mx.clear_cache()
    return res


def fused_vs_plain(model: Model, vocab: int, batch: int = 2, context: int = 24, steps: int = 4,
                   left_padding: list | None = None, fused_context=contextlib.nullcontext) -> tuple[list, list]:
    """Fused path against the model's plain ops: a random prompt prefilled into two caches, then `steps` decode
    steps of the plain path's greedy choice through both (the fused ones inside fused_context()). Returns (each
    step's max |logit difference| / max |logit|, the fused path's cache). The model's options are kept but for
    ``fused``, and restored after."""
    options = model.decode_options
    sides = {on: DecodeOptions(fused=on, kernels=options.kernels, compile=options.compile) for on in (False, True)}
    tokens = mx.random.randint(0, vocab, (batch, context)).astype(mx.int32)
    caches, last = {}, {}
    try:
        for on in (False, True):
            model.decode_options = sides[on]
            caches[on] = model.make_cache(left_padding)
            last[on] = _argmax_last(model(tokens, caches[on]))
            mx.eval(last[on], _cache_arrays(caches[on]))
        tok = last[False]
        errors = []
        for _ in range(steps):
            model.decode_options = sides[False]
            plain = model(tok, caches[False])
            mx.eval(plain)
            model.decode_options = sides[True]
            with fused_context():
                fused = model(tok, caches[True])
                mx.eval(fused)
            errors.append((mx.abs(fused - plain).max() / mx.abs(plain).max()).item())
            tok = _argmax_last(plain)
    finally:
        model.decode_options = options
    return errors, caches[True]


def markdown(results: list[Result], command: str) -> str:
    lines = [f"Command: `{command}`", f"Device: {results[0].device if results else '?'}, kernels: {kernels.backend()}", ""]
    lines.append("| model | weights | GB | GB read / token (B=1) | KV bytes / token | primitives / step (B=1) | "
                 "prefill tok/s B=1 | B=8 | decode tok/s B=1 | B=8 | peak GB |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        def g(d, b, fmt="{:.0f}"):
            return fmt.format(d[b]) if b in d else "-"
        lines.append(f"| {r.name} | {r.quant} | {r.weight_gb:.2f} | {r.weight_gb_per_token:.3f} | {r.kv_bytes_per_token} | "
                     f"{g(r.primitives_per_step, 1, '{}')} | {g(r.prefill_tps, 1)} | {g(r.prefill_tps, 8)} | "
                     f"{g(r.decode_tps, 1, '{:.1f}')} | {g(r.decode_tps, 8, '{:.1f}')} | {r.peak_gb:.1f} |")
    return "\n".join(lines) + "\n"


def run(quants=("bf16", "mxfp4"), batches=(1, 8), prompt=512, context=256, steps=64, small=False, plain=False,
        experts: int | None = None, runs: int = 3, options: DecodeOptions | None = None, log=print) -> list[Result]:
    """The whole benchmark; returns one Result per (model, weights) measured. experts: fewer experts than the
    config's, for quick A/B runs: with top-1 routing a token reads one expert either way, so a step's graph and
    the bytes it reads stay the same (but for the router's output rows, one an expert) while the model builds in
    seconds. runs: each decode rate is the median of this many timed runs, for every model alike. options: the
    models' decode options (their ``kernels``, and ``compile`` for the first fused run; the runs choose ``fused``)."""
    options = options or DecodeOptions()
    config = small_config() if small else full_config()
    if experts is not None:
        config = replace(config, num_experts=experts)
    results = []
    for q in quants:
        q = None if q in UNQUANTIZED else q
        log(f"zaya-mlx {q or 'bf16'}:")
        model = build_zaya(config, q)
        model.decode_options = options
        results.append(bench_zaya(config, q, batches, prompt, context, steps, fused=True, log=log, model=model,
                                  compiled=options.compile, runs=runs))
        if plain:
            log(f"zaya-mlx {q or 'bf16'} (fused, not compiled):")
            results.append(bench_zaya(config, q, batches, prompt, context, steps, fused=True, check=False, log=log,
                                      compiled=False, model=model, runs=runs))
            log(f"zaya-mlx {q or 'bf16'} (plain ops):")
            results.append(bench_zaya(config, q, batches, prompt, context, max(8, steps // 4), fused=False,
                                      check=False, log=log, model=model, runs=runs))
        del model
        gc.collect()
        mx.clear_cache()
    return results


def to_dict(r: Result) -> dict:
    return asdict(r)
