"""Text generation: `load`, `stream_generate`, `generate`, and `batch_generate` (several prompts, one forward a step).

Built on mlx-lm's pieces: `generate_step` (chunked prefill, logits processors, the pipelined decode loop),
its `TokenizerWrapper` and streaming detokenizer, and its cache classes (`CacheList`, `BatchKVCache`,
`ArraysCache`) whose `merge`/`filter` batch independent sequences. Ours on top: the reasoning/answer split,
stop strings that are never emitted, the context-limit check, and vLLM-ordered sampling (`sampling.py`).

Cache invariant (chat sessions rely on it): after `stream_generate` yields a token, the cache holds the prompt
and every generated token up to and including that one (EOS too), and nothing more.
"""

from __future__ import annotations

import copy
import numbers
import operator
import reprlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .errors import ZayaError
from .reasoning import ANSWER, REASONING, ReasoningSplitter, starts_in_reasoning as _starts_in_reasoning  # noqa: F401
from .sampling import check_sampling, make_logits_processors, make_sampler
from .tokenizer import encode_prompt, load_tokenizer, require_tokenizer, turn_start_id

DEFAULT_MAX_TOKENS = 2048


@dataclass
class GenerationResponse:
    """One streamed piece. `text` is new text of `channel` ("reasoning" or "answer"); think tags never appear.

    Usually one response per token. When one token's text crosses a `</think>` boundary, the token gets one
    response per channel (same `token` and counts; count tokens with `generation_tokens`). The last response
    has `finish_reason`: "stop" (an EOS id, which is then `token`), "length" (max_tokens) or "stop_string".
    """

    text: str
    token: int
    channel: str
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None


@dataclass
class GenerationResult:
    """A whole generation. `text` is what the model wrote (think tags kept; stop string and EOS left out);
    `reasoning`/`answer` its split; `tokens` every generated id, including the EOS or the token that
    completed a stop string."""

    text: str
    reasoning: str
    answer: str
    tokens: List[int]
    finish_reason: Optional[str]
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0


def load(path_or_repo, dtype=None, decode=None):
    """`(model, tokenizer)` from a folder or hub id. Without tokenizer files the tokenizer is a
    `NoTokenizer`: token-id work runs, anything that needs text raises one ZayaError naming the folder.
    decode: the model's `DecodeOptions` (default: the fused decode step on a GPU, once checked)."""
    from .loading import load_model, resolve_model_path

    path = resolve_model_path(path_or_repo)
    model = load_model(path, dtype=dtype, decode=decode)
    tokenizer = load_tokenizer(path)
    model.zaya_source = str(path_or_repo)
    return model, tokenizer


# --- caches and prefill -------------------------------------------------------------------------------------------


def cache_length(cache) -> int:
    """Tokens a B=1 cache holds (0 for None or a fresh cache)."""
    if not cache:
        return 0
    kv = cache[0][0] if hasattr(cache[0], "caches") else cache[0]
    size = kv.size()
    return int(size) if not isinstance(size, mx.array) else int(size.item())


def context_limit(model, max_context: Optional[int] = None) -> int:
    if max_context is not None:
        return int(max_context)
    args = getattr(model, "args", None)
    return int(getattr(args, "max_position_embeddings", 0) or 1 << 62)


def check_context(model, n_cached: int, n_prompt: int, max_tokens: int, max_context: Optional[int] = None) -> None:
    """One-line ZayaError, before any compute, when the prompt and max_tokens would not fit."""
    limit = context_limit(model, max_context)
    held = f" after {n_cached} tokens already in the context" if n_cached else ""
    if n_cached + n_prompt > limit:
        raise ZayaError(f"the prompt is {n_prompt} tokens{held}, over the context limit of {limit} tokens; "
                        "shorten it")
    if n_cached + n_prompt + max_tokens > limit:
        raise ZayaError(f"the prompt ({n_prompt} tokens{held}) plus max_tokens ({max_tokens}) is over the context "
                        f"limit of {limit} tokens; lower max_tokens to {limit - n_cached - n_prompt} or shorten the "
                        "prompt")


