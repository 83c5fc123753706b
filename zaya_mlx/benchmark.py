"""Decode/prefill benchmark (`zaya bench`, bench/bench_decode.py): full-size random weights, or a checkpoint.

Builds the model from a ZayaConfig in memory (no checkpoint needed), random weights, optionally quantized as a
recipe in quantize/ does (experts, attention projections, tied embedding; router kept), or loads a checkpoint
(--model), after a memory plan says it fits (plan_bench). At each batch x context and KV format it fills the
context in chunks (prefill tokens/s), then times greedy decode steps on that cache: tokens/s, ms a step, the bytes
a step moves (weights read + KV read) and the share of the memory bandwidth's bound that the rate reaches; also
weight and KV bytes per token, graph primitives per decoded token (the nodes `mx.export_to_dot` writes for one
decode step), peak memory. Speeds are measured, never asserted: no timed tests.
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
from .errors import ZayaError, first_line
from .decode import DecodeOptions
from .model import Model
from .quantization import available_recipes, load_recipe
from .sizes import expert_weight_bytes, format_bytes, kv_bytes_per_token, weight_bytes

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


QUANTIZE_ROWS_BYTES = 32 << 20  # a weight quantized a block of rows this large at a time (see quantize_as_recipe)


def quantize_as_recipe(model: nn.Module, recipe: str | None, within: str = "", lazy: bool = False) -> None:
    """Quantize a built model in memory as `zaya quantize` writes it with a built-in recipe (None or bf16: not): the
    recipe's modules at or under the path ``within`` (default: all). On the CPU a large weight is quantized a block of
    rows at a time, each evaluated before the next: MLX's CPU MXFP4 quantization holds ~20x the block's bytes while it
    runs (a whole bf16 embedding: over 20 GB). Else (and with ``lazy``) nothing is computed until evaluated."""
    if not recipe or recipe in UNQUANTIZED:
        return
    rec = load_recipe(recipe)
    layers = len(model.layers)

    def fmt_of(path, module):
        inside = not within or f"{path}.".startswith(f"{within}.") or within.startswith(f"{path}.")
        return rec.format_for(path, layers) if inside and hasattr(module, "to_quantized") else None

    def pred(path, module):
        fmt = fmt_of(path, module)
        return False if fmt is None else fmt.to_config()

    sources = {path: (m.weight, fmt) for path, m in model.named_modules() if (fmt := fmt_of(path, m)) is not None}
    nn.quantize(model, class_predicate=pred)
    modules = dict(model.named_modules())
    for path, (w, fmt) in sources.items():
        if lazy or w.nbytes <= QUANTIZE_ROWS_BYTES or mx.default_device() != mx.cpu:
            continue
        rows = max(1, QUANTIZE_ROWS_BYTES // (w.nbytes // w.shape[-2]))
        parts = []
        for i in range(0, w.shape[-2], rows):
            parts.append(mx.quantize(w[..., i : i + rows, :], fmt.group_size, fmt.bits, mode=fmt.mode))
            mx.eval(parts[-1])
        q = modules[path]
        q.weight, q.scales = (mx.concatenate([p[k] for p in parts], axis=-2) for k in (0, 1))
        if fmt.mode == "affine":
            q.biases = mx.concatenate([p[2] for p in parts], axis=-2)


def materialize(model: nn.Module, dtype=mx.bfloat16, quantize=lambda within: None, log=None) -> None:
    """Random init -> dtype, one layer at a time, each quantized (``quantize(its path)``) before the next is made: the
    peak is the quantized model and one layer in dtype. Router balancing biases stay fp32. log: where progress goes
    (every 10 s, with an estimate), or None."""
    from mlx.utils import tree_unflatten

    groups = collections.OrderedDict()
    for k, v in tree_flatten(model.parameters()):
        m = re.match(r"(.*?layers\.\d+)\.", k)
        groups.setdefault(m.group(1) if m else k, []).append((k, v))
    total = sum(v.size for items in groups.values() for _, v in items)
    done, t0, shown = 0, time.perf_counter(), time.perf_counter()
    for within, items in groups.items():
        new = [(k, v.astype(mx.float32 if "balancing_biases" in k else dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in items]
        model.update(tree_unflatten(new), strict=False)
        mx.eval([v for _, v in new])
        quantize(within)
        mx.eval([v for k, v in tree_flatten(model.parameters()) if k == within or k.startswith(f"{within}.")])
        done += sum(v.size for _, v in items)
        now = time.perf_counter()
        if log is not None and now - shown > 10 and done < total:
            shown = now
            log(f"  building: {done / total:.0%} of the weights, ~{(now - t0) * (total - done) / done:.0f} s left")


def build_zaya(config: ZayaConfig, quant: str | None = None, seed: int = 0, dtype=mx.bfloat16, log=None) -> Model:
    """The port with random weights: bf16 (router biases fp32), temperatures at 1, optionally quantized. log: where
    the build's progress goes, or None."""
    mx.random.seed(seed)
    model = Model(config)
    for layer in model.layers:
        layer.self_attn.qk_norm.temp = mx.ones_like(layer.self_attn.qk_norm.temp)
        gate = layer.mlp.gate  # spread the routing: random balancing biases, a live skip choice
        gate.balancing_biases = mx.random.normal(gate.balancing_biases.shape) * 0.02
    materialize(model, dtype, lambda within: quantize_as_recipe(model, quant, within), log)
    return model


