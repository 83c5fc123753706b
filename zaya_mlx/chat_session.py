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

Stopping early (breaking out of `send`, `close()` on it, Ctrl-C, or `interrupt()`) keeps the partial answer
in the history.
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import mlx.core as mx

from .errors import ZayaError
from .generation import (DEFAULT_MAX_TOKENS, GenerationResponse, _token_stream, check_context,
                         context_limit, prompt_opens_reasoning)
from .prompt_cache import cache_nbytes, load_prompt_cache, save_prompt_cache
from .reasoning import REASONING
from .sampling import check_sampling
from .tokenizer import apply_chat_template, require_tokenizer

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                 "sampler")
JSON_VERSION = 1


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


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """`ChatSession(model, tokenizer, system=None, enable_thinking=True, **sampling)`.

    sampling: max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop (any may be
    overridden per turn in `send`, and changed later in `session.sampling`). Also `max_context` and
    `prefill_step_size`.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, enable_thinking: bool = True, *,
                 max_context: Optional[int] = None, prefill_step_size: int = 512, **sampling):
        self.model = model
        self.tokenizer = require_tokenizer(tokenizer)
        self.enable_thinking = enable_thinking
        self.max_context = context_limit(model, max_context)
        self.prefill_step_size = prefill_step_size
        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise ZayaError(f"unknown sampling option {sorted(unknown)[0]!r}")
        self.sampling = {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                         "min_p": 0.0, "repetition_penalty": None, "seed": None, "stop": ()}
        self.sampling.update({k: v for k, v in sampling.items() if v is not None})  # None: keep the default
        self.messages: list[dict] = []
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
        self._drop_cache()
        self.stats = ChatStats(context_limit=self.max_context)

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
        """Token ids of the conversation (plus a new user turn) rendered for generation."""
        messages = self.messages + ([{"role": "user", "content": user_text}] if user_text is not None else [])
        thinking = self.enable_thinking if enable_thinking is None else enable_thinking
        return apply_chat_template(self.tokenizer, messages, enable_thinking=thinking, add_generation_prompt=True)

    # --- the cache ----------------------------------------------------------------------------------------------------

    def _drop_cache(self) -> None:
        self._cache = self.model.make_cache()
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

    def send(self, user_text: str, **overrides) -> Iterator[GenerationResponse]:
        """Add a user turn and stream the assistant's reply (GenerationResponse, as `stream_generate`).

        overrides: any sampling option, and `enable_thinking`, for this turn only. The reply is appended to
        `messages` when the stream ends, including when it is stopped early (partial answer kept).
        Argument errors and context overflow are raised here, before anything changes.
        """
        self._close_active()
        unknown = set(overrides) - set(SAMPLING_KEYS) - {"enable_thinking"}
        if unknown:
            raise ZayaError(f"unknown option {sorted(unknown)[0]!r}")
        thinking = overrides.pop("enable_thinking", None)
        opts = {**self.sampling, **overrides}
        check_sampling(opts["temperature"], opts["top_p"], opts["top_k"], opts["min_p"], opts["repetition_penalty"])
        ids = self.prompt_ids(user_text, thinking)
        check_context(self.model, 0, len(ids), opts["max_tokens"], self.max_context)
        self._interrupt = False
        gen = self._turn(user_text, ids, opts)
        self._active = weakref.ref(gen)  # dropping the generator (a `break`) closes it and records the reply
        return gen

    def _turn(self, user_text: str, ids: list[int], opts: dict) -> Iterator[GenerationResponse]:
        tic = time.perf_counter()
        self.messages.append({"role": "user", "content": user_text})
        raw, generated, reasoning, answer = [], [], [], []
        prompt_tokens, prompt_tps, finish, clean, reused = 0, 0.0, None, False, 0
        last, steps = None, None
        try:
            self._rollback(_common_prefix(self._tokens, ids[:-1]))
            reused = len(self._tokens)
            prompt_tokens = len(ids) - reused
            self._feed(ids[reused:-1])
            self._snapshot()  # the end of this prompt (less its last token): where a re-rendered history goes back to
            steps = _token_stream(
                self.model, self.tokenizer, ids[-1:], cache=self._cache,
                starts_in_reasoning=prompt_opens_reasoning(self.tokenizer, ids),
                prefill_step_size=self.prefill_step_size, max_context=self.max_context, **opts,
            )
            self._tokens.append(ids[-1])  # generate_step feeds it with the first sampled token
            for text, responses in steps:
                generated.append(responses[-1].token)
                self._tokens.append(responses[-1].token)
                raw.append(text)
                if len(generated) == 1:
                    prompt_tps = prompt_tokens / max(time.perf_counter() - tic, 1e-9)
                for r in responses:
                    (reasoning if r.channel == REASONING else answer).append(r.text)
                    last = replace(r, prompt_tokens=prompt_tokens, prompt_tps=prompt_tps)
                    yield last
                finish = responses[-1].finish_reason
                if finish:
                    break
                if self._interrupt:  # set while the caller handled this token: stop before the next one
                    finish = "interrupted"
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
            self.stats = ChatStats(
                prompt_tokens=prompt_tokens, prompt_tps=prompt_tps,
                generation_tokens=len(generated), generation_tps=last.generation_tps if last else 0.0,
                context_tokens=len(self._tokens), context_limit=self.max_context,
                kv_cache_bytes=cache_nbytes(self._cache), peak_memory_gb=mx.get_peak_memory() / 1e9,
                reused_tokens=reused,
            )
            self.last_reasoning = "".join(reasoning)
            self.last_answer = "".join(answer)
            self.last_finish_reason = finish if clean and finish else "interrupted"

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
                           "messages": self.messages}, ensure_ascii=False, indent=2)

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
                      **kwargs, **sampling)
        session.messages = messages
        return session

    def save_cache(self, path) -> None:
        """Write the KV/conv cache, the token ids it holds and the rollback snapshots (resume without prefill)."""
        positions = sorted(self._snapshots)
        extra = [[a for a in self._snapshots[p][layer]] for p in positions for layer in range(len(self._cache))]
        save_prompt_cache(path, self._cache, self._tokens, model_id=getattr(self.model, "zaya_source", None),
                          metadata={"snapshots": json.dumps(positions)}, extra=extra)

    def load_cache(self, path) -> None:
        """Use a cache saved by `save_cache` (with this model); the next turn reuses whatever prefix matches."""
        self._close_active()
        cache, tokens, meta = load_prompt_cache(path, self.model)
        positions = json.loads(meta.get("snapshots", "[]"))
        extra, layers = meta.get("extra", []), len(cache)
        self._cache, self._tokens = cache, tokens
        self._snapshots = {p: extra[i * layers : (i + 1) * layers] for i, p in enumerate(positions)}

    def __repr__(self) -> str:
        return f"ChatSession({len(self.messages)} messages, {len(self._tokens)} tokens cached)"


__all__ = ["ChatSession", "ChatStats"]
