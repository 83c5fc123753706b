"""Markovian RSA: ZAYA1's bounded-context test-time compute (ZAYA1-8B report, arXiv 2605.05365; RSA, arXiv 2509.26626).

Parameters: population `n`, tails per aggregation prompt `c` (<= n), tail length `tau` tokens, per-rollout budget
`budget` (beta) tokens, aggregation rounds `rounds` (T).

- Round 0: `n` rollouts of the problem, at most beta new tokens each. They share one prompt: it is prefilled
  once and its cache reused by every rollout.
- A rollout's tail is its last `tau` generated token ids (the end-of-turn id it stopped on is not part of it:
  that id would close the user turn it is spliced into). Tails stay token ids: no decode/re-encode drift.
- Round t = 1..T: each of `n` new rollouts gets an aggregation prompt: the chat template around
  [problem + `c` distinct tails sampled (seeded) from round t-1 + framing], and continues to a final answer in at
  most beta tokens. The head the round's prompts share (chat preamble, template head, problem, first tail's
  heading) is prefilled once; each prompt's remainder is prefilled on a copy of that cache.
- Result: the final answers of the last population (see `extract_answer`), majority vote (see `vote`).

Edge cases: T = 0 is parallel sampling with a vote; c = 1 is a bounded continuation of one trace (Delethink-like);
tau >= beta carries whole chains (full-chain RSA).

Bounded context: no sequence ever holds more than `prompt + c x (tau + framing) + beta` tokens, where prompt +
c x framing is counted exactly: the non-tail tokens of an aggregation prompt (and never less than the round-0
prompt). The engine checks it before and after every rollout (`ContextBoundError`).

Each round runs as one batched decode of its rollouts (`zaya_mlx.generation.batch_generate`: one forward a step),
in sub-batches when the memory plan (`plan_memory`) says the whole population does not fit.

The aggregation prompt. The weights were co-trained on Zyphra's own aggregation format; no published copy of it
was found (the technical report and its appendix as stored publicly, the model card, Zyphra's repositories were
searched). The default template, `tails` (`templates/rsa_tails.jinja`), is RSA's aggregation prompt (Venkatraman et
al., github.com/HyperPotatoNeo/RSA, `aggregate_prompt`) rewritten for tails; `brief` is a shorter variant. Templates
are data (`zaya_mlx/templates/rsa_<name>.jinja`), selectable by name or path; swap in Zyphra's verbatim format when
it is published.

API: `run(model, tokenizer, problem, n, c, tau, budget, rounds, seed, ...) -> RSAResult`, `PRESETS`, `plan_memory`,
`extract_answer`, `vote`, `RSAEvent` (kinds in `EVENT_KINDS`).
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

from .errors import ZayaError

# --- presets ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named parameter set. `rounds` counts aggregation rounds after round 0 (total rounds = rounds + 1)."""

    n: int
    c: int
    tau: int
    budget: int
    rounds: int
    description: str = ""


PRESETS: dict[str, Preset] = {
    # ~5 GB MXFP4 weights + 4 x (~0.3k prompt + 2 x (1024 + framing) + 4096) tokens x 40 KB (bf16 KV) ~ 1 GB of cache.
    "laptop": Preset(n=4, c=2, tau=1024, budget=4096, rounds=2,
                     description="fits a 16 GB Mac with the ~5 GB MXFP4 model"),
    # The report's setting: 4K tail carried between rounds, 40K per rollout; RSA's usual N = 16, K = 4, T = 10.
    "report": Preset(n=16, c=4, tau=4096, budget=40960, rounds=10,
                     description="the paper's setting (tau 4K, beta 40K, N 16, C 4, T 10)"),
}
DEFAULT_PRESET = "laptop"

# Sampling: temperature 0.6 is the common choice for reasoning models (the report's own settings are not given).
DEFAULT_TEMPERATURE = 0.6

EVENT_KINDS = ("plan", "round_started", "token", "rollout_finished", "tail_taken", "answer_extracted",
               "round_finished", "vote")