def prefill(model, tokens: Sequence[int], cache, prefill_step_size: int = 512) -> Optional[mx.array]:
    """Run `tokens` through the model into `cache` in chunks; return the last position's logits [1, V].

    All but the last token go in chunks whose logits are never computed (only the cache is evaluated), the
    last one alone, as mlx-lm's generate_step does; so memory is bounded by the chunk size.
    """
    tokens = list(tokens)
    if not tokens:
        return None
    step = max(1, int(prefill_step_size))
    head, last = tokens[:-1], tokens[-1:]
    for i in range(0, len(head), step):
        model(mx.array(head[i : i + step], dtype=mx.int32)[None], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(mx.array(last, dtype=mx.int32)[None], cache=cache)
    return logits[:, -1, :]


# --- stop strings -------------------------------------------------------------------------------------------------


class StopStrings:
    """Holds back text that could still become a stop string; cuts the stream where one completes."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in (stops or ()) if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string completed)."""
        buf = self._held + text
        if not self.stops:
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


# --- single-sequence streaming ------------------------------------------------------------------------------------


def token_ids(prompt, vocab_size: int) -> List[int]:
    """A prompt's token ids (whole numbers, or an integer mx.array) as a list, each checked against the vocabulary:
    an id outside it would read past the embedding."""
    values = prompt.reshape(-1).tolist() if isinstance(prompt, mx.array) else prompt
    try:
        ids = [operator.index(t) for t in values]
    except TypeError:
        raise ZayaError(f"a prompt is text or token ids (whole numbers), got {reprlib.repr(prompt)}") from None
    if not ids:
        raise ZayaError("the prompt is empty")
    outside = next((t for t in ids if not 0 <= t < vocab_size), None)
    if outside is not None:
        raise ZayaError(f"token id {outside} is outside the model's vocabulary [0, {vocab_size})")
    return ids


def _prompt_ids(model, tokenizer, prompt) -> List[int]:
    return token_ids(encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else prompt, model.args.vocab_size)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    cache=None,
    prefill_step_size: int = 512,
    max_context: Optional[int] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    starts_in_reasoning: Optional[bool] = None,
    prompt_progress: Optional[Callable[[int, int], None]] = None,
    kv_bits: Optional[int] = None,
) -> Iterator[GenerationResponse]:
    """Stream a completion of `prompt` (raw text, no template, or token ids; for chat, pass the ids of
    `zaya_mlx.tokenizer.apply_chat_template`). See GenerationResponse for what is yielded.

    `cache` (from `model.make_cache()`, possibly holding earlier tokens) is extended in place; by default a
    fresh one is used, its keys and values quantized to `kv_bits` (8 or 4) where given. `starts_in_reasoning` defaults to what the prompt says (an open `<think>` in its last
    turn). `sampler` (log-probs [1, V] -> ids [1]) replaces the temperature/top-p/top-k/min-p/seed settings.
    Errors in the arguments (context overflow included) are raised here, before any compute.
    """
    steps = _token_stream(
        model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop, cache=cache,
        prefill_step_size=prefill_step_size, max_context=max_context, sampler=sampler,
        starts_in_reasoning=starts_in_reasoning, prompt_progress=prompt_progress, kv_bits=kv_bits,
    )
    return _flatten(steps)


def _flatten(steps):
    try:
        for _raw, responses in steps:
            yield from responses
    finally:
        steps.close()


def generate(model, tokenizer, prompt, **kwargs) -> GenerationResult:
    """`stream_generate` run to the end and collected (same arguments) into a GenerationResult."""
    raw, reasoning, answer, tokens = [], [], [], []
    last = None
    for raw_text, responses in _token_stream(model, tokenizer, prompt, **kwargs):
        raw.append(raw_text)
        tokens.append(responses[-1].token)
        for r in responses:
            (reasoning if r.channel == REASONING else answer).append(r.text)
        last = responses[-1]
    return GenerationResult(
        text="".join(raw), reasoning="".join(reasoning), answer="".join(answer), tokens=tokens,
        finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens, prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens, generation_tps=last.generation_tps,
        peak_memory_gb=last.peak_memory_gb,
    )


