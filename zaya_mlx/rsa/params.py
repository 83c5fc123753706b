"""The parameters of a Markovian RSA run: one dataclass, Zyphra's names, and the presets resolved in one place.

Zyphra's fields and defaults are those of its RSA proxy (Zyphra's vLLM fork,
`examples/markovian_rsa/rsa_proxy_server.py`, "Settings from Zaya1-8B Tech report"); `max_tokens` is the
request's, 61,440 in Zyphra's example, and the per-round sampling (`temperature`, `top_p`, `top_k`) is the
request's, temperature 1.0 in Zyphra's example. The fields after them are ours: they default to Zyphra's
behaviour or to a check that leaves Zyphra's prompts unchanged (docs/rsa.md says which is which).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Optional

from ..errors import ZayaError
from ..kv_cache import KV_BITS

TAIL_SOURCES = ("served", "reasoning")
TAIL_UNITS = ("words", "tokens")

# The command-line flag of each field, for error messages that name what the user typed.
FLAGS = {
    "rsa_n": "--n", "rsa_k": "--k", "rsa_t": "--t", "tail_window_len": "--tail-window-len",
    "short_resp_len": "--short-resp-len", "max_tokens": "--max-tokens", "rsa_final_n": "--final-n",
    "final_temperature": "--final-temp", "final_top_p": "--final-top-p", "final_top_k": "--final-top-k",
    "temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
    "tail_source": "--tail-source", "tail_unit": "--tail-unit", "final_vote": "--vote",
    "bounded_context": "--unbounded", "enable_thinking": "--no-think", "kv_bits": "--kv-bits",
}


@dataclass(frozen=True)
class RSAParams:
    """Everything that decides what a run computes (not how fast: slots and memory are the engine's).

    Zyphra's: `rsa_n` population, `rsa_k` candidates a prompt, `rsa_t` aggregation rounds (rounds 0..T),
    `tail_window_len` whitespace words carried from a candidate, `short_resp_len` new tokens a rollout in every
    round but the last, `max_tokens` in the last round, `rsa_final_n` prompts in the last round (0 means N),
    `final_temperature`/`final_top_p`/`final_top_k` the last round's sampling (None: the per-round sampling),
    `temperature`/`top_p`/`top_k`/`min_p` every other round's sampling (the request's, in Zyphra's proxy).

    Ours: `tail_source` "served" (what Zyphra's proxy carries behind vLLM's qwen3 reasoning parser: the answer
    section when it is non-empty, else the reasoning) or "reasoning" (the text before `</think>`);
    `tail_unit` "words" (Zyphra's) or "tokens" (the last `tail_window_len` token ids, spliced into the prompt
    without re-tokenising); `final_vote` votes over the `rsa_final_n` final answers, mathematically equal
    answers as one; `bounded_context` bounds a word tail at `tail_token_bound` tokens (a tail over it keeps its
    last tokens; never on natural text) so that no sequence outgrows the plan; `enable_thinking` renders the
    prompts with thinking on (Zyphra's served default); `kv_bits` the rollouts' keys and values quantized to 8 or 4
    bits (None: the model's dtype, as Zyphra's vLLM serves it; docs/kv-cache.md), which changes what they write.
    """

    rsa_n: int = 32
    rsa_k: int = 4
    rsa_t: int = 8
    tail_window_len: int = 4096
    short_resp_len: int = 32768
    max_tokens: int = 61440
    rsa_final_n: int = 1
    final_temperature: Optional[float] = 0.6
    final_top_p: Optional[float] = 0.95
    final_top_k: Optional[int] = 40
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    tail_source: str = "served"
    tail_unit: str = "words"
    final_vote: bool = False
    bounded_context: bool = True
    enable_thinking: bool = True
    kv_bits: Optional[int] = None

    # --- derived ------------------------------------------------------------------------------------------------

    @property
    def rounds(self) -> int:
        """Populations decoded: T + 1 (T = 0: one plain completion)."""
        return self.rsa_t + 1

    @property
    def final_count(self) -> int:
        """Prompts in the last round: `rsa_final_n` (0 means N), at most N; Zyphra's `final_prompts_count`."""
        if self.rsa_t == 0:
            return 1
        count = self.rsa_final_n if self.rsa_final_n > 0 else self.rsa_n
        return min(count, self.rsa_n)

    @property
    def candidates(self) -> int:
        """Candidates shown in each aggregation prompt: min(K, N), as Zyphra's `random.sample` takes."""
        return min(self.rsa_k, self.rsa_n)

    def rollouts_in(self, round: int) -> int:
        return self.final_count if round == self.rsa_t else self.rsa_n

    def max_tokens_in(self, round: int) -> int:
        """New tokens a rollout of `round` may write: `short_resp_len` except the last round's `max_tokens`."""
        return self.max_tokens if round == self.rsa_t else self.short_resp_len

    def sampling_in(self, round: int) -> dict:
        """temperature, top_p, top_k, min_p of `round`: the final ones in the last round (T > 0), where set."""
        s = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}
        if self.rsa_t > 0 and round == self.rsa_t:
            for key, value in (("temperature", self.final_temperature), ("top_p", self.final_top_p),
                               ("top_k", self.final_top_k)):
                if value is not None:
                    s[key] = value
        return s

    @property
    def tail_token_bound(self) -> int:
        """Most tokens one candidate's tail may hold in a prompt: `tail_window_len` token ids, or for word tails
        two tokens a word (natural text runs at 1.2-1.5; only a rollout looping without whitespace reaches it),
        never more than the rollout that gave it."""
        if self.tail_unit == "tokens":
            return min(self.tail_window_len, self.short_resp_len)
        return min(2 * self.tail_window_len, self.short_resp_len)

    def worst_case_tokens(self) -> int:
        """New tokens a run decodes at most: T rounds of N x short_resp_len and the final prompts' max_tokens."""
        return self.rsa_t * self.rsa_n * self.short_resp_len + self.final_count * self.max_tokens

    def total_rollouts(self) -> int:
        return self.rsa_t * self.rsa_n + self.final_count

    # --- building and checking ----------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: Optional[str] = None, **overrides) -> "RSAParams":
        """The named preset (default `DEFAULT_PRESET`) with `overrides` on top; an override of None is ignored,
        so a front end can pass every option it parsed. The one place presets are resolved."""
        name = name or DEFAULT_PRESET
        if name not in PRESETS:
            raise ZayaError(f"unknown RSA preset {name!r}: use one of {', '.join(PRESETS)}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ZayaError(f"unknown RSA parameter {unknown[0]!r}: the parameters are {', '.join(sorted(names))}")
        params = dataclasses.replace(PRESETS[name].params, **{k: v for k, v in overrides.items() if v is not None})
        params.check()
        return params

    def replace(self, **changes) -> "RSAParams":
        params = dataclasses.replace(self, **changes)
        params.check()
        return params

    def check(self) -> None:
        """One-line ZayaError naming the field (and its flag) of the first value out of range."""
        def bad(name: str, what: str) -> ZayaError:
            return ZayaError(f"{FLAGS[name]} ({name}) {what}, got {getattr(self, name)!r}")

        for name, low in (("rsa_n", 1), ("rsa_k", 1), ("rsa_t", 0), ("tail_window_len", 1), ("short_resp_len", 1),
                          ("max_tokens", 1), ("rsa_final_n", 0), ("top_k", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"must be a whole number >= {low}")
        for name in ("temperature", "final_temperature"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise bad(name, "must be a finite number >= 0 (0 is greedy)")
        for name in ("top_p", "final_top_p"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise bad(name, "must be in (0, 1]")
        if self.final_top_k is not None and (not isinstance(self.final_top_k, int) or self.final_top_k < 0):
            raise bad("final_top_k", "must be a whole number >= 0 (0 is off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.tail_source not in TAIL_SOURCES:
            raise bad("tail_source", f"must be one of {', '.join(TAIL_SOURCES)}")
        if self.kv_bits is not None and (type(self.kv_bits) is not int or self.kv_bits not in KV_BITS):
            raise bad("kv_bits", f"must be {' or '.join(map(str, KV_BITS))}, or unset for the model's dtype")
        if self.tail_unit not in TAIL_UNITS:
            raise bad("tail_unit", f"must be one of {', '.join(TAIL_UNITS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RSAParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Preset:
    params: RSAParams
    description: str


PRESETS: dict[str, Preset] = {
    "zyphra": Preset(RSAParams(), "Zyphra's recipe as published: N 32, K 4, T 8, 4,096-word tails, 32K/61K tokens"),
    "laptop": Preset(RSAParams(rsa_n=8, rsa_k=4, rsa_t=3, tail_window_len=2048, short_resp_len=8192,
                               max_tokens=16384),
                     "the recipe cut to an evening on a 16 GB Mac: N 8, K 4, T 3, 2,048-word tails, 8K/16K tokens"),
    "quick": Preset(RSAParams(rsa_n=4, rsa_k=2, rsa_t=1, tail_window_len=1024, short_resp_len=4096,
                              max_tokens=8192),
                    "a first try: N 4, K 2, T 1, 1,024-word tails, 4K/8K tokens"),
}
DEFAULT_PRESET = "laptop"