@dataclass
class RSAEvent:
    """One progress event. `round`/`rollout` are -1 where they do not apply.

    plan: data = {"plan": MemoryPlan}. round_started: {"prompts": [ids...], "parents": [[...]...], "prefix_len"}.
    token: {"token": id}. rollout_finished: {"tokens": n generated, "finish_reason": "stop"|"length"}.
    tail_taken: {"tail": ids}. answer_extracted: {"answer": str|None, "kind": "boxed"|"text"|"missing"}.
    round_finished: {"seconds", "tokens", "tokens_per_s"}. vote: {"answer", "votes", "winner"}.
    """

    kind: str
    round: int = -1
    rollout: int = -1
    data: dict = field(default_factory=dict)


class ContextBoundError(AssertionError):
    """A sequence exceeded the bounded-context invariant (a bug in the engine, never a user error)."""


# --- answers and the vote -----------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete `\\boxed{...}` (nested braces balanced) or `\\boxed x`, in order."""
    out = []
    for m in _BOXED.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        out.append(text[i + 1 : j])
                        break
                j += 1
        elif m.group(0).endswith(" ") and i < len(text):  # "\boxed 5": up to whitespace or $
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                out.append(word.group(0))
    return out


def normalize_answer(answer: str) -> str:
    """Display form: whitespace collapsed, outer `$...$`/`\\(...\\)` and a trailing period removed."""
    a = " ".join(answer.split())
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(a) >= len(left) + len(right) and a.startswith(left) and a.endswith(right):
            a = a[len(left) : len(a) - len(right)].strip()
    return a.rstrip(".").strip()


def answer_key(answer: str) -> str:
    """What the vote compares: the normalized answer with all whitespace removed."""
    return "".join(normalize_answer(answer).split())


def extract_answer(text: str, *, starts_in_reasoning: bool = False) -> tuple[Optional[str], str]:
    """`(answer, kind)` of one rollout's generated text; kind is "boxed", "text" or "missing".

    1. The last complete `\\boxed{...}` after the reasoning block, else the last one anywhere (a rollout cut off
       mid-reasoning may have boxed a result already).
    2. Else the text after the reasoning block (`</think>`), if any.
    3. Else missing (None): no box, and the reasoning block never closed or nothing followed it.
    A `</think>` before any `<think>` means the prompt opened the block (as if `starts_in_reasoning`).
    """
    from .reasoning import THINK_END, THINK_START, split_reasoning

    close = text.find(THINK_END)
    if close >= 0 and THINK_START not in text[:close]:
        starts_in_reasoning = True
    _, after = split_reasoning(text, starts_in_reasoning=starts_in_reasoning)
    for part in (after, text):
        boxes = [b for b in _boxed_contents(part) if normalize_answer(b)]
        if boxes:
            return normalize_answer(boxes[-1]), "boxed"
    after = normalize_answer(after)
    return (after, "text") if after else (None, "missing")


def vote(answers: Sequence[Optional[str]]) -> tuple[Optional[str], dict[str, int], int]:
    """Majority vote: `(answer, votes, winner)`.

    Answers are compared by `answer_key`; a missing answer (None) casts no vote. `votes` maps each distinct answer
    (the form of its first occurrence) to its count, most votes first, ties in order of first occurrence.
    Tie rule (deterministic): among the answers with the most votes, the one that occurs first (lowest rollout
    index) wins. `winner` is that first occurrence's index; with no answers at all: `(None, {}, -1)`.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    shown: dict[str, str] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        k = answer_key(a)
        if k not in counts:
            counts[k], first[k], shown[k] = 0, i, a
        counts[k] += 1
    if not counts:
        return None, {}, -1
    order = sorted(counts, key=lambda k: (-counts[k], first[k]))
    return shown[order[0]], {shown[k]: counts[k] for k in order}, first[order[0]]


# --- templates and prompts ----------------------------------------------------------------------------------------

TEMPLATE_PREFIX = "rsa_"
DEFAULT_TEMPLATE = "tails"


def list_templates() -> list[str]:
    """Names of the packaged aggregation templates (`zaya_mlx/templates/rsa_<name>.jinja|.txt`)."""
    names = []
    for f in resources.files("zaya_mlx.templates").iterdir():
        stem, _, ext = f.name.rpartition(".")
        if stem.startswith(TEMPLATE_PREFIX) and ext in ("jinja", "txt"):
            names.append(stem[len(TEMPLATE_PREFIX) :])
    return sorted(names)


def load_template(name_or_path: str) -> str:
    """A template's source: a packaged name (`tails`, `brief`, ...) or a path to a .jinja/.txt file."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".jinja", ".txt") and p.exists():
        return p.read_text()
    root = resources.files("zaya_mlx.templates")
    for ext in ("jinja", "txt"):
        f = root / f"{TEMPLATE_PREFIX}{name_or_path}.{ext}"
        if f.is_file():
            return f.read_text()
    raise ZayaError(f"unknown RSA template {name_or_path!r}: use one of {', '.join(list_templates())} or a path to a "
                    ".jinja file")