def _token_stream(
    model, tokenizer, prompt, *, max_tokens=DEFAULT_MAX_TOKENS, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
    repetition_penalty=None, seed=None, stop=(), cache=None, prefill_step_size=512, max_context=None, sampler=None,
    starts_in_reasoning=None, prompt_progress=None, kv_bits=None,
) -> Iterator[tuple[str, List[GenerationResponse]]]:
    """Check everything now; return a generator of, per generated token, (the raw text it released, think
    tags kept; its responses)."""
    tokenizer = require_tokenizer(tokenizer)
    ids = _prompt_ids(model, tokenizer, prompt)
    if not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
        raise ZayaError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
    check_sampling(temperature, top_p, top_k, min_p, repetition_penalty)
    if cache is None:
        cache = model.make_cache(kv_bits=kv_bits)
    n_cached = cache_length(cache)
    check_context(model, n_cached, len(ids), max_tokens, max_context)
    if sampler is None:
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
    eos = set(tokenizer.eos_token_ids)
    if starts_in_reasoning is None:
        starts_in_reasoning = prompt_opens_reasoning(tokenizer, ids)
    splitter = ReasoningSplitter(in_reasoning=bool(starts_in_reasoning))
    if tokenizer.has_thinking:
        splitter.think_start, splitter.think_end = tokenizer.think_start, tokenizer.think_end
    stops = StopStrings(stop)
    detokenizer = tokenizer.detokenizer
    logits_processors = make_logits_processors(repetition_penalty)
    return _run(model, ids, cache, max_tokens, sampler, logits_processors, prefill_step_size, prompt_progress, eos,
                detokenizer, stops, splitter)


def _run(model, ids, cache, max_tokens, sampler, logits_processors, prefill_step_size, prompt_progress, eos,
         detokenizer, stops, splitter):
    from mlx_lm.generate import generate_step, generation_stream, wired_limit

    token_iter = generate_step(
        mx.array(ids, dtype=mx.int32), model, generation_stream, max_tokens=max_tokens, sampler=sampler,
        logits_processors=logits_processors, prompt_cache=cache,
        prefill_step_size=prefill_step_size, prompt_progress_callback=prompt_progress,
    )
    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        prompt_tps = 0.0
        try:
            for n, (token, _logprobs) in enumerate(token_iter, start=1):
                now = time.perf_counter()
                if n == 1:
                    prompt_tps = len(ids) / max(now - tic, 1e-9)
                    tic = now
                finish = None
                if token in eos:
                    finish, text = "stop", ""
                else:
                    detokenizer.add_token(token)
                    text = detokenizer.last_segment
                    if n >= max_tokens:
                        finish = "length"
                if finish:
                    detokenizer.finalize()
                    text += detokenizer.last_segment
                text, hit = stops.feed(text)
                if hit:
                    finish = "stop_string"
                elif finish:
                    text += stops.flush()
                pieces = splitter.feed(text) + (splitter.flush() if finish else [])
                merged: list = []
                for channel, piece in pieces:
                    if merged and merged[-1][0] == channel:
                        merged[-1] = (channel, merged[-1][1] + piece)
                    else:
                        merged.append((channel, piece))
                merged = merged or [(splitter.channel, "")]
                gen_tps = (n - 1) / max(time.perf_counter() - tic, 1e-9) if n > 1 else 0.0
                peak = mx.get_peak_memory() / 1e9
                yield text, [
                    GenerationResponse(
                        text=piece, token=int(token), channel=channel, prompt_tokens=len(ids), prompt_tps=prompt_tps,
                        generation_tokens=n, generation_tps=gen_tps, peak_memory_gb=peak,
                        finish_reason=finish if j == len(merged) - 1 else None,
                    )
                    for j, (channel, piece) in enumerate(merged)
                ]
                if finish:
                    return
        finally:
            token_iter.close()


def prompt_opens_reasoning(tokenizer, ids: Sequence[int]) -> bool:
    """Whether the prompt's last turn leaves `<think>` open (qwen3-style templates), so generation starts there."""
    if not tokenizer.has_thinking:
        return False
    if len(tokenizer.think_start_tokens) != 1 or len(tokenizer.think_end_tokens) != 1:
        return False
    return _starts_in_reasoning(ids, tokenizer.think_start_id, tokenizer.think_end_id, turn_start_id(tokenizer))



