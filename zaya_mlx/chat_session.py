"""A multi-turn chat that keeps its KV cache between turns, so a new turn prefills only its new tokens.

Each turn renders the whole conversation with the checkpoint's chat template (so history looks exactly as the
template wants it: qwen3-style templates drop earlier think blocks, others keep them) and compares it with
the token ids the cache holds. When the cache is a prefix, only the rest is prefilled.

When it is not (the template re-rendered an earlier assistant turn differently from what was generated, the
system prompt changed, a partial answer was re-tokenized), the cache must go back to the longest common
prefix. The KV part is trimmable, but the CCA conv state and the delayed value are not; so the session keeps a
small snapshot of them (a few KB a layer) at the end of every turn's prompt, and rolls back to the latest
snapshot at or before the common prefix, trimming the KV cache there and prefilling the rest. Every position
is then computed exactly as a full prefill of the rendered conversation would.

Reasoning longer than a context: with the default think budget (`think_budget.py`), a turn's reasoning goes on
chunk after chunk. At a chunk's end the cache goes back to the same snapshot (the end of this turn's prompt) and
takes the opening think tag and the last `tail` reasoning tokens, and the model continues from there: a fresh
context of the conversation and the reasoning's tail, with no prefill of the conversation again.

Long conversations: a turn's prompt may fill at most half of the context. Beyond that, earlier turns' reasoning
is left out first, then the oldest turns, down to a third of the context (so the next turns reuse the cache
again rather than each dropping one more turn and prefilling everything after it). `messages` keeps them all;
only what the model sees changes.

Stopping early (breaking out of `send`, `close()` on it, Ctrl-C, or `interrupt()`) keeps the partial answer
in the history.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx

from .errors import ZayaError
from .generation import GenerationResponse, _token_stream, context_limit, prompt_opens_reasoning
from .prompt_cache import cache_nbytes, is_token, load_prompt_cache, metadata_value, save_prompt_cache
from .reasoning import REASONING
from .sampling import check_sampling
from .think_budget import ThinkBudget, parse_think_budget
from .tokenizer import apply_chat_template, require_tokenizer

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                 "sampler")
JSON_VERSION = 1
HISTORY_SHARE = 1 / 2  # the most of the context a turn's prompt may fill before earlier turns are left out
HISTORY_AFTER_DROP = 1 / 3  # what it is brought down to when they are
THINK_BUDGET_NOTE = "think_budget"


@dataclass
class ChatResponse(GenerationResponse):
    """A streamed piece of a chat turn. Counts are over the whole turn (every reasoning chunk). `chunk`: the
    reasoning chunk (1, 2, ...) this token belongs to; `context_tokens`: tokens in the context now; `note`:
    "think_budget" on the first piece after the think block was closed for the model. `finish_reason` on the
    last piece: "stop" (EOS), "length" (max_tokens), "context" (the context is full) or "stop_string"."""

    chunk: int = 1
    context_tokens: int = 0
    note: Optional[str] = None


@dataclass
class ChatStats:
    prompt_tokens: int = 0  # tokens prefilled for the last turn (the new ones only, when the cache was reused)
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    context_tokens: int = 0  # tokens the cache holds now
    context_limit: int = 0
    kv_cache_bytes: int = 0
    peak_memory_gb: float = 0.0
    reused_tokens: int = 0  # tokens of the last turn's prompt that came from the cache
    reasoning_chunks: int = 0  # contexts the last turn's reasoning took
    think_budget_reached: bool = False  # the last turn's think block was closed by the budget
    dropped_turns: int = 0  # oldest turns left out of the context


def _without_reasoning(message: dict, tokenizer) -> dict:
    """An assistant message with its think block left out (a user's message is kept whole)."""
    if message["role"] != "assistant" or not isinstance(message["content"], str):
        return message
    start, end = (tokenizer.think_start, tokenizer.think_end) if tokenizer.has_thinking else ("<think>", "</think>")
    content = message["content"]
    if end in content:
        content = content.rsplit(end, 1)[1].lstrip("\n")
    elif content.lstrip().startswith(start):
        content = ""  # stopped inside its reasoning
    return {**message, "content": content}


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """`ChatSession(model, tokenizer, system=None, enable_thinking=True, think_budget=None, **sampling)`.

    sampling: max_tokens (None: no cap but the think budget and the context), temperature, top_p, top_k,
    min_p, repetition_penalty, seed, stop (any may be overridden per turn in `send`, and changed later in
    `session.sampling`). think_budget: a `ThinkBudget` or its text ("off", "4096", "chunk=8192 tail=4096
    total=65536"; None: chunked with the defaults), `session.think_budget` later. Also `max_context`,
    `prefill_step_size` and `kv_bits` (the KV cache quantized to 8 or 4 bits: see `Model.make_cache`).
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, enable_thinking: bool = True, *,
                 think_budget=None, max_context: Optional[int] = None, prefill_step_size: int = 512,
                 kv_bits: Optional[int] = None, **sampling):
        self.model = model
        self.kv_bits = kv_bits
        self.tokenizer = require_tokenizer(tokenizer)
        self.enable_thinking = enable_thinking
        self.think_budget: ThinkBudget = parse_think_budget(think_budget)
        self.max_context = context_limit(model, max_context)
        self.prefill_step_size = prefill_step_size
        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise ZayaError(f"unknown sampling option {sorted(unknown)[0]!r}")
        self.sampling = {"max_tokens": None, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                         "min_p": 0.0, "repetition_penalty": None, "seed": None, "stop": ()}
        self.sampling.update({k: v for k, v in sampling.items() if v is not None})  # None: keep the default
        self.messages: list[dict] = []
        self._dropped = 0  # leading non-system messages left out of the context
        self._bare = 0  # leading non-system messages rendered without their reasoning
        self.last_dropped_turns, self.last_dropped_reasoning = 0, False  # what the last `send` left out anew
        self.stats = ChatStats(context_limit=self.max_context)
        self._interrupt = False
        self._active = None
        self.last_reasoning = self.last_answer = ""
        self.last_finish_reason: Optional[str] = None
        self._drop_cache()
        if system:
            self.set_system(system)

    # --- conversation state ---------------------------------------------------------------------------------------

    @property
    def system(self) -> Optional[str]:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def set_system(self, text: Optional[str]) -> None:
        """Set (or, with None/"", remove) the system prompt. The cache is rolled back at the next turn."""
        self._close_active()
        has = bool(self.messages) and self.messages[0]["role"] == "system"
        if text:
            if has:
                self.messages[0] = {"role": "system", "content": text}
            else:
                self.messages.insert(0, {"role": "system", "content": text})
        elif has:
            self.messages.pop(0)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and the cache."""
        self._close_active()
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self._dropped = self._bare = 0
        self._drop_cache()
        self.stats = ChatStats(context_limit=self.max_context)

    def prepare(self) -> None:
        """The model's first call ahead of the first turn (`Model.prepare_decode`); no conversation state changes."""
        self.model.prepare_decode()

    def start_preparing(self) -> threading.Thread:
        """`prepare` in a thread, for a UI to run while the user types its first message; join the thread before
        the session's next call. The thread works on the calling thread's stream: MLX gives each thread a default
        stream of its own, and the decode steps it builds (compiled functions, which keep the stream their ops were
        traced on) would otherwise run every later step on another stream than the rest of the turn."""
        stream = mx.default_stream(mx.default_device())

        def run():
            mx.set_default_stream(stream)
            self.prepare()

        thread = threading.Thread(target=run, name="zaya-prepare", daemon=True)
        thread.start()
        return thread

    def interrupt(self) -> None:
        """Ask a running `send` to end before its next token (then `last_finish_reason` is "interrupted").

        Safe to call from a signal handler or another thread; the reply so far is kept in the history."""
        self._interrupt = True

    @property
    def cache(self):
        return self._cache

    @property
    def cache_tokens(self) -> list[int]:
        """The token ids the cache holds, in order."""
        return list(self._tokens)

    def prompt_ids(self, user_text: Optional[str] = None, enable_thinking: Optional[bool] = None) -> list[int]:
        """Token ids of the conversation as the model sees it (plus a new user turn) rendered for generation:
        what the next `send(user_text)` prefills, earlier turns left out if they do not fit."""
        return self._fit(user_text, enable_thinking)[0]

    def _render(self, user_text: Optional[str], thinking: Optional[bool], dropped: int, bare: int) -> list[int]:
        system = self.messages[:1] if self.system is not None else []
        shown = [_without_reasoning(m, self.tokenizer) if i < bare else m
                 for i, m in enumerate(self._history()) if i >= dropped]
        new = [{"role": "user", "content": user_text}] if user_text is not None else []
        thinking = self.enable_thinking if thinking is None else thinking
        return apply_chat_template(self.tokenizer, system + shown + new, enable_thinking=thinking,
                                   add_generation_prompt=True)

    def _fit(self, user_text: Optional[str], thinking: Optional[bool]) -> tuple[list[int], int, int]:
        """(ids, dropped, bare): the prompt with earlier reasoning, then the oldest turns, left out until it
        fills at most HISTORY_SHARE of the context (HISTORY_AFTER_DROP once something has to go)."""
        dropped, bare = self._dropped, self._bare
        ids = self._render(user_text, thinking, dropped, bare)
        if len(ids) <= self.max_context * HISTORY_SHARE:
            return ids, dropped, bare
        rest = self._history()
        if bare < len(rest):
            bare = len(rest)
            ids = self._render(user_text, thinking, dropped, bare)
        while len(ids) > self.max_context * HISTORY_AFTER_DROP:
            later = [i for i in range(dropped + 1, len(rest) + 1) if i == len(rest) or rest[i]["role"] == "user"]
            if dropped >= len(rest) or not later:
                break
            dropped = later[0]
            ids = self._render(user_text, thinking, dropped, bare)
        if len(ids) >= self.max_context:
            raise ZayaError(f"the message is {len(ids)} tokens with the system prompt, over the context limit of "
                            f"{self.max_context} tokens; shorten it")
        return ids, dropped, bare

    # --- the cache ----------------------------------------------------------------------------------------------------

    def _drop_cache(self) -> None:
        self._cache = self.model.make_cache(kv_bits=self.kv_bits)
        self._tokens: list[int] = []
        self._snapshots: dict[int, list] = {}  # position -> per-layer conv state (a list of arrays)

    def _snapshot(self) -> None:
        pos = len(self._tokens)
        state = [[mx.array(a) if a is not None else None for a in layer[1].cache] for layer in self._cache]
        mx.eval([a for layer in state for a in layer if a is not None])
        self._snapshots[pos] = state

    def _rollback(self, pos: int, torn: bool = False) -> None:
        """Make the cache hold exactly `self._tokens[:q]` for the latest snapshot q <= pos (or start afresh).

        `torn`: the cache may hold more than `self._tokens` says (a forward was cut short), so go back even
        when `pos` is the end.
        """
        if pos >= len(self._tokens) and not torn:
            return
        q = max((s for s in self._snapshots if s <= min(pos, len(self._tokens))), default=0)
        if q == 0:
            self._drop_cache()
            return
        for layer, conv in zip(self._cache, self._snapshots[q]):
            kv = layer[0]
            kv.trim(kv.offset - q)
            layer[1].cache = [mx.array(a) if a is not None else None for a in conv]
        self._tokens = self._tokens[:q]
        self._snapshots = {s: v for s, v in self._snapshots.items() if s <= q}

    def _feed(self, tokens: list[int]) -> None:
        """Prefill `tokens` into the cache (chunked, no logits)."""
        step = max(1, int(self.prefill_step_size))
        for i in range(0, len(tokens), step):
            chunk = tokens[i : i + step]
            self.model(mx.array(chunk, dtype=mx.int32)[None], cache=self._cache)
            mx.eval([c.state for c in self._cache])
            self._tokens.extend(chunk)

    # --- a turn -------------------------------------------------------------------------------------------------------

    def send(self, user_text: str, **overrides) -> Iterator[ChatResponse]:
        """Add a user turn and stream the assistant's reply (ChatResponse: a GenerationResponse counted over the
        whole turn, with the reasoning chunk and the context in use).

        overrides: any sampling option, `enable_thinking` and `think_budget`, for this turn only. The reply is
        appended to `messages` when the stream ends, including when it is stopped early (partial answer kept).
        Argument errors and a message too long for the context are raised here, before anything changes.
        """
        self._close_active()
        unknown = set(overrides) - set(SAMPLING_KEYS) - {"enable_thinking", "think_budget"}
        if unknown:
            raise ZayaError(f"unknown option {sorted(unknown)[0]!r}")
        thinking = overrides.pop("enable_thinking", None)
        think = parse_think_budget(overrides.pop("think_budget", self.think_budget))
        opts = {**self.sampling, **overrides}
        check_sampling(opts["temperature"], opts["top_p"], opts["top_k"], opts["min_p"], opts["repetition_penalty"])
        if opts["max_tokens"] is not None and opts["max_tokens"] < 1:
            raise ZayaError(f"max_tokens must be at least 1, got {opts['max_tokens']}")
        ids, dropped, bare = self._fit(user_text, thinking)
        history = self._history()
        self.last_dropped_turns = sum(m["role"] == "user" for m in history[self._dropped : dropped])
        self.last_dropped_reasoning = any(_without_reasoning(m, self.tokenizer) != m
                                          for m in history[max(self._bare, dropped) : bare])
        self._dropped, self._bare = dropped, bare
        self._interrupt = False
        gen = self._turn(user_text, ids, opts, think)
        self._active = weakref.ref(gen)  # dropping the generator (a `break`) closes it and records the reply
        return gen

    def _turn(self, user_text: str, ids: list[int], opts: dict, think: ThinkBudget) -> Iterator[ChatResponse]:
        tic = time.perf_counter()
        self.messages.append({"role": "user", "content": user_text})
        tok, limit = self.tokenizer, self.max_context
        max_tokens = opts.pop("max_tokens")
        # The reasoning is managed by token id, so only with single-token think tags (ZAYA1's).
        tags = tok.has_thinking and len(tok.think_start_tokens) == 1 and len(tok.think_end_tokens) == 1
        managed = tags and think.mode != "off"
        in_reasoning = prompt_opens_reasoning(tok, ids)
        opener = [] if in_reasoning or not tags else [tok.think_start_id]
        room = limit - len(ids) - len(opener)
        answer_room = room // 4  # kept free for the answer in the context the reasoning ends in
        chunk = max(2, min(think.chunk, room - answer_room))
        tail = min(think.tail, chunk // 2)
        cap = think.total if think.mode == "chunked" else min(think.total, room - answer_room)

        raw, generated, thought, reasoning, answer = [], [], [], [], []
        held, chunk_no, chunks, forced, note = 0, 1, 0, False, None  # held: reasoning tokens in this context
        prompt_tokens, prompt_tps, finish, clean, reused, first_at = 0, 0.0, None, False, 0, None
        steps = None
        try:
            self._rollback(_common_prefix(self._tokens, ids[:-1]))
            reused = len(self._tokens)
            prompt_tokens = len(ids) - reused
            self._feed(ids[reused:-1])
            self._snapshot()  # the end of this prompt (less its last token): each reasoning chunk starts here too
            pending = ids[-1:]  # tokens the next stream prefills (generate_step feeds the last with the first sample)
            while pending:
                left = None if max_tokens is None else max_tokens - len(generated)
                can = limit - len(self._tokens) - len(pending)  # tokens this context has room for
                n = can if left is None else min(can, left)
                if n < 1:
                    finish = "context"
                    break
                steps = _token_stream(self.model, tok, pending, cache=self._cache, starts_in_reasoning=in_reasoning,
                                      prefill_step_size=self.prefill_step_size, max_context=limit, max_tokens=n,
                                      **opts)
                self._tokens.extend(pending)
                pending = []
                for text, responses in steps:
                    token = responses[-1].token
                    generated.append(token)
                    self._tokens.append(token)
                    raw.append(text)
                    now = time.perf_counter()
                    if first_at is None:
                        first_at = now
                        prompt_tps = prompt_tokens / max(now - tic, 1e-9)
                    if managed:
                        if in_reasoning and token == tok.think_end_id:
                            in_reasoning = managed = False  # the model answers now
                        elif in_reasoning:
                            thought.append(token)
                            held, chunks = held + 1, chunk_no
                        elif token == tok.think_start_id and len(generated) == 1:
                            in_reasoning = True
                        else:
                            managed = False  # it answered without reasoning
                    finish = responses[-1].finish_reason
                    if finish == "length" and (left is None or n < left):
                        finish = "context"
                    gen_tps = (len(generated) - 1) / max(now - first_at, 1e-9)
                    for r in responses:
                        (reasoning if r.channel == REASONING else answer).append(r.text)
                        fields = {**vars(r), "prompt_tokens": prompt_tokens, "prompt_tps": prompt_tps,
                                  "generation_tokens": len(generated), "generation_tps": gen_tps}
                        if r.finish_reason:
                            fields["finish_reason"] = finish
                        yield ChatResponse(**fields, chunk=chunk_no, context_tokens=len(self._tokens), note=note)
                        note = None
                    if finish:
                        break
                    if self._interrupt:  # set while the caller handled this token: stop before the next one
                        finish = "interrupted"
                        break
                    if managed and in_reasoning and len(thought) >= cap:
                        # Budget forcing: close the think block for the model; it answers next.
                        pending = [tok.think_end_id] + list(tok.encode("\n\n", add_special_tokens=False))
                        raw.append(tok.decode(pending))
                        in_reasoning = managed = False
                        forced, note = True, THINK_BUDGET_NOTE
                        break
                    if managed and in_reasoning and think.mode == "chunked" and held >= chunk:
                        # A fresh context: this prompt, the opening tag and the reasoning's last `tail` tokens.
                        steps.close()
                        self._rollback(len(ids) - 1)
                        pending = ids[-1:] + opener + thought[-tail:]
                        held, chunk_no = tail, chunk_no + 1
                        break
                steps.close()
                if finish:
                    break
            clean = True
        except GeneratorExit:
            clean = True  # closed at a yield: the cache holds exactly the tokens seen so far
            raise
        finally:
            if steps is not None:
                steps.close()
            if not clean:
                # Stopped inside a forward (Ctrl-C, an error): the cache may be torn. Go back to the snapshot at
                # the end of this prompt (or an earlier one if the prefill itself was cut).
                self._rollback(min(len(self._tokens), len(ids) - 1), torn=True)
            self.messages.append({"role": "assistant", "content": "".join(raw)})
            self._active = None
            self._interrupt = False
            elapsed = time.perf_counter() - first_at if first_at is not None else 0.0
            self.stats = ChatStats(
                prompt_tokens=prompt_tokens, prompt_tps=prompt_tps,
                generation_tokens=len(generated), generation_tps=(len(generated) - 1) / elapsed if elapsed else 0.0,
                context_tokens=len(self._tokens), context_limit=limit,
                kv_cache_bytes=cache_nbytes(self._cache), peak_memory_gb=mx.get_peak_memory() / 1e9,
                reused_tokens=reused, reasoning_chunks=chunks, think_budget_reached=forced,
                dropped_turns=sum(m["role"] == "user" for m in self._history()[: self._dropped]),
            )
            self.last_reasoning = "".join(reasoning)
            self.last_answer = "".join(answer)
            self.last_finish_reason = finish if clean and finish else "interrupted"

    def _history(self) -> list[dict]:
        """The conversation's messages after the system prompt."""
        return self.messages[1:] if self.system is not None else self.messages

    def _close_active(self) -> None:
        """Finish a reply still streaming (recording what it has) before the conversation changes."""
        gen = self._active() if self._active is not None else None
        self._active = None
        if gen is not None:
            gen.close()

    def ask(self, user_text: str, **overrides) -> str:
        """Send a turn and return the whole reply's answer text (reasoning in `last_reasoning`)."""
        for _ in self.send(user_text, **overrides):
            pass
        return self.last_answer

    # --- persistence ----------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The conversation and settings as JSON (for /save). The cache is rebuilt on load."""
        sampling = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.sampling.items() if k != "sampler"}
        return json.dumps({"version": JSON_VERSION, "enable_thinking": self.enable_thinking, "sampling": sampling,
                           "think_budget": str(self.think_budget), "messages": self.messages}, ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, model, tokenizer, data, **overrides) -> "ChatSession":
        """A session from `to_json` output (a str or the parsed dict); `overrides` replace saved settings."""
        try:
            d = json.loads(data) if isinstance(data, (str, bytes)) else dict(data)
            messages = list(d["messages"])
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise ValueError("messages need a role and a content")
        except (ValueError, KeyError, TypeError) as e:
            raise ZayaError(f"not a saved chat ({e})") from None
        sampling = {k: v for k, v in d.get("sampling", {}).items() if k in SAMPLING_KEYS}
        if "stop" in sampling:
            sampling["stop"] = tuple(sampling["stop"] or ())
        sampling.update({k: v for k, v in overrides.items() if k in SAMPLING_KEYS})
        kwargs = {k: v for k, v in overrides.items() if k in ("max_context", "prefill_step_size")}
        session = cls(model, tokenizer, enable_thinking=overrides.get("enable_thinking", d.get("enable_thinking", True)),
                      think_budget=overrides.get("think_budget", d.get("think_budget")), **kwargs, **sampling)
        session.messages = messages
        return session

    def save_cache(self, path) -> None:
        """Write the KV/conv cache, the token ids it holds and the rollback snapshots (resume without prefill)."""
        positions = sorted(self._snapshots)
        extra = [[a for a in self._snapshots[p][layer]] for p in positions for layer in range(len(self._cache))]
        save_prompt_cache(path, self._cache, self._tokens, self.model,
                          model_id=getattr(self.model, "zaya_source", None),
                          metadata={"snapshots": json.dumps(positions)}, extra=extra)

    def load_cache(self, path) -> None:
        """Use a cache saved by `save_cache` (with this model); the next turn reuses whatever prefix matches."""
        self._close_active()
        cache, tokens, meta = load_prompt_cache(path, self.model)
        extra, layers = meta.get("extra", []), len(cache)
        positions = metadata_value(path, meta, "snapshots", lambda v: isinstance(v, list) and all(map(is_token, v))
                                   and len(v) * layers == len(extra), "a token position for each saved snapshot")
        self._cache, self._tokens = cache, tokens
        self._snapshots = {p: extra[i * layers : (i + 1) * layers] for i, p in enumerate(positions)}

    def __repr__(self) -> str:
        return f"ChatSession({len(self.messages)} messages, {len(self._tokens)} tokens cached)"


__all__ = ["ChatResponse", "ChatSession", "ChatStats"]