def _render_template(source: str, **variables) -> str:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    try:
        return env.from_string(source).render(**variables)
    except jinja2.TemplateError as e:
        raise ZayaError(f"the RSA template failed to render: {e}") from e


_SENTINEL = "\u27e6RSA-TAIL-{}\u27e7"  # never produced by a template or a chat template


class PromptBuilder:
    """Token ids of round-0 and aggregation prompts for one problem.

    An aggregation prompt is `pieces[0] + tail_1 + pieces[1] + ... + tail_c + pieces[c]`: the template is rendered
    with placeholders, wrapped in the chat template (the user turn, then the generation prompt), split at the
    placeholders, and each text piece tokenized on its own; the tails go in as ids. `pieces[0]` is the head every
    aggregation prompt of a run shares.
    """

    def __init__(self, tokenizer, problem: str, c: int, tau: int, *, template: str = DEFAULT_TEMPLATE,
                 enable_thinking: bool = True, system: Optional[str] = None, template_vars: Optional[dict] = None):
        from .tokenizer import apply_chat_template, render_chat, require_tokenizer

        self.tokenizer = require_tokenizer(tokenizer)
        self.problem, self.c, self.tau = problem, c, tau
        self.source = load_template(template)
        pre = [{"role": "system", "content": system}] if system else []
        self.round0 = list(apply_chat_template(self.tokenizer, pre + [{"role": "user", "content": problem}],
                                               enable_thinking=enable_thinking))
        marks = [_SENTINEL.format(i) for i in range(c)]
        content = _render_template(self.source, problem=problem, tails=marks, tau=tau, **(template_vars or {}))
        missing = [m for m in marks if content.count(m) != 1]
        if missing:
            raise ZayaError("the RSA template must place each tail exactly once (render `tails` in a loop)")
        text = render_chat(self.tokenizer, pre + [{"role": "user", "content": content}], enable_thinking=enable_thinking)
        parts, rest = [], text
        for m in marks:
            before, sep, rest = rest.partition(m)
            if not sep:
                raise ZayaError("the chat template dropped or reordered the RSA tails")
            parts.append(before)
        parts.append(rest)
        self.pieces = [list(self.tokenizer.encode(p, add_special_tokens=False)) for p in parts]
        self.fixed_tokens = sum(len(p) for p in self.pieces)
        self.framing_tokens = len(self.pieces[1]) if c > 1 else 0

    @property
    def head(self) -> list[int]:
        return self.pieces[0]

    def build(self, tails: Sequence[Sequence[int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """`(ids, spans)`: the aggregation prompt for these tails and where each tail sits in it."""
        if len(tails) != self.c:
            raise ValueError(f"expected {self.c} tails, got {len(tails)}")
        ids, spans = list(self.pieces[0]), []
        for tail, piece in zip(tails, self.pieces[1:]):
            spans.append((len(ids), len(ids) + len(tail)))
            ids += list(tail)
            ids += piece
        return ids, spans


# --- memory plan --------------------------------------------------------------------------------------------------

KV_ALLOC_STEP = 256  # mlx-lm's KVCache grows in steps of 256 tokens


def machine_memory() -> tuple[int, str]:
    """`(bytes, source)`: what the accelerator may use (Metal's recommended working set, the CUDA device's memory)
    or, on a CPU, the machine's RAM (/proc/meminfo on Linux, sysctl hw.memsize on macOS, else sysconf)."""
    import mlx.core as mx

    try:
        if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()):
            info = mx.device_info()
            for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
                if info.get(key):
                    return int(info[key]), f"device {key}"
    except Exception:
        pass
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemTotal"
        except OSError:
            pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5)
            return int(out.stdout.strip()), "sysctl hw.memsize"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "sysconf"
    except (ValueError, OSError, AttributeError):
        return 16 << 30, "assumed 16 GiB"


def default_memory_budget() -> tuple[int, str]:
    """A safe share of the machine: 90% of Metal's recommended working set (itself ~2/3-3/4 of RAM), 85% of a
    CUDA device, 75% of a CPU machine's RAM."""
    total, source = machine_memory()
    share = 0.9 if "max_recommended" in source else 0.85 if source.startswith("device") else 0.75
    return int(total * share), f"{share:.0%} of {source}"


@dataclass
class MemoryPlan:
    """How a run fits in memory. Bytes unless named otherwise.

    context_bound: the most tokens a sequence holds (prompt + c x (tau + framing) + beta).
    sequence_bytes: one sequence's cache at the bound: twice its KV (allocation rounded up to mlx-lm's 256-token
    steps; twice because mlx-lm grows a cache by concatenation, so while a decode step is in flight the old and the
    new buffers can both be alive) + conv state.
    fixed_bytes: weights + the shared prefix cache + working memory: one layer's weights (what a layer may copy
    or dequantize while it runs) and activations (prefill chunk, decode logits, attention scratch).
    Measured on an H100 with MLX-CUDA, 8B shapes, bf16, N = 16 at a 2,560-token bound (bench/bench_rsa.py):
    peak 19.57 GB (op-by-op decode) and 20.29 GB (fused decode) against 21.6 GB planned; with the KV counted once
    the plan (19.9 GB) was below the fused peak.
    batch_size: sequences decoded together; sub_batches = ceil(n / batch_size) per round.
    """

    n: int
    c: int
    tau: int
    beta: int
    prompt_tokens: int
    framing_tokens: int
    context_bound: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    sequence_bytes: int
    weights_bytes: int
    layer_bytes: int
    prefix_bytes: int
    activation_bytes: int
    budget_bytes: int
    budget_source: str
    batch_size: int
    sub_batches: int
    peak_bytes: int

    @property
    def fixed_bytes(self) -> int:
        return self.weights_bytes + self.layer_bytes + self.prefix_bytes + self.activation_bytes

    def summary(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        sub = f" in {self.sub_batches} sub-batches of {self.batch_size}" if self.sub_batches > 1 else ""
        return (f"{self.n} rollouts{sub}, each <= {self.context_bound} tokens "
                f"({self.prompt_tokens} prompt + {self.c} x {min(self.tau, self.beta)} tail + {self.beta} budget), "
                f"KV {self.kv_bytes_per_token / 1024:.0f} KB/token: plan {gb(self.peak_bytes)} "
                f"(weights {gb(self.weights_bytes)}, caches {gb(self.batch_size * self.sequence_bytes)}) "
                f"of {gb(self.budget_bytes)} budget ({self.budget_source})")


def kv_bytes_per_token(args, dtype_bytes: int = 2) -> int:
    """Keys and values of every layer for one token: layers x 2 x kv heads x head_dim x dtype bytes."""
    return args.num_hidden_layers * 2 * args.num_key_value_heads * args.head_dim * dtype_bytes


def state_bytes_per_sequence(args, dtype_bytes: int = 2) -> int:
    """The CCA conv window (S previous q/k inputs) and the previous token's delayed value, every layer."""
    s = (args.cca_time0 - 1) + (args.cca_time1 - 1)
    channels = (args.num_attention_heads + args.num_key_value_heads) * args.head_dim
    return args.num_hidden_layers * (s * channels + args.num_key_value_heads * args.head_dim // 2) * dtype_bytes


def _alloc(tokens: int) -> int:
    return KV_ALLOC_STEP * math.ceil(tokens / KV_ALLOC_STEP)


def plan_memory(args, *, n: int, c: int, tau: int, beta: int, prompt_tokens: int, framing_tokens: int = 0,
                context_bound: Optional[int] = None, head_tokens: int = 0, weights_bytes: int = 0,
                layer_bytes: int = 0, dtype_bytes: int = 2, budget_bytes: Optional[int] = None, budget_source: str = "given",
                prefill_step_size: int = 512, max_batch: Optional[int] = None) -> MemoryPlan:
    """Fit `n` sequences of at most `context_bound` tokens (default prompt + c x min(tau, beta) + beta) into the budget,
    decoding at most `max_batch` together (default: all n).

    Raises ZayaError naming the parameter to lower when not even one sequence fits, or when the bound is over the
    model's context length.
    """
    if budget_bytes is None:
        budget_bytes, budget_source = default_memory_budget()
    tail = min(tau, beta)
    bound = context_bound if context_bound is not None else prompt_tokens + c * tail + beta
    max_pos = getattr(args, "max_position_embeddings", None)
    if max_pos and bound > max_pos:
        culprit = "--budget (beta)" if beta >= c * tail else "--tau or --c"
        raise ZayaError(f"an RSA sequence may hold {bound} tokens ({prompt_tokens} prompt + {c} x {tail} tail + {beta} "
                        f"budget), over the model's context of {max_pos}; lower {culprit}")
    kv = kv_bytes_per_token(args, dtype_bytes)
    state = state_bytes_per_sequence(args, dtype_bytes)
    seq = 2 * _alloc(bound) * kv + state
    prefix = _alloc(head_tokens) * kv + state
    V, H = args.vocab_size, args.hidden_size
    inter = getattr(args, "moe_intermediate_size", 4 * H)
    # Prefill of one chunk: hidden-sized activations (~10 live), the expert MLP, attention scores over the bound.
    prefill_act = prefill_step_size * (10 * H + 3 * inter + args.num_attention_heads * bound) * 4

    def act(b: int) -> int:  # + the last position's logits, and per decode step fp32 logits/log-probs x 3
        return prefill_act + V * 4 + 3 * b * V * 4 + b * 10 * H * 4

    fixed = weights_bytes + layer_bytes + prefix
    b = min(n, max_batch) if max_batch else n
    while b >= 1 and fixed + act(b) + b * seq > budget_bytes:
        b -= 1
    if b < 1:
        gb = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
        if fixed >= budget_bytes:
            raise ZayaError(f"the model ({gb(weights_bytes)}) alone fills the RSA memory budget of {gb(budget_bytes)}: "
                            "use a quantized model (zaya quantize) or raise --memory")
        culprit = "--budget (beta)" if beta >= c * tail else "--tau or --c"
        raise ZayaError(f"one RSA sequence of {bound} tokens needs {gb(seq + act(1))} (cache and working memory) and "
                        f"only {gb(budget_bytes - fixed)} of the {gb(budget_bytes)} budget is left after the model: "
                        f"lower {culprit}, or raise --memory")
    sub = math.ceil(n / b)
    b = math.ceil(n / sub)  # even sub-batches: same count, smaller peak
    return MemoryPlan(n=n, c=c, tau=tau, beta=beta, prompt_tokens=prompt_tokens, framing_tokens=framing_tokens,
                      context_bound=bound, kv_bytes_per_token=kv, state_bytes_per_sequence=state, sequence_bytes=seq,
                      weights_bytes=weights_bytes, layer_bytes=layer_bytes, prefix_bytes=prefix, activation_bytes=act(b),
                      budget_bytes=int(budget_bytes), budget_source=budget_source, batch_size=b, sub_batches=sub,
                      peak_bytes=fixed + act(b) + b * seq)


def model_weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def model_layer_bytes(model) -> int:
    """Bytes of the model's largest decoder layer (0 when it has no `model.layers`)."""
    from mlx.utils import tree_flatten

    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return max((sum(v.nbytes for _, v in tree_flatten(layer.parameters())) for layer in layers), default=0)


def model_dtype_bytes(model, default: int = 2) -> int:
    """Bytes per element of the KV cache: the dtype the CCA projection computes in (its weight's, or for a
    quantized model its scales'), else a norm weight's."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    for suffix in ("qkv_proj.in_proj.weight", "qkv_proj.in_proj.scales", "norm.weight"):
        for name, v in params:
            if name.endswith(suffix) and mx.issubdtype(v.dtype, mx.floating):
                return v.dtype.size
    return default


# --- generation back ends -----------------------------------------------------------------------------------------

OnToken = Callable[[int, int], None]


class Backend(Protocol):
    """What the engine generates with: prompts (ids) in, generated ids out, one batched decode.

    `prefix_len`: the first `prefix_len` ids are the same in every prompt (a back end may prefill them once).
    `on_token(i, token)` for each generated token of prompt i. Output i may end with the stop id it stopped on.
    """

    def generate(self, prompts: list[list[int]], *, max_tokens: int, prefix_len: int,
                 on_token: Optional[OnToken]) -> list[list[int]]: ...


class ModelBackend:
    """`zaya_mlx.generation.batch_generate` on a model, the shared prefix prefilled once (reused across calls)."""

    def __init__(self, model, *, sampler=None, stop_ids: Sequence[int] = (), prefill_step_size: int = 512):
        self.model, self.sampler, self.stop_ids = model, sampler, tuple(stop_ids)
        self.prefill_step_size = prefill_step_size
        self._prefix: Optional[list[int]] = None
        self._cache = None

    def _prefix_cache(self, prefix: list[int]):
        from .generation import prefill

        if prefix != self._prefix:
            self._prefix, self._cache = None, None  # free the old one first
            cache = self.model.make_cache()
            prefill(self.model, prefix, cache, self.prefill_step_size)
            import mlx.core as mx

            mx.eval([c.state for c in cache])
            self._prefix, self._cache = list(prefix), cache
        return self._cache

    def generate(self, prompts, *, max_tokens, prefix_len, on_token=None):
        from .generation import batch_generate

        cache = self._prefix_cache(prompts[0][:prefix_len]) if prefix_len > 0 else None
        return batch_generate(self.model, prompts, max_tokens=max_tokens, sampler=self.sampler, stop_ids=self.stop_ids,
                              prefix_cache=cache, prefix_len=prefix_len if cache is not None else 0,
                              prefill_step_size=self.prefill_step_size, on_token=on_token)

    def release(self):
        self._prefix, self._cache = None, None


# --- the engine ---------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout. `tokens`: generated ids (with the stop id if it stopped on one); `tail`: its last tau ids
    without that stop id; `parents`: indices in the previous round of the rollouts whose tails it was given."""

    round: int
    index: int
    parents: list[int]
    prompt_tokens: int
    tokens: list[int]
    tail: list[int]
    finish_reason: str
    text: str
    answer: Optional[str]
    answer_kind: str


@dataclass
class RoundRecord:
    index: int
    rollouts: list[Rollout]
    seconds: float
    tokens: int

    @property
    def answers(self) -> list[Optional[str]]:
        return [r.answer for r in self.rollouts]


@dataclass
class RSAResult:
    """answer: the vote's winner (None when no rollout of the last round gave one); votes: answer -> count, most first;
    winner: index of the winning answer's first rollout in the last round (-1 if none), winner_text its text."""

    answer: Optional[str]
    votes: dict[str, int]
    winner: int
    winner_text: str
    rounds: list[RoundRecord]
    tokens_generated: int
    timings: dict
    plan: MemoryPlan
    params: dict


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ContextBoundError(message)


def _strip_stop(tokens: Sequence[int], stop_ids: set) -> list[int]:
    tokens = list(tokens)
    while tokens and tokens[-1] in stop_ids:
        tokens.pop()
    return tokens


def _resolve(preset: Optional[str], **given) -> dict:
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ZayaError(f"unknown RSA preset {name!r}: use one of {', '.join(PRESETS)}")
    base = asdict(PRESETS[name])
    return {k: (v if v is not None else base[k]) for k, v in given.items()}


def run(model, tokenizer, problem: str, n: Optional[int] = None, c: Optional[int] = None, tau: Optional[int] = None,
        budget: Optional[int] = None, rounds: Optional[int] = None, seed: int = 0, *, preset: Optional[str] = None,
        temperature: float = DEFAULT_TEMPERATURE, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
        sampler=None, template: str = DEFAULT_TEMPLATE, template_vars: Optional[dict] = None,
        enable_thinking: bool = True, system: Optional[str] = None, memory_budget: Optional[int] = None,
        max_batch: Optional[int] = None, stop_ids: Optional[Sequence[int]] = None, prefill_step_size: int = 512,
        on_event: Optional[Callable[[RSAEvent], None]] = None, backend: Optional[Backend] = None) -> RSAResult:
    """Run Markovian RSA on `problem` and vote on the last population's answers.

    n, c, tau, budget (beta), rounds (T, aggregation rounds after round 0): None takes the preset's value (`preset`,
    default "laptop"). `seed` seeds the sampler and the choice of tails. Sampling: temperature / top_p / top_k /
    min_p (vLLM order, `zaya_mlx.sampling`), or a ready `sampler`. `template`: a packaged template name or a path.
    `memory_budget` (bytes) defaults to a safe share of the machine (`default_memory_budget`); `max_batch` caps the
    rollouts decoded together (the plan may choose fewer). `on_event` gets every
    `RSAEvent`. `backend` replaces batched generation on `model` (tests use a scripted one; `model` may then be None).
    """
    p = _resolve(preset, n=n, c=c, tau=tau, budget=budget, rounds=rounds)
    n, c, tau, beta, T = p["n"], p["c"], p["tau"], p["budget"], p["rounds"]
    for name, value, low in (("n", n, 1), ("tau", tau, 1), ("budget", beta, 1), ("rounds", T, 0), ("c", c, 1)):
        if int(value) != value or value < low:
            raise ZayaError(f"RSA --{name} must be a whole number >= {low}, got {value}")
    if T > 0 and c > n:
        raise ZayaError(f"RSA --c ({c}) cannot exceed --n ({n}): each prompt takes c distinct tails of the last round")
    if not problem or not problem.strip():
        raise ZayaError("the RSA problem is empty")
    emit = on_event or (lambda e: None)

    builder = PromptBuilder(tokenizer, problem, c, tau, template=template, enable_thinking=enable_thinking,
                            system=system, template_vars=template_vars)
    tok = builder.tokenizer
    if stop_ids is None:
        stop_ids = sorted(set(getattr(tok, "eos_token_ids", ()) or ()) | set(
            getattr(getattr(model, "args", None), "eos_token_ids", ()) or ()))
    stops = set(stop_ids)
    tail_max = min(tau, beta)
    agg_tokens = builder.fixed_tokens + c * tail_max if T > 0 else 0
    bound = max(len(builder.round0), agg_tokens) + beta
    prompt_tokens = max(len(builder.round0), builder.fixed_tokens if T > 0 else 0)

    args = getattr(model, "args", None)
    if args is not None:
        budget_src = "given"
        if memory_budget is None:
            memory_budget, budget_src = default_memory_budget()
        plan = plan_memory(args, n=n, c=c, tau=tau, beta=beta, prompt_tokens=prompt_tokens,
                           framing_tokens=builder.framing_tokens, context_bound=bound, head_tokens=len(builder.head),
                           weights_bytes=model_weight_bytes(model), layer_bytes=model_layer_bytes(model),
                           dtype_bytes=model_dtype_bytes(model),
                           budget_bytes=memory_budget, budget_source=budget_src, prefill_step_size=prefill_step_size,
                           max_batch=max_batch)
    else:  # a back end without a model: no memory to plan
        b = min(n, max_batch) if max_batch else n
        plan = MemoryPlan(n=n, c=c, tau=tau, beta=beta, prompt_tokens=prompt_tokens,
                          framing_tokens=builder.framing_tokens, context_bound=bound, kv_bytes_per_token=0,
                          state_bytes_per_sequence=0, sequence_bytes=0, weights_bytes=0, layer_bytes=0, prefix_bytes=0,
                          activation_bytes=0, budget_bytes=int(memory_budget or 0), budget_source="none",
                          batch_size=b, sub_batches=math.ceil(n / b), peak_bytes=0)
    emit(RSAEvent("plan", data={"plan": plan}))

    if backend is None:
        if sampler is None:
            from .sampling import make_sampler

            sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
        backend = ModelBackend(model, sampler=sampler, stop_ids=sorted(stops), prefill_step_size=prefill_step_size)

    think_ids = (getattr(tok, "think_start_id", None), getattr(tok, "think_end_id", None)) \
        if getattr(tok, "has_thinking", False) else (None, None)

    def starts_thinking(prompt: list[int]) -> bool:
        from .reasoning import starts_in_reasoning
        from .tokenizer import turn_start_id

        return starts_in_reasoning(prompt, think_ids[0], think_ids[1], turn_start_id(tok))

    rng = random.Random(seed)
    t_start = time.perf_counter()
    records: list[RoundRecord] = []

    def run_round(index: int, prompts: list[list[int]], parents: list[list[int]], prefix_len: int) -> RoundRecord:
        for i, pr in enumerate(prompts):
            _check(len(pr) + beta <= bound, f"round {index} rollout {i}: prompt {len(pr)} + budget {beta} tokens is over "
                                            f"the bound of {bound}")
        emit(RSAEvent("round_started", round=index, data={"prompts": prompts, "parents": parents,
                                                          "prefix_len": prefix_len}))
        tic = time.perf_counter()
        outputs: list[Optional[list[int]]] = [None] * n
        finished = [False] * n
        counts = [0] * n
        for start in range(0, n, plan.batch_size):
            idx = list(range(start, min(n, start + plan.batch_size)))

            def on_token(j: int, token: int, idx=idx) -> None:
                i = idx[j]
                counts[i] += 1
                emit(RSAEvent("token", round=index, rollout=i, data={"token": int(token)}))
                if int(token) in stops and not finished[i]:
                    finished[i] = True
                    emit(RSAEvent("rollout_finished", round=index, rollout=i,
                                  data={"tokens": counts[i], "finish_reason": "stop"}))

            outs = backend.generate([prompts[i] for i in idx], max_tokens=beta, prefix_len=prefix_len,
                                    on_token=on_token)
            if len(outs) != len(idx):
                raise RuntimeError(f"the generator returned {len(outs)} outputs for {len(idx)} prompts")
            for i, out in zip(idx, outs):
                outputs[i] = [int(t) for t in out]
        seconds = time.perf_counter() - tic
        rollouts = []
        for i, out in enumerate(outputs):
            _check(len(out) <= beta and len(prompts[i]) + len(out) <= bound,
                   f"round {index} rollout {i} holds {len(prompts[i])} + {len(out)} tokens, over the bound of {bound}")
            body = _strip_stop(out, stops)
            reason = "stop" if len(body) < len(out) or len(out) < beta else "length"
            if not finished[i]:
                finished[i] = True
                emit(RSAEvent("rollout_finished", round=index, rollout=i,
                              data={"tokens": len(out), "finish_reason": reason}))
            tail = body[-tau:] if body else []
            emit(RSAEvent("tail_taken", round=index, rollout=i, data={"tail": tail}))
            text = tok.decode(body)
            answer, kind = extract_answer(text, starts_in_reasoning=starts_thinking(prompts[i]))
            emit(RSAEvent("answer_extracted", round=index, rollout=i, data={"answer": answer, "kind": kind}))
            rollouts.append(Rollout(round=index, index=i, parents=list(parents[i]), prompt_tokens=len(prompts[i]),
                                    tokens=out, tail=tail, finish_reason=reason, text=text, answer=answer,
                                    answer_kind=kind))
        total = sum(len(r.tokens) for r in rollouts)
        emit(RSAEvent("round_finished", round=index, data={"seconds": seconds, "tokens": total,
                                                           "tokens_per_s": total / max(seconds, 1e-9)}))
        return RoundRecord(index=index, rollouts=rollouts, seconds=seconds, tokens=total)

    # Round 0: one shared prompt; all but its last id prefilled once.
    r0 = builder.round0
    records.append(run_round(0, [r0] * n, [[] for _ in range(n)], len(r0) - 1))
    for t in range(1, T + 1):
        prev = records[-1].rollouts
        parents = [rng.sample(range(n), c) for _ in range(n)]
        prompts = [builder.build([prev[j].tail for j in ps])[0] for ps in parents]
        records.append(run_round(t, prompts, parents, len(builder.head)))
    if hasattr(backend, "release"):
        backend.release()

    last = records[-1].rollouts
    answer, votes, winner = vote([r.answer for r in last])
    emit(RSAEvent("vote", round=len(records) - 1, data={"answer": answer, "votes": votes, "winner": winner}))
    total_s = time.perf_counter() - t_start
    tokens = sum(r.tokens for r in records)
    return RSAResult(answer=answer, votes=votes, winner=winner, winner_text=last[winner].text if winner >= 0 else "",
                     rounds=records, tokens_generated=tokens,
                     timings={"total_s": total_s, "rounds_s": [r.seconds for r in records],
                              "tokens_per_s": tokens / max(total_s, 1e-9)},
                     plan=plan, params={"n": n, "c": c, "tau": tau, "budget": beta, "rounds": T, "seed": seed,
                                        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                                        "template": template, "preset": preset or DEFAULT_PRESET})