# --- measurements ----------------------------------------------------------------------------------------------


def weights_read(total: int, experts: int, num_experts: int, batch: int, grouped: bool = True) -> int:
    """Weight bytes a decode step of ``batch`` tokens reads: all but the experts, and the experts chosen. With top-1
    routing spread evenly (as the random weights route), E (1 - (1 - 1/E)^B) distinct experts a layer on average,
    each read once where the experts run grouped by expert; else each token reads its own (B a layer)."""
    chosen = num_experts * (1 - (1 - 1 / num_experts) ** batch) if grouped else batch
    return int(total - experts + experts / num_experts * chosen)


# Memory bandwidth (TB/s, the vendors' figures) of GPUs by a part of the name the device reports; the first match
# wins. Elsewhere give --bandwidth.
BANDWIDTH_TBS = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("GH200", 4.0), ("H200", 4.8))


def device_bandwidth() -> float | None:
    """Bytes/s of this device's memory where BANDWIDTH_TBS knows its name, else None."""
    name = str(mx.device_info().get("device_name", ""))
    return next((tbs * 1e12 for key, tbs in BANDWIDTH_TBS if key in name), None)


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
    counts = graph_primitives(logits, *_cache_arrays(cache))
    mx.eval(logits)
    return counts


def graph_primitives(*arrays) -> tuple[int, dict, tuple[int, int]]:
    """The unevaluated graph that computes ``arrays``, as mx.export_to_dot writes it: (primitives, their kinds,
    (inputs, outputs) of those primitives)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "step.dot")
        mx.export_to_dot(path, *arrays)
        text = open(path).read()
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', text)
    inputs = len(re.findall(r'^"[^"\n]*" -> \d+$', text, re.M))  # array -> primitive
    outputs = len(re.findall(r'^\d+ -> "', text, re.M))  # primitive -> array
    return len(labels), dict(collections.Counter(labels).most_common()), (inputs, outputs)


def _argmax_last(logits):
    return mx.argmax(logits[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)


def fill_context(forward, cache, batch: int, context: int, vocab: int, chunk: int = 2048) -> mx.array:
    """``context`` random tokens a row into the cache, all but the last in chunks of ``chunk`` whose logits are never
    evaluated (so never computed), the last alone; returns the greedy next token [B, 1]. Memory stays that of one
    chunk: the logits of a whole long prompt (B x L x 262,272 floats) would not fit."""
    tokens = mx.random.randint(0, vocab, (batch, context)).astype(mx.int32)
    for i in range(0, context - 1, chunk):
        forward(tokens[:, i : min(i + chunk, context - 1)], cache)
        mx.eval(_cache_arrays(cache))
    tok = _argmax_last(forward(tokens[:, -1:], cache))
    mx.eval(tok, _cache_arrays(cache))
    return tok


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


def decode_run(forward, cache, tok: mx.array, steps: int, warmup: int = 0) -> tuple[DecodeTiming, mx.array]:
    """One timed run of ``steps`` greedy steps from ``tok`` on ``cache`` (after ``warmup`` untimed ones, which compile
    kernels), each step's graph built while the last one runs. Returns (the timing, the last token)."""
    for _ in range(warmup):
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
    tps = tok.shape[0] * steps / (time.perf_counter() - t0)
    return DecodeTiming(tps, 1e3 * build / steps, [tps]), tok


