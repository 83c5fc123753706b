"""The Markovian RSA engine: Zyphra's rounds, decoded in slots, each round streaming into the next.

The recipe (Zyphra's `run_rsa_chat_completion`): rounds 0..T. Round 0 is N copies of the request's messages.
Round r >= 1 builds N prompts (`final_count` in the last round), prompt i showing candidate i mod N of round
r - 1 when K = 1 (its own lineage), else K distinct candidates drawn uniformly without replacement, independently
for each prompt. Every round but the last writes at most `short_resp_len` tokens a rollout with the per-round
sampling; the last writes `max_tokens` with the final sampling. The answer is the last round's response(s).
T = 0 is one plain completion of the request.

How it is decoded (ours): the draws depend on nothing but the seed, so all of them are made up front, and each
rollout samples from its own seed, derived from (seed, round, index). A rollout starts as soon as a slot is
free and the K candidates it draws have finished, so round r + 1 begins in slots that would otherwise idle
while round r's slowest rollouts finish; which rollouts run beside which changes nothing in what each writes.
`schedule` "rounds" waits for a whole round first (Zyphra's order), "batches" also waits for a whole batch
(sub-batches one after another): same results, for comparison.

Events (`on_event(RSAEvent)`, in order; `round`/`rollout` are -1 where they do not apply):
  plan             data: plan (MemoryPlan), params (RSAParams), slots
  resumed          data: rollouts (finished rollouts read back from the run folder)
  round_started    round; data: rollouts (how many the round has)
  rollout_started  round, rollout; data: prompt_tokens, parents
  token            round, rollout; data: token (every generated id, the stop id included)
  rollout_finished round, rollout; data: rollout (Rollout), tokens, finish_reason, answer
  round_finished   round; data: tokens, mean_tokens, seconds, answers
  progress         data: tokens, elapsed, prompt_tokens, prefill_tps, decode_tps, peak_bytes (at most once a second)
  finished         data: result (RSAResult)
`cancel` (a threading.Event, or any callable returning True to stop) is checked between decode steps; a set
one raises `Cancelled` (what finished is kept in the run folder).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import time
import typing
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..errors import ZayaError
from .answers import Vote, extract_answer, vote
from .backends import Backend, ModelBackend
from .memory import MemoryPlan, default_memory_budget, model_dtype_bytes, model_layer_bytes, model_weight_bytes, \
    plan_memory
from .params import RSAParams
from .prompts import PromptBuilder, as_messages
from .tails import candidate_text, served_split, token_tail, word_tail

EVENT_KINDS = ("plan", "resumed", "round_started", "rollout_started", "token", "rollout_finished", "round_finished",
               "progress", "finished")
PROGRESS_EVERY = 1.0  # seconds between progress events
SCHEDULES = ("stream", "rounds", "batches")
BOUNDARY_TOKENS = 8  # ids a word candidate may gain when tokenized with the text around it (then it is cut)


class ContextBoundError(AssertionError):
    """A sequence outgrew the bound the plan sized the slots for (a bug in the engine, never a user error)."""


class Cancelled(ZayaError):
    """The run was stopped through `cancel`."""


@dataclass
class RSAEvent:
    kind: str
    round: int = -1
    rollout: int = -1
    data: dict = field(default_factory=dict)


@dataclass
class Rollout:
    """One finished rollout. tokens: generated ids (the stop id included when it stopped on one); text: their
    decoded text; candidate: what the next round is shown of it (a word tail, or the text of its token tail);
    tail_ids: its token tail (token tails only); tail_cut: a word tail cut at its token bound; prompt_text: the
    aggregation prompt's user message it was given (None in round 0, whose prompt is the request's messages)."""

    round: int
    index: int
    parents: list[int]
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str
    text: str
    candidate: str
    tail_ids: Optional[list[int]]
    tail_cut: bool
    answer: Optional[str]
    seed: int
    seconds: float = 0.0
    prompt_text: Optional[str] = None

    @classmethod
    def from_dict(cls, data: dict) -> "Rollout":
        """A rollout from its `dataclasses.asdict` form (a run folder's line, another host's message), each field of
        its declared type (a TypeError names the first that is not: a line edited or damaged is refused whole)."""
        if not isinstance(data, dict):
            raise TypeError(f"a rollout is an object, not {type(data).__name__}")
        kinds = typing.get_type_hints(cls)
        values = {k: v for k, v in data.items() if k in kinds}
        for name, value in values.items():
            if not _of_type(value, kinds[name]):
                kind = kinds[name]
                raise TypeError(f"{name} is {value!r:.40}, not {kind.__name__ if isinstance(kind, type) else kind}"
                                .replace("typing.", ""))
        if values.get("round", 0) < 0 or values.get("index", 0) < 0:
            raise TypeError("round and index are counts from 0")
        return cls(**values)

    @property
    def reasoning(self) -> str:
        return served_split(self.text)[0]

    @property
    def content(self) -> str:
        """The answer section, as vLLM's qwen3 parser serves it ("" when the reasoning never closed)."""
        return served_split(self.text)[1] or ""


