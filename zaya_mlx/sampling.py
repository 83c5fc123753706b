"""A thin adapter over mlx-lm's samplers: vLLM/transformers order, and an optional private seed.

mlx-lm's `make_sampler` filters (top-k, top-p, min-p) on the untempered distribution and applies the
temperature only when it draws. vLLM (which serves ZAYA1) and transformers apply the temperature first and
filter the tempered distribution, and sampling settings such as "temperature 0.6, top-p 0.95" are tuned under
that order. So this scales first, then reuses mlx-lm's own `apply_top_k`, `apply_top_p` and `apply_min_p`.

With `seed`, the sampler draws from its own PRNG key (split once per call), so it is reproducible and does
not touch or depend on MLX's global random state; without one it uses the global state like mlx-lm.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler
from mlx_lm.sample_utils import make_logits_processors as _mlx_lm_logits_processors

from .errors import ZayaError

Sampler = Callable[[mx.array], mx.array]


def check_sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                   repetition_penalty: Optional[float] = None) -> None:
    """Raise ZayaError (one line) for a setting outside its range."""
    for name, value in (("temperature", temperature), ("top-p", top_p), ("top-k", top_k), ("min-p", min_p),
                        ("repetition penalty", repetition_penalty)):
        if value is not None and not isinstance(value, numbers.Real):
            raise ZayaError(f"{name} must be a number, got {value!r}")
    if temperature is None or not 0 <= temperature < math.inf:
        raise ZayaError(f"temperature must be a number >= 0 (0 is greedy), got {temperature}")
    if not (0.0 < top_p <= 1.0):
        raise ZayaError(f"top-p must be in (0, 1], got {top_p}")
    if int(top_k) != top_k or top_k < 0:
        raise ZayaError(f"top-k must be a whole number >= 0 (0 is off), got {top_k}")
    if not (0.0 <= min_p <= 1.0):
        raise ZayaError(f"min-p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not 0 < repetition_penalty < math.inf:
        raise ZayaError(f"repetition penalty must be > 0, got {repetition_penalty}")


def filtered_logprobs(logprobs: mx.array, temperature: float, top_p: float = 1.0, top_k: int = 0,
                      min_p: float = 0.0) -> mx.array:
    """The tempered, filtered log-distribution a sampler draws from (masked entries are -inf), [..., V].

    Normalised to a log-softmax over the kept tokens, so `exp` of it is the exact sampling distribution.
    """
    x = logprobs.astype(mx.float32) * (1.0 / temperature)
    x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        x = apply_top_k(x, int(top_k))
    if 0.0 < top_p < 1.0:
        x = apply_top_p(x, top_p)
    if min_p > 0.0:
        x = apply_min_p(x, min_p)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> Sampler:
    """A sampler: log-probabilities (or logits) [B, V] -> token ids [B]. Temperature 0 is argmax."""
    check_sampling(temperature, top_p, top_k, min_p)
    if temperature == 0:
        return greedy_sampler
    key = [mx.random.key(seed)] if seed is not None else None

    def sampler(logprobs: mx.array) -> mx.array:
        x = filtered_logprobs(logprobs, temperature, top_p, top_k, min_p)
        if key is None:
            return mx.random.categorical(x, axis=-1)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(x, axis=-1, key=sub)

    return sampler


def make_logits_processors(repetition_penalty: Optional[float] = None, repetition_context_size: int = 20):
    """mlx-lm's logits processors (repetition penalty over the last `repetition_context_size` tokens)."""
    if repetition_penalty is None or repetition_penalty == 1.0:
        return []
    return _mlx_lm_logits_processors(repetition_penalty=repetition_penalty,
                                     repetition_context_size=repetition_context_size)