def time_decode(forward, make_cache, batch: int, context: int, steps: int, vocab: int) -> DecodeTiming:
    """One timed run in a fresh cache filled with ``context`` tokens."""
    cache = make_cache()
    tok = fill_context(forward, cache, batch, context, vocab)
    return decode_run(forward, cache, tok, steps, warmup=3)[0]


def median_timing(timed: list[DecodeTiming]) -> DecodeTiming:
    """The median of timed runs (rate and building time each): one run lasts well under a second at batch 1, and
    moves with the host's moment (bench/RESULTS.md); the median moves less."""
    return DecodeTiming(statistics.median(t.tps for t in timed), statistics.median(t.build_ms for t in timed),
                        [t.tps for t in timed])


def step_eval_ms(forward, cache, tok: mx.array, reps: int = 5) -> float:
    """ms of one synchronous eval of an already-built step (encoding + GPU), no overlap: the best of ``reps``."""
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
class Row:
    """One batch x context measured: the context filled in chunks (prefill tokens/s), then decode runs on the same
    cache. bytes_per_step: the weights a step reads (weights_read) and the KV it reads; bound_tps: the tokens/s at
    which those bytes take the device's memory bandwidth (None where it is unknown)."""
    batch: int
    context: int
    kv: str
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    decode_runs: list = field(default_factory=list)
    build_ms: float = 0.0  # ms a step spent building the graph in Python
    eval_ms: float = 0.0  # ms of a synchronous eval of one built step
    bytes_per_step: int = 0
    bound_tps: float | None = None
    primitives: int = 0
    arguments: tuple = (0, 0)  # (inputs, outputs) of those primitives
    peak_gb: float = 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.batch / self.decode_tps if self.decode_tps else 0.0

    @property
    def share(self) -> float | None:
        return self.decode_tps / self.bound_tps if self.bound_tps else None

    def line(self) -> str:
        bound = f", {self.share:.0%} of the bound {self.bound_tps:,.0f}" if self.bound_tps else ""
        return (f"{self.primitives} primitives/step ({self.arguments[0]} inputs, {self.arguments[1]} outputs), "
                f"prefill {self.prefill_tps:,.0f} tok/s, decode {self.decode_tps:,.1f} tok/s"
                f"{DecodeTiming(self.decode_tps, self.build_ms, self.decode_runs).runs()}{bound} "
                f"({self.ms_per_step:.2f} ms/step, {format_bytes(self.bytes_per_step)} moved; graph building "
                f"{self.build_ms:.2f} ms/step, one step's eval {self.eval_ms:.2f} ms), peak {self.peak_gb:.1f} GB")


def measure_row(forward, make_cache, batch: int, context: int, kv: str, *, steps: int, runs: int, vocab: int,
                chunk: int, bytes_per_step: int, bandwidth: float | None, primitives: bool = True) -> Row:
    """Fill a cache once (a warm-up chunk first, in a throwaway cache: kernels compile), then ``runs`` timed decode
    runs on it, then one step's eval time and the step's graph."""
    mx.reset_peak_memory()
    fill_context(forward, make_cache(), batch, min(context, chunk + 1), vocab, chunk)
    gc.collect()
    cache = make_cache()
    mx.synchronize()
    t0 = time.perf_counter()
    tok = fill_context(forward, cache, batch, context, vocab, chunk)
    mx.synchronize()
    row = Row(batch, context, kv, prefill_tps=batch * context / (time.perf_counter() - t0),
              bytes_per_step=bytes_per_step, bound_tps=bandwidth * batch / bytes_per_step if bandwidth else None)
    timed = []
    for r in range(runs):
        timing, tok = decode_run(forward, cache, tok, steps, warmup=3 if r == 0 else 0)
        timed.append(timing)
    timing = median_timing(timed)
    row.decode_tps, row.decode_runs, row.build_ms = timing.tps, timing.rates, timing.build_ms
    row.eval_ms = step_eval_ms(forward, cache, tok)
    if primitives:
        row.primitives, _, row.arguments = count_primitives(forward, lambda c=cache: c, batch)
    row.peak_gb = mx.get_peak_memory() / 1e9
    del cache
    gc.collect()
    mx.clear_cache()
    return row