def _of_type(value, kind) -> bool:
    """Whether a JSON value is of a field's type (int, float, str, bool, list[...], Optional[...]); a bool is no int."""
    if typing.get_origin(kind) is typing.Union:
        return any(_of_type(value, k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_of_type(v, typing.get_args(kind)[0]) for v in value)
    if kind is type(None):
        return value is None
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass
class RoundRecord:
    index: int
    rollouts: list[Rollout]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rollouts)

    @property
    def answers(self) -> list[Optional[str]]:
        return [r.answer for r in self.rollouts]


@dataclass
class RSAResult:
    """texts: the last round's responses (`final_count` of them); text: the first (Zyphra's choice 0);
    answer: the first response's extracted answer, or the vote's winner when `final_vote` (vote then holds the
    breakdown); metadata: Zyphra's `rsa_metadata`; usage: prompt/completion/total tokens;
    aggregation_prompt: the first final prompt as messages (Zyphra's `aggregation_prompt`; None when T = 0)."""

    text: str
    texts: list[str]
    answer: Optional[str]
    vote: Optional[Vote]
    rounds: list[RoundRecord]
    metadata: dict
    usage: dict
    params: RSAParams
    seed: int
    plan: MemoryPlan
    timings: dict
    run_dir: Optional[str] = None

    @property
    def aggregation_prompt(self) -> Optional[list[dict]]:
        text = self.finals[0].prompt_text
        return None if text is None else [{"role": "user", "content": text}]

    @property
    def finals(self) -> list[Rollout]:
        return self.rounds[-1].rollouts

    @property
    def tokens_generated(self) -> int:
        return self.usage["completion_tokens"]


