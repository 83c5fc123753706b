"""What the engine decodes with: rollouts in, one token per running rollout per step out.

`ModelBackend` is mlx-lm's `BatchGenerator` (continuous batching: a new prompt is prefilled in chunks between
the decode steps of the running ones, each with its own sampler) on a model, with the prompts' shared prefixes
prefilled once and copied into each new rollout's cache. With `kv_bits` every cache is a one-row
`BatchQuantizedKVCache` from the start (zaya_mlx/kv_cache.py), which the generator merges, filters and extends as
it does its bf16 caches. Tests drive the engine with a scripted backend of the same two methods.
"""

from __future__ import annotations

import copy
import time
from typing import Optional, Protocol, Sequence

from .memory import PREFILL_ROWS

Key = tuple  # (round, index)


class Backend(Protocol):
    def start(self, key: Key, prompt: list[int], *, max_tokens: int, sampling: dict, seed: int,
              prefix: Sequence[int]) -> None:
        """Queue a rollout: it is prefilled and joins the running ones. `prefix`: ids the prompt starts with that
        other prompts share (a backend may prefill them once); `sampling`: temperature, top_p, top_k, min_p;
        `seed`: the rollout's own sampler seed, so its tokens do not depend on what it runs beside."""

    def step(self) -> list[tuple[Key, int, Optional[str]]]:
        """Advance: `(key, token, finish_reason)` for each rollout that produced a token (finish_reason "stop"
        with the stop id as the token, "length" at max_tokens, else None)."""

    def counters(self) -> dict:
        """prompt_tokens, prompt_s, generation_tokens, decode_s so far (zeros where unknown)."""

    def close(self) -> None: ...


class ModelBackend:
    """mlx-lm's BatchGenerator with `slots` rollouts decoding together and shared prefixes prefilled once; keys and
    values quantized to `kv_bits` (8 or 4) where given."""

    def __init__(self, model, *, slots: int, stop_ids: Sequence[int], prefill_step_size: int = 512,
                 prefix_cache_size: int = 2, kv_bits: Optional[int] = None):
        from mlx_lm.generate import BatchGenerator

        self.model = model
        self.kv_bits = kv_bits
        self.generator = BatchGenerator(model, completion_batch_size=slots, prefill_batch_size=min(slots, PREFILL_ROWS),
                                        prefill_step_size=prefill_step_size,
                                        stop_tokens=[[int(t)] for t in stop_ids])
        self.prefill_step_size = prefill_step_size
        self.prefix_cache_size = prefix_cache_size
        self._prefixes: dict[tuple, list] = {}
        self._keys: dict[int, Key] = {}
        self._prefix_tokens, self._prefix_s = 0, 0.0  # the shared prefixes' prefill, outside the generator

    def _prefix_cache(self, prefix: tuple):
        import mlx.core as mx

        from ..generation import prefill

        if prefix not in self._prefixes:
            while len(self._prefixes) >= self.prefix_cache_size:
                self._prefixes.pop(next(iter(self._prefixes)))
            tic = time.perf_counter()
            cache = self.new_cache()
            prefill(self.model, list(prefix), cache, self.prefill_step_size)
            mx.eval([c.state for c in cache])
            self._prefixes[prefix] = cache
            self._prefix_tokens += len(prefix)
            self._prefix_s += time.perf_counter() - tic
        return self._prefixes[prefix]

    def new_cache(self) -> list:
        """An empty cache for one rollout: the model's own, or a one-row quantized batch (mlx-lm merges only
        caches that have a batched form)."""
        if self.kv_bits is None:
            return self.model.make_cache()
        return self.model.make_cache([0], kv_bits=self.kv_bits)

    def start(self, key, prompt, *, max_tokens, sampling, seed, prefix=()):
        from ..generation import token_ids
        from ..sampling import make_sampler

        prompt = token_ids(prompt, self.model.args.vocab_size)  # a run folder's token tails are read from disk
        prefix = tuple(prefix)
        cache = None if self.kv_bits is None else self.new_cache()
        if prefix and len(prompt) > len(prefix) and tuple(prompt[: len(prefix)]) == prefix:
            cache = copy.deepcopy(self._prefix_cache(prefix))
            prompt = prompt[len(prefix) :]
        sampler = make_sampler(sampling["temperature"], sampling["top_p"], sampling["top_k"], sampling["min_p"], seed)
        (uid,) = self.generator.insert([list(prompt)], max_tokens=[int(max_tokens)], caches=[cache],
                                       samplers=[sampler])
        self._keys[uid] = key

    def step(self):
        out = []
        for r in self.generator.next_generated():
            key = self._keys[r.uid]
            if r.finish_reason is not None:
                del self._keys[r.uid]
            out.append((key, int(r.token), r.finish_reason))
        return out

    def counters(self) -> dict:
        c = getattr(self.generator, "_counters", None)
        return {"prompt_tokens": getattr(c, "prompt_tokens", 0) + self._prefix_tokens,
                "prompt_s": getattr(c, "prompt_time", 0.0) + self._prefix_s,
                "generation_tokens": getattr(c, "generation_tokens", 0), "decode_s": getattr(c, "decode_time", 0.0)}

    def close(self):
        self.generator.close()
        self._prefixes.clear()