@dataclass
class Result:
    name: str
    quant: str
    device: str
    weight_gb: float = 0.0
    weight_gb_per_token: float = 0.0  # read by a decode step at batch 1
    kv_bytes_per_token: dict = field(default_factory=dict)  # KV format -> bytes
    primitive_kinds: dict = field(default_factory=dict)  # of the first row's step
    rows: list = field(default_factory=list)  # Row, for each KV format and batch x context
    failed: list = field(default_factory=list)  # "row: what the back end said", for each row that did not run
    max_rel_logit_diff: float | None = None  # fused decode vs the plain path, same weights


def kv_name(kv_bits: int | None) -> str:
    return "bf16" if kv_bits is None else f"{kv_bits}-bit"


def bench_zaya(config: ZayaConfig, quant: str | None, model: Model, rows=((1, 256), (8, 256)), kv_formats=(None,),
               steps: int = 64, fused: bool = True, check: bool = True, log=print, compiled: bool = True,
               label: str | None = None, runs: int = 1, chunk: int = 2048, bandwidth: float | None = None,
               skip: dict | None = None) -> Result:
    """The model's figures at each batch x context and KV format (see Row), but those in ``skip`` (BenchPlan's)."""
    skip = skip or {}
    total, experts = weight_bytes(model), expert_weight_bytes(model)
    name = label or (("zaya-mlx (fused decode)" if compiled else "zaya-mlx (fused, not compiled)") if fused
                     else "zaya-mlx (plain ops)")
    res = Result(name, quant or "bf16", str(mx.default_device()), total / 1e9,
                 weights_read(total, experts, config.num_experts, 1) / 1e9)
    options = model.decode_options
    model.decode_options = replace(options, fused=fused, compile=compiled)
    try:
        for bits in kv_formats:
            kv = res.kv_bytes_per_token[kv_name(bits)] = kv_bytes_per_token(config, kv_bits=bits)
            for b, ctx in rows:
                if (bits, b, ctx) in skip:
                    log(f"  {_row_name(b, ctx, bits)}: skipped, it needs ~{format_bytes(skip[bits, b, ctx])}")
                    continue
                grouped = fused and model.decode_options.groups_experts(b)
                moved = weights_read(total, experts, config.num_experts, b, grouped) + b * ctx * kv
                try:
                    row = measure_row(model, lambda: model.make_cache(kv_bits=bits), b, ctx, kv_name(bits),
                                      steps=steps, runs=runs, vocab=config.vocab_size, chunk=chunk,
                                      bytes_per_step=moved, bandwidth=bandwidth)
                except RuntimeError as e:  # how MLX says its back end cannot run an op or a kernel: the other
                    # rows still get measured (a GPU's time is short), and the run ends in an error
                    said = first_line(e)[:200]
                    res.failed.append(f"{_row_name(b, ctx, bits)}: {said}")
                    log(f"  {_row_name(b, ctx, bits)}: failed: {said}")
                    gc.collect()
                    mx.clear_cache()
                    continue
                res.rows.append(row)
                log(f"  {b} x {ctx}, {kv_name(bits)} KV: {row.line()}")
        if res.rows:
            res.primitive_kinds = count_primitives(model, model.make_cache, res.rows[0].batch)[1]
        if check and fused and res.rows:
            batch = max(row.batch for row in res.rows)
            res.max_rel_logit_diff = max(fused_vs_plain(model, config.vocab_size, batch=batch)[0])
            log(f"  fused vs plain decode logits: max |diff| / max |logit| = {res.max_rel_logit_diff:.2e}")
    finally:
        model.decode_options = options
    return res