def derived_seed(seed: int, *parts) -> int:
    """A 32-bit seed from the run's seed and a path (round, index, ...), the same on every host."""
    digest = hashlib.sha256(":".join(str(p) for p in ("zaya-rsa", seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def draw_candidates(params: RSAParams, seed: int, round: int) -> list[list[int]]:
    """Which rollouts of round - 1 each prompt of `round` (>= 1) shows: i mod N for K = 1, else K distinct
    indices drawn uniformly without replacement for each prompt, from a generator seeded by (seed, round)."""
    n, count = params.rsa_n, params.rollouts_in(round)
    if params.rsa_k == 1:
        return [[i % n] for i in range(count)]
    rng = random.Random(derived_seed(seed, "draw", round))
    return [rng.sample(range(n), params.candidates) for _ in range(count)]


def all_draws(params: RSAParams, seed: int) -> dict[int, list[list[int]]]:
    """Every aggregation round's draws, round -> prompt -> parents (what a run folder records up front)."""
    return {r: draw_candidates(params, seed, r) for r in range(1, params.rounds)}


def metadata(params: RSAParams, rounds: Sequence[RoundRecord], slots: int) -> dict:
    """Zyphra's `rsa_metadata` for this run: its parameters and the mean output tokens of each round."""
    return {
        "rsa_iterations": params.rsa_t, "rsa_k": params.rsa_k, "rsa_n": params.rsa_n, "rsa_summarize": False,
        "rsa_tail_window": True, "tail_window_len": params.tail_window_len, "short_resp_len": params.short_resp_len,
        "use_pacore": False, "rsa_max_concurrency": slots, "rsa_debug": False,
        "rsa_token_count_history": [sum(len(r.tokens) for r in rd.rollouts) / max(1, len(rd.rollouts))
                                    for rd in rounds],
    }


class _Live:
    """A rollout being decoded."""

    def __init__(self, prompt: list[int], parents: list[int], seed: int, prompt_text: Optional[str], host: int = 0):
        self.prompt, self.parents, self.seed, self.prompt_text, self.host = prompt, parents, seed, prompt_text, host
        self.tokens: list[int] = []
        self.started = time.perf_counter()


class Engine:
    """One run: the prompts, the draws, the slots, and what has finished. `run()` is the public entry point.
    `host` is the rank that decodes here; `free_slots`, `advance` and `resume` are what a run over several hosts
    (distributed.py) replaces."""

    host = 0

    def __init__(self, params: RSAParams, *, backend: Backend, plan: MemoryPlan, builder: PromptBuilder, seed: int,
                 stop_ids: Sequence[int], schedule: str,
                 emit: Callable[[RSAEvent], None], cancel=None, journal=None):
        self.p, self.seed, self.tok, self.backend, self.plan = params, seed, builder.tokenizer, backend, plan
        self.builder, self.emit, self.journal = builder, emit, journal
        self.stops = set(int(t) for t in stop_ids)
        self.schedule = schedule
        self.cancel = cancel if cancel is None or callable(cancel) else cancel.is_set
        self.draws = all_draws(params, seed)
        self.done: dict[tuple, Rollout] = {}
        self.running: dict[tuple, _Live] = {}
        self.pending = [(r, i) for r in range(params.rounds) for i in range(params.rollouts_in(r))]
        self.round_started: dict[int, float] = {}
        self.round_seconds: dict[int, float] = {}
        self.steps = 0
        self.idle_slot_steps = 0  # slots without a rollout, summed over decode steps
        self.tokens = 0
        self.started = time.perf_counter()
        self.last_progress = self.started
        tok = self.tok
        self.think = (getattr(tok, "think_start_id", None), getattr(tok, "think_end_id", None)) \
            if getattr(tok, "has_thinking", False) else (None, None)

    # --- prompts ------------------------------------------------------------------------------------------------

    def prompt_for(self, key) -> tuple[list[int], list[int], Sequence[int], Optional[str]]:
        """`(prompt ids, parents, shared prefix, user message text)` of a rollout whose candidates have finished
        (round 0's text is None: its prompt is the request's messages)."""
        r, i = key
        if r == 0:
            ids = self.builder.round0
            return ids, [], ids[:-1], None
        parents = self.draws[r][i]
        prev = [self.done[r - 1, j] for j in parents]
        candidates = [c.candidate for c in prev]
        if self.p.tail_unit == "tokens":
            ids = self.builder.build_tokens([c.tail_ids for c in prev])
        else:
            ids = self.builder.build_words(candidates)
            for _ in range(len(candidates)):  # tokenized in context, candidates at their bound may run over it
                over = len(ids) - self.plan.aggregate_tokens
                if not self.p.bounded_context or over <= 0:
                    break
                longest = max(range(len(candidates)), key=lambda j: len(self._encode(candidates[j])))
                cut = self._encode(candidates[longest])
                candidates[longest] = self.tok.decode(cut[over + 1 :]).strip()
                ids = self.builder.build_words(candidates)
        text = self.builder.text(candidates)
        if self.p.bounded_context and len(ids) > self.plan.aggregate_tokens:
            raise ContextBoundError(f"round {r} prompt {i} is {len(ids)} tokens, over the bound of "
                                    f"{self.plan.aggregate_tokens} the slots were planned for")
        return ids, parents, self.builder.head, text

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def _candidate(self, body: list[int], text: str) -> tuple[str, Optional[list[int]], bool]:
        p = self.p
        if p.tail_unit == "tokens":
            ids = token_tail(body, p.tail_window_len, p.tail_source, think_start_id=self.think[0],
                             think_end_id=self.think[1], has_content=lambda t: bool(self.tok.decode(t).strip()))
            return self.tok.decode(ids), ids, False
        tail = word_tail(candidate_text(text, p.tail_source), p.tail_window_len)
        if p.bounded_context:
            ids = self._encode(tail)
            if len(ids) > p.tail_token_bound:
                return self.tok.decode(ids[-p.tail_token_bound :]).strip(), None, True
        return tail, None, False

    def finish(self, key, live: _Live, reason: str) -> Rollout:
        from ..generation import prompt_opens_reasoning

        r, i = key
        body = list(live.tokens)
        while body and body[-1] in self.stops:
            body.pop()
        text = self.tok.decode(body)
        candidate, tail_ids, cut = self._candidate(body, text) if r < self.p.rsa_t else ("", None, False)
        answer, _ = extract_answer(text, starts_in_reasoning=prompt_opens_reasoning(self.tok, live.prompt))
        return Rollout(round=r, index=i, parents=live.parents, prompt_tokens=len(live.prompt), tokens=live.tokens,
                       finish_reason=reason, text=text, candidate=candidate, tail_ids=tail_ids, tail_cut=cut,
                       answer=answer, seed=live.seed, seconds=time.perf_counter() - live.started,
                       prompt_text=live.prompt_text)

    # --- scheduling ---------------------------------------------------------------------------------------------

    def round_done(self, r: int) -> bool:
        return all((r, i) in self.done for i in range(self.p.rollouts_in(r)))

    def ready(self, key) -> bool:
        r, i = key
        if r == 0:
            return True
        if self.schedule == "stream":
            return all((r - 1, j) in self.done for j in self.draws[r][i])
        return self.round_done(r - 1)

    @property
    def total_slots(self) -> int:
        return self.plan.slots

    def free_slots(self) -> list[int]:
        """Free slots of each host ("batches": none while a batch runs)."""
        return [0 if self.schedule == "batches" and self.running else self.plan.slots - len(self.running)]

    def fill(self) -> None:
        """Start ready rollouts, lowest round first, while slots are free, each on the host with the most free
        ("batches": only into an empty batch)."""
        free = self.free_slots()
        if self.schedule == "batches" and self.pending:  # a batch never mixes rounds
            first = self.pending[0][0]
            eligible = [k for k in self.pending if k[0] == first]
        else:
            eligible = self.pending
        started = []
        for key in eligible:
            host = max(range(len(free)), key=lambda h: (free[h], -h))
            if free[host] <= 0:
                break
            if self.ready(key):
                self.start(key, host)
                started.append(key)
                free[host] -= 1
        if started:
            gone = set(started)
            self.pending = [k for k in self.pending if k not in gone]

    def start(self, key, host: int = 0) -> None:
        """Build the rollout's prompt (every host does, so every host checks the bound and keeps its text) and
        decode it if `host` is this one."""
        r, i = key
        prompt, parents, prefix, text = self.prompt_for(key)
        if len(prompt) + self.p.max_tokens_in(r) > self.plan.context_bound:
            message = (f"round {r} rollout {i}: {len(prompt)} + {self.p.max_tokens_in(r)} tokens is over the bound of "
                       f"{self.plan.context_bound} the slots were planned for")
            if self.p.bounded_context:
                raise ContextBoundError(message)
            raise ZayaError(f"{message}: a candidate outgrew its rollout's tokens when re-tokenized; run without "
                            "--unbounded")
        if r not in self.round_started:
            self.round_started[r] = time.perf_counter()
            self.emit(RSAEvent("round_started", round=r, data={"rollouts": self.p.rollouts_in(r)}))
        seed = derived_seed(self.seed, r, i)
        self.running[key] = _Live(prompt, parents, seed, text, host)
        if host == self.host:
            self.backend.start(key, prompt, max_tokens=self.p.max_tokens_in(r), sampling=self.p.sampling_in(r),
                               seed=seed, prefix=prefix)
        self.emit(RSAEvent("rollout_started", round=r, rollout=i, data={"prompt_tokens": len(prompt),
                                                                         "parents": parents}))

    def record(self, rollout: Rollout) -> None:
        key = (rollout.round, rollout.index)
        self.done[key] = rollout
        if self.journal is not None:
            self.journal.rollout(rollout)
        self.emit(RSAEvent("rollout_finished", round=rollout.round, rollout=rollout.index,
                           data={"rollout": rollout, "tokens": len(rollout.tokens),
                                 "finish_reason": rollout.finish_reason, "answer": rollout.answer}))
        r = rollout.round
        if self.round_done(r):
            seconds = time.perf_counter() - self.round_started.get(r, time.perf_counter())
            self.round_seconds[r] = seconds
            rollouts = [self.done[r, i] for i in range(self.p.rollouts_in(r))]
            tokens = sum(len(x.tokens) for x in rollouts)
            self.emit(RSAEvent("round_finished", round=r, data={
                "tokens": tokens, "mean_tokens": tokens / len(rollouts), "seconds": seconds,
                "answers": [x.answer for x in rollouts]}))

    def run(self) -> None:
        while self.pending or self.running:
            if self.cancel is not None and self.cancel():
                raise Cancelled("the RSA run was cancelled")
            self.fill()
            if not self.running:
                raise RuntimeError(f"no rollout can start: {self.pending[:3]} wait on unfinished candidates")
            self.steps += 1
            self.idle_slot_steps += self.total_slots - len(self.running)
            for rollout in self.advance():
                del self.running[rollout.round, rollout.index]
                self.record(rollout)
            self.progress()

    def resume(self, rollouts: Sequence[Rollout]) -> None:
        """Take finished rollouts read back from a run folder: they are not decoded again."""
        for rollout in rollouts:
            self.done[rollout.round, rollout.index] = rollout
        if self.done:
            self.pending = [k for k in self.pending if k not in self.done]
            self.emit(RSAEvent("resumed", data={"rollouts": len(self.done)}))

    def decode_step(self) -> tuple[list[tuple], list[Rollout]]:
        """One step of this host's backend: the `(key, token)`s it produced and the rollouts it finished."""
        produced, finished = [], []
        for key, token, reason in self.backend.step():
            live = self.running[key]
            live.tokens.append(token)
            produced.append((key, token))
            if reason is None and len(live.tokens) >= self.p.max_tokens_in(key[0]):
                reason = "length"
            if reason is not None:
                finished.append(self.finish(key, live, reason))
        return produced, finished

    def count_token(self, key, token: int) -> None:
        self.tokens += 1
        self.emit(RSAEvent("token", round=key[0], rollout=key[1], data={"token": token}))

    def advance(self) -> list[Rollout]:
        """One decode step of the run; the rollouts that finished in it (still in `running`)."""
        produced, finished = self.decode_step()
        for key, token in produced:
            self.count_token(key, token)
        return finished

    def progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_progress < PROGRESS_EVERY:
            return
        self.last_progress = now
        import mlx.core as mx

        c = self.backend.counters() if hasattr(self.backend, "counters") else {}
        self.emit(RSAEvent("progress", data={
            "tokens": self.tokens, "elapsed": now - self.started, "prompt_tokens": c.get("prompt_tokens", 0),
            "prefill_tps": c.get("prompt_tokens", 0) / max(c.get("prompt_s", 0.0), 1e-9),
            "decode_tps": c.get("generation_tokens", 0) / max(c.get("decode_s", 0.0), 1e-9),
            "peak_bytes": mx.get_peak_memory()}))


def _plan(model, params: RSAParams, builder: PromptBuilder, *, memory_budget, max_batch,
          prefill_step_size) -> MemoryPlan:
    per_candidate = params.tail_token_bound if params.bounded_context else params.short_resp_len
    boundary = BOUNDARY_TOKENS if params.tail_unit == "words" else 0
    aggregate = builder.fixed_tokens + params.candidates * (per_candidate + boundary) if params.rsa_t > 0 else 0
    args = getattr(model, "args", None)
    if args is None:  # a backend without a model: nothing to allocate, only the counts
        from types import SimpleNamespace

        args = SimpleNamespace(num_hidden_layers=0, num_key_value_heads=0, head_dim=0, cca_time0=1, cca_time1=1,
                               num_attention_heads=0, vocab_size=0, hidden_size=0, max_position_embeddings=None)
        memory_budget = memory_budget or 1 << 62
        return plan_memory(args, params, prompt_tokens=len(builder.round0), aggregate_tokens=aggregate,
                           budget_bytes=memory_budget, budget_source="no model", max_batch=max_batch)
    source = "given"
    if memory_budget is None:
        memory_budget, source = default_memory_budget()
    return plan_memory(args, params, prompt_tokens=len(builder.round0), aggregate_tokens=aggregate,
                       head_tokens=len(builder.head), weights_bytes=model_weight_bytes(model),
                       layer_bytes=model_layer_bytes(model), dtype_bytes=model_dtype_bytes(model),
                       budget_bytes=memory_budget, budget_source=source, prefill_step_size=prefill_step_size,
                       max_batch=max_batch)


def plan_run(messages_or_problem, params: RSAParams, *, model=None, tokenizer, max_batch: Optional[int] = None,
             memory_budget: Optional[int] = None, prefill_step_size: int = 512) -> MemoryPlan:
    """The memory plan `run` makes before it allocates anything (same arguments): raises the same one-line
    ZayaError when the run does not fit, so a front end can refuse before it creates anything."""
    params.check()
    builder = PromptBuilder(tokenizer, as_messages(messages_or_problem), params.candidates,
                            enable_thinking=params.enable_thinking)
    return _plan(model, params, builder, memory_budget=memory_budget, max_batch=max_batch,
                 prefill_step_size=prefill_step_size)


def run(messages_or_problem, params: Optional[RSAParams] = None, *, model=None, tokenizer, seed: int = 0,
        on_event: Optional[Callable[[RSAEvent], None]] = None, cancel=None, max_batch: Optional[int] = None,
        memory_budget: Optional[int] = None, schedule: str = "stream", backend: Optional[Backend] = None,
        stop_ids: Optional[Sequence[int]] = None, prefill_step_size: int = 512, journal=None,
        group=None) -> RSAResult:
    """Run Markovian RSA on a problem (a string) or a conversation (OpenAI-style messages) and return the last
    round's response(s).

    params: an RSAParams (default: Zyphra's recipe; `RSAParams.preset(name, **overrides)` for the others).
    seed: every draw of candidates and every rollout's sampler derive from it. on_event: see the module's doc.
    cancel: a threading.Event or a callable, checked between decode steps (raises Cancelled). max_batch caps the
    slots (rollouts decoding together), memory_budget (bytes) the plan's budget (default: a safe share of the
    machine). schedule: "stream" (default), "rounds" or "batches" (same results). backend replaces decoding on
    `model` (tests use a scripted one; `model` may then be None). journal: a RunFolder recording every finished
    rollout (and holding those of an interrupted run, which are not decoded again).
    group: an `mx.distributed.Group` (or a `distributed.Hosts`) of several hosts, every one calling `run` with the
    same arguments: the rollouts are spread over them, the journal is host 0's (docs/distributed.md).
    Bad parameters raise ZayaError before anything is allocated.
    """
    params = params if params is not None else RSAParams()
    params.check()
    if schedule not in SCHEDULES:
        raise ZayaError(f"unknown RSA schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    messages = as_messages(messages_or_problem)
    emit = on_event or (lambda e: None)
    builder = PromptBuilder(tokenizer, messages, params.candidates, enable_thinking=params.enable_thinking)
    tok = builder.tokenizer
    if stop_ids is None:  # the tokenizer's end-of-turn ids and the model's
        stop_ids = sorted(set(getattr(tok, "eos_token_ids", ()) or ()) | set(
            getattr(getattr(model, "args", None), "eos_token_ids", ()) or ()))
    hosts = None
    if group is not None:
        from .distributed import DistributedEngine, as_hosts

        hosts = as_hosts(group)

    def make_plan() -> MemoryPlan:
        return _plan(model, params, builder, memory_budget=memory_budget, max_batch=max_batch,
                     prefill_step_size=prefill_step_size)

    plan = make_plan() if hosts is None else hosts.each(make_plan, share=lambda p: p.slots)[0]
    emit(RSAEvent("plan", data={"plan": plan, "params": params, "slots": plan.slots}))

    if journal is not None and journal.meta.get("draws") != {str(r): d for r, d in all_draws(params, seed).items()}:
        raise ZayaError(f"the run in {journal.path} drew other candidates: it is not this run's folder")
    with journal if journal is not None else contextlib.nullcontext():  # a run folder is held for the whole run
        finished = journal.finished() if journal is not None else []
        own_backend = backend is None
        if own_backend:
            backend = ModelBackend(model, slots=plan.slots, stop_ids=stop_ids, prefill_step_size=prefill_step_size,
                                   kv_bits=params.kv_bits)
        engine_class = Engine if hosts is None else functools.partial(DistributedEngine, hosts, messages=messages,
                                                                      model=model)
        engine = engine_class(params, backend=backend, plan=plan, builder=builder, seed=seed,
                              stop_ids=stop_ids, schedule=schedule, emit=emit, cancel=cancel, journal=journal)
        engine.resume(finished)
        tic = time.perf_counter()
        try:
            engine.run()
        finally:
            counters = backend.counters() if hasattr(backend, "counters") else {}
            if own_backend:
                backend.close()
        total_s = time.perf_counter() - tic

        rounds = [RoundRecord(r, [engine.done[r, i] for i in range(params.rollouts_in(r))],
                              engine.round_seconds.get(r, 0.0)) for r in range(params.rounds)]
        finals = rounds[-1].rollouts
        ballot = vote([f.answer for f in finals]) if params.final_vote else None
        completion = sum(rd.tokens for rd in rounds)
        prompt_tokens = sum(r.prompt_tokens for rd in rounds for r in rd.rollouts)
        result = RSAResult(
            text=finals[0].text, texts=[f.text for f in finals],
            answer=ballot.answer if ballot is not None else finals[0].answer, vote=ballot, rounds=rounds,
            metadata=metadata(params, rounds, engine.total_slots),
            usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                   "total_tokens": prompt_tokens + completion},
            params=params, seed=seed, plan=plan,
            timings={"total_s": total_s, "rounds_s": [rd.seconds for rd in rounds],
                     "tokens_decoded": engine.tokens, "tokens_per_s": engine.tokens / max(total_s, 1e-9),
                     "steps": engine.steps,
                     "idle_slot_steps": engine.idle_slot_steps, **counters},
            run_dir=str(journal.path) if journal is not None else None)
        if journal is not None:
            journal.write_result(result)
        emit(RSAEvent("finished", data={"result": result}))
        return result