# --- batched decoding ---------------------------------------------------------------------------------------------


def batch_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: Union[int, Sequence[int]],
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    stop_ids: Sequence[int] = (),
    prefix_cache=None,
    prefix_len: int = 0,
    prefill_step_size: int = 512,
    on_token: Optional[Callable[[int, int], None]] = None,
) -> List[List[int]]:
    """Decode several independent prompts together: one model forward per step for every running sequence.

    Each prompt is prefilled alone (B=1, chunked); the caches are merged into one left-padded batch
    (mlx-lm's `BatchKVCache`, which keeps each sequence's RoPE offset) and decoded jointly; finished rows are
    filtered out. Greedy, each sequence gets exactly what it gets alone.

    prompts: full token ids. With `prefix_cache` (a B=1 cache holding the first `prefix_len` tokens, which all
    prompts share), each prompt's remainder is prefilled on a deep copy of it; the prefix cache is untouched.
    max_tokens: one for all, or one per prompt. sampler: log-probs [B, V] -> ids [B] (default greedy).
    stop_ids: a sequence ends on any of them (the stop id is kept in its output). on_token(i, id) is called for
    every generated token of prompt i. Returns the generated ids of each prompt.
    """
    from mlx_lm.sample_utils import greedy_sampler

    n = len(prompts)
    limits = [int(max_tokens)] * n if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
    if len(limits) != n:
        raise ZayaError(f"max_tokens has {len(limits)} entries for {n} prompts")
    if any(isinstance(p, str) for p in prompts):
        raise ZayaError("batch_generate takes token ids: encode text prompts with the tokenizer first")
    prompts = [token_ids(p, model.args.vocab_size) for p in prompts]
    if prefix_cache is not None:
        held = cache_length(prefix_cache)
        if held != prefix_len:
            raise ZayaError(f"prefix_cache holds {held} tokens but prefix_len is {prefix_len}")
    for i, p in enumerate(prompts):
        if len(p) <= prefix_len:
            raise ZayaError(f"prompt {i} has {len(p)} tokens: it needs at least one after the {prefix_len}-token "
                            "prefix")
        over = len(p) + limits[i] - context_limit(model)
        if over > 0:
            raise ZayaError(f"prompt {i} ({len(p)} tokens) plus max_tokens ({limits[i]}) is over the context "
                            f"limit of {context_limit(model)} tokens")
    sampler = sampler or greedy_sampler
    stop = set(int(t) for t in stop_ids)
    outputs: List[List[int]] = [[] for _ in range(n)]
    active = [i for i in range(n) if limits[i] > 0]
    if not active:
        return outputs

    # Prefill each prompt alone, then merge into one batch.
    caches, last = [], []
    for i in active:
        cache = copy.deepcopy(prefix_cache) if prefix_cache is not None else model.make_cache()
        last.append(prefill(model, prompts[i][prefix_len:], cache, prefill_step_size))
        mx.eval(last[-1], [c.state for c in cache])
        caches.append(cache)
    batch = [type(layer).merge([c[k] for c in caches]) for k, layer in enumerate(caches[0])]
    del caches

    def sample(logits: mx.array) -> mx.array:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs).reshape(-1).astype(mx.int32)

    tokens = sample(mx.concatenate(last, axis=0))
    del last
    mx.async_eval(tokens)
    while True:
        # The next step is queued before this one's tokens are read, so the model works while we book-keep;
        # a row that turns out finished costs one wasted row, filtered out below.
        next_tokens = sample(model(tokens[:, None], cache=batch)[:, -1, :])
        mx.async_eval(next_tokens)
        keep = []
        for j, t in enumerate(tokens.tolist()):
            i = active[j]
            outputs[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if t not in stop and len(outputs[i]) < limits[i]:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            index = mx.array(keep, dtype=mx.int32)
            for c in batch:
                c.filter(index)
            next_tokens = next_tokens[index]
            active = [active[j] for j in keep]
        tokens = next_tokens
    return outputs