def fused_vs_plain(model: Model, vocab: int, batch: int = 2, context: int = 24, steps: int = 4,
                   left_padding: list | None = None, fused_context=contextlib.nullcontext,
                   kv_bits: int | None = None) -> tuple[list, list]:
    """Fused path against the model's plain ops: a random prompt prefilled into two caches, then `steps` decode
    steps of the plain path's greedy choice through both (the fused ones inside fused_context()). Returns (each
    step's max |logit difference| / max |logit|, the fused path's cache). The model's options are kept but for
    ``fused``, and restored after. kv_bits: both caches quantized so."""
    options = model.decode_options
    sides = {on: replace(options, fused=on) for on in (False, True)}
    tokens = mx.random.randint(0, vocab, (batch, context)).astype(mx.int32)
    caches, last = {}, {}
    try:
        for on in (False, True):
            model.decode_options = sides[on]
            caches[on] = model.make_cache(left_padding, kv_bits=kv_bits)
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


def markdown(results: list[Result], command: str, bandwidth: float | None = None) -> str:
    bandwidth = bandwidth or device_bandwidth()
    bw = f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "unknown (--bandwidth)"
    lines = [f"Command: `{command}`",
             f"Device: {results[0].device if results else '?'} {mx.device_info().get('device_name', '')}, kernels: "
             f"{kernels.backend()}, memory bandwidth {bw}", ""]
    lines.append("| model | weights | GB | KV | batch x context | prefill tok/s | decode tok/s | ms / step | "
                 "GB moved / step | bound tok/s | share of bound | primitives / step | peak GB |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for row in r.rows:
            bound = f"{row.bound_tps:,.0f} | {row.share:.0%}" if row.bound_tps else "- | -"
            lines.append(f"| {r.name} | {r.quant} | {r.weight_gb:.2f} | {row.kv} | {row.batch} x {row.context} | "
                         f"{row.prefill_tps:,.0f} | {row.decode_tps:,.1f} | {row.ms_per_step:.2f} | "
                         f"{row.bytes_per_step / 1e9:.2f} | {bound} | {row.primitives} | {row.peak_gb:.1f} |")
    failed = [f"- {r.name}, {r.quant}, {f}" for r in results for f in r.failed]
    if failed:
        lines += ["", "Rows that did not run:", *failed]
    return "\n".join(lines) + "\n"


# --- the memory plan --------------------------------------------------------------------------------------------


def lazy_model(config: ZayaConfig, quant: str | None = None, checkpoint=None) -> Model:
    """The model's modules, quantized as they will be, with no weight computed (MLX is lazy): their bytes, read off
    the shapes, for the plan before anything is built."""
    model = Model(config)
    if checkpoint is not None and config.quantization:
        from .loading import apply_quantization

        apply_quantization(model, config.quantization, checkpoint.tensors)
    else:
        quantize_as_recipe(model, quant, lazy=True)
    return model


@dataclass
class BenchPlan:
    """Bytes a run needs at its peak: the weights; while building, one layer made in float32 and cast; then, at the
    largest row that fits, its KV cache twice over (a cache grows by concatenation, and the fused step copies buffers
    it did not make once, so old and new are alive together for a moment) and the working memory (one prefill
    chunk's activations, attention scores where the CPU's attention makes them, a step's logits). skipped: the rows
    (KV bits, batch, context) that do not fit, each with the bytes it needs."""
    weights: int
    build: int
    kv: int
    working: int
    row: str
    budget: int
    source: str
    skipped: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.weights + max(self.build, self.kv + self.working)

    def summary(self) -> str:
        return (f"needs ~{format_bytes(self.peak)} (weights {format_bytes(self.weights)}, then at {self.row} KV "
                f"{format_bytes(self.kv)} and working memory {format_bytes(self.working)}) of a "
                f"{format_bytes(self.budget)} budget ({self.source})")


def _row_name(b: int, ctx: int, bits: int | None) -> str:
    return f"{b} x {ctx} ({kv_name(bits)} KV)"


def plan_bench(config: ZayaConfig, model: Model, rows, kv_formats, *, steps: int, runs: int, chunk: int,
               budget: tuple[int, str] | None = None, random_weights: bool = True, cpu: bool | None = None) -> BenchPlan:
    """The plan for measuring ``model`` (a lazy_model, its weights in bf16) at ``rows``: rows that do not fit the
    budget (default: rsa.default_memory_budget's share of the machine) are skipped; a ZayaError naming what to lower
    where the model does not fit, or no row does. cpu: whether attention runs on the CPU (default: this device's)."""
    if budget is None:
        from .rsa.memory import default_memory_budget

        budget = default_memory_budget()
    params = tree_flatten(model.parameters())
    weights = sum(v.size * 2 if mx.issubdtype(v.dtype, mx.floating) else v.nbytes for _, v in params)
    layer = max(sum(v.size for _, v in tree_flatten(m.parameters())) for m in model.layers)
    build = layer * (4 + 2) if random_weights else 0
    H, V, NH = config.hidden_size, config.vocab_size, config.num_attention_heads
    cpu = mx.default_device() == mx.cpu if cpu is None else cpu

    def needs(b, ctx, bits):
        held = -(-(ctx + runs * steps + 32) // 4096) * 4096
        kv = 2 * b * held * kv_bytes_per_token(config, kv_bits=bits)
        n = b * min(chunk, ctx)
        working = n * (10 * H + 3 * config.moe_intermediate_size) * 4 + 3 * b * V * 4
        if cpu:
            working += 2 * n * NH * ctx * 4
        return kv, working

    room = int(budget[0]) - weights
    every = {(bits, b, ctx): needs(b, ctx, bits) for bits in kv_formats for b, ctx in rows}
    fit = {k: v for k, v in every.items() if sum(v) <= room}
    if weights + build > budget[0]:
        lower = ("use a quantized checkpoint (zaya quantize)" if not random_weights
                 else "use --quant mxfp4, fewer --experts (a token reads one either way) or --small")
        raise ZayaError(f"the model needs ~{format_bytes(weights + build)} ({format_bytes(weights)} of weights) of "
                        f"a {format_bytes(budget[0])} budget ({budget[1]}): {lower}, or raise --memory")
    if not fit:
        key = min(every, key=lambda k: sum(every[k]))
        raise ZayaError(f"no row fits: the smallest, {_row_name(key[1], key[2], key[0])}, needs "
                        f"{format_bytes(weights + sum(every[key]))} of a {format_bytes(budget[0])} budget "
                        f"({budget[1]}) with {format_bytes(weights)} of weights: lower its batch or context, or "
                        "quantize the KV (--kv 8), or raise --memory")
    key = max(fit, key=lambda k: sum(fit[k]))
    return BenchPlan(weights, build, *fit[key], _row_name(key[1], key[2], key[0]), int(budget[0]), budget[1],
                     {k: weights + sum(v) for k, v in every.items() if k not in fit})


# --- the whole benchmark ----------------------------------------------------------------------------------------


def run(quants=("bf16", "mxfp4"), rows=((1, 256), (8, 256)), kv_formats=(None,), steps=64, small=False, plain=False,
        experts: int | None = None, runs: int = 3, chunk: int = 2048, bandwidth: float | None = None,
        model_path: str | None = None, memory: float | None = None, options: DecodeOptions | None = None,
        group_experts_from: tuple | None = None, log=print) -> list[Result]:
    """The whole benchmark; returns one Result per (model, weights) measured. Every model is planned (plan_bench)
    before the first is built. experts: fewer experts than the config's, for quick A/B runs: with top-1 routing a
    token reads one expert either way, so a step's graph and the bytes it reads stay the same (but for the
    router's output rows, one an expert) while the model builds in seconds. runs: each decode rate is the median of
    this many timed runs, for every model alike. model_path: a checkpoint measured in place of random weights.
    memory: the budget in GB (default: a share of the machine's). bandwidth: bytes/s (default device_bandwidth()).
    options: the models' decode options (their ``kernels``, and ``compile`` for the first fused run; the runs choose
    ``fused``). group_experts_from: a fused run for each of these DecodeOptions.group_experts_from (None: the
    experts never grouped), on the same model, to compare the expert kernel's forms in one run; default: the
    options' own."""
    options = options or DecodeOptions()
    bandwidth = bandwidth or device_bandwidth()
    budget = (int(memory * 1e9), "--memory") if memory else None
    checkpoint = None
    if model_path is not None:
        from .loading import open_checkpoint, resolve_model_path

        checkpoint = open_checkpoint(resolve_model_path(model_path))
        config = checkpoint.config
        qc = config.quantization or {}
        quants = (f"{qc.get('mode', 'affine')}{qc.get('bits', '')}" if qc else "bf16",)
    else:
        config = small_config() if small else full_config()
        if experts is not None:
            config = replace(config, num_experts=experts)
    plans = {}
    for q in quants:
        lazy = lazy_model(config, None if q in UNQUANTIZED else q, checkpoint)
        plans[q] = plan_bench(config, lazy, rows, kv_formats, steps=steps, runs=runs, chunk=chunk, budget=budget,
                              random_weights=checkpoint is None)
        del lazy
    results = []
    for q in quants:
        plan = plans[q]
        log(f"zaya-mlx {q}: {plan.summary()}")
        t0 = time.perf_counter()
        if checkpoint is not None:
            from .loading import load_model

            model = load_model(checkpoint.path)
        else:
            model = build_zaya(config, None if q in UNQUANTIZED else q, log=log)
        log(f"  {'loaded' if checkpoint is not None else 'built'} in {time.perf_counter() - t0:.1f} s")
        model.decode_options = options
        q = None if q in UNQUANTIZED else q
        kw = dict(rows=rows, kv_formats=kv_formats, log=log, runs=runs, chunk=chunk, bandwidth=bandwidth,
                  skip=plan.skipped)
        for g in group_experts_from or (options.group_experts_from,):
            model.decode_options = replace(options, group_experts_from=g)
            label = None
            if group_experts_from:
                grouping = "experts a token a threadgroup" if g is None else f"experts grouped from batch {g}"
                label = f"zaya-mlx (fused decode, {grouping})"
                log(f"{label}:")
            results.append(bench_zaya(config, q, model, steps=steps, compiled=options.compile, label=label, **kw))
        model.decode_options = options
        if plain:
            log(f"zaya-mlx {q or 'bf16'} (fused, not compiled):")
            results.append(bench_zaya(config, q, model, steps=steps, check=False, compiled=False, **kw))
            log(f"zaya-mlx {q or 'bf16'} (plain ops):")
            results.append(bench_zaya(config, q, model, steps=max(8, steps // 4), fused=False, check=False, **kw))
        del model
        gc.collect()
        mx.clear_cache()
    return results


def to_dict(r: Result) -> dict:
    d = asdict(r)
    for row, out in zip(r.rows, d["rows"]):
        out.update(ms_per_step=row.ms_per_step, share=row.share)
    return d


# --- the quantized KV cache's quality -----------------------------------------------------------------------------


def kv_divergence(model: Model, prompt: mx.array, steps: int, kv_bits: int,
                  left_padding: list | None = None) -> tuple[list[float], float]:
    """How far a quantized KV cache moves the model's next-token distributions: ``prompt`` [B, L] prefilled, then
    ``steps`` greedy tokens chosen on the model's own cache (its dtype) and fed alike to both caches (teacher
    forcing: both see the same tokens, so the divergences do not compound through different choices). Returns
    (KL(p_cache || p_quantized) in nats at each position, the largest over the rows, and the share of positions
    whose greedy choice agrees in every row). left_padding: the prompt's rows are left-padded so (batch caches)."""
    ref, quant = model.make_cache(left_padding), model.make_cache(left_padding, kv_bits=kv_bits)
    logits = [model(prompt, c, last_only=True) for c in (ref, quant)]
    kls, same = [], 0
    for i in range(steps + 1):
        logp, logq = (lg[:, -1].astype(mx.float32) - mx.logsumexp(lg[:, -1].astype(mx.float32), axis=-1, keepdims=True)
                      for lg in logits)
        kl = mx.sum(mx.exp(logp) * (logp - logq), axis=-1).max()
        tok = mx.argmax(logp, axis=-1, keepdims=True).astype(mx.int32)
        agree = mx.all(tok[:, 0] == mx.argmax(logq, axis=-1))
        mx.eval(kl, tok, agree)
        kls.append(kl.item())
        same += bool(agree.item())
        if i < steps:
            logits = [model(tok, c) for c in (ref, quant)]
    return kls, same / (steps + 1)
