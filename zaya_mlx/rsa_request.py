"""Zyphra's RSA requests: a chat completion whose JSON body carries RSA parameters runs Markovian RSA.

The parameter names, their aliases, their defaults' sources and the response are those of Zyphra's RSA proxy
(their vLLM fork, `examples/markovian_rsa/rsa_proxy_server.py`), so a client written for it works unchanged:
the last round's responses as the choices, the whole run's token usage, `rsa_metadata` (unless
`return_rsa_metadata` is false) and `aggregation_prompt` when `return_aggregation_prompt`. Unset fields come
from the server's RSA preset; the request's sampling is every round's but the last, as in Zyphra's proxy.
Two switches of the proxy are not in the engine: `rsa_summarize` and `use_pacore` (a request that turns one
on is refused); `rsa_tail_window: false` (whole candidates) is a window as long as a rollout can be.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ZayaError
from .openai_api import ApiError

# Zyphra's proxy's table: field -> the names a body may use for it, the first one wins.
ALIASES = {
    "rsa_t": ("rsa_t",),
    "rsa_k": ("rsa_k",),
    "rsa_n": ("rsa_n",),
    "rsa_summarize": ("rsa_summarize", "summarize"),
    "rsa_tail_window": ("rsa_tail_window", "rsa_use_tail_window"),
    "tail_window_len": ("tail_window_len", "rsa_tail_window_len"),
    "short_resp_len": ("short_resp_len", "rsa_short_resp_len"),
    "use_pacore": ("use_pacore", "rsa_use_pacore"),
    "rsa_final_n": ("rsa_final_n", "final_aggregation_prompts"),
    "final_temperature": ("final_temperature", "rsa_final_temperature"),
    "final_top_p": ("final_top_p", "rsa_final_top_p"),
    "final_top_k": ("final_top_k", "rsa_final_top_k"),
    "summary_prompt": ("summary_prompt", "rsa_summary_prompt"),
    "return_aggregation_prompt": ("return_aggregation_prompt", "rsa_return_aggregation_prompt"),
    "return_rsa_metadata": ("return_rsa_metadata", "rsa_return_metadata"),
    "rsa_max_concurrency": ("rsa_max_concurrency",),
    "rsa_debug": ("rsa_debug",),
}
NAMES = {alias for aliases in ALIASES.values() for alias in aliases}
INTS = ("rsa_t", "rsa_k", "rsa_n", "tail_window_len", "short_resp_len", "rsa_final_n")
PROGRESS_KINDS = ("round_started", "rollout_finished", "round_finished", "progress")


def is_rsa(body: dict) -> bool:
    """Zyphra's rule: any RSA parameter (under any alias) in the body makes it an RSA request."""
    return any(name in body for name in NAMES)


def _pop(body: dict, key: str):
    for alias in ALIASES[key]:
        if alias in body:
            return body[alias]
    return None


def _bool(name: str, value) -> Optional[bool]:
    """Zyphra's `parse_bool`: booleans, and the usual words for them."""
    if value is None or isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in {"1", "true", "yes", "y", "on"}:
        return True
    if word in {"0", "false", "no", "n", "off"}:
        return False
    raise ApiError(400, f"{name} must be a boolean, got {value!r}")


def _number(name: str, value, kind):
    if value is None:
        return None
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be {'a whole number' if kind is int else 'a number'}, got {value!r}") \
            from None


@dataclass
class RSARequest:
    params: Any  # rsa.RSAParams
    seed: int
    max_batch: Optional[int]
    return_metadata: bool
    return_aggregation_prompt: bool


def parse(body: dict, preset: str, sampling: dict, max_tokens: Optional[int], enable_thinking: bool) -> RSARequest:
    """The RSA parameters of a body (Zyphra's names and aliases) over the server's `preset`. `sampling`
    (temperature, top_p, top_k, min_p) and `max_tokens` are the request's, where it sets them."""
    from . import rsa

    if _bool("rsa_summarize", _pop(body, "rsa_summarize")):
        raise ApiError(400, "rsa_summarize is not supported here: the engine carries tails (rsa_tail_window)")
    if _bool("use_pacore", _pop(body, "use_pacore")):
        raise ApiError(400, "use_pacore is not supported here: the engine writes Zyphra's RSA prompts")
    fields = {key: _number(ALIASES[key][0], _pop(body, key), int) for key in INTS}
    if fields["rsa_n"] is None and body.get("n") is not None:
        fields["rsa_n"] = _number("n", body["n"], int)  # Zyphra's proxy: rsa_n defaults to the request's n
    for key in ("final_temperature", "final_top_p"):
        fields[key] = _number(key, _pop(body, key), float)
    fields["final_top_k"] = _number("final_top_k", _pop(body, "final_top_k"), int)
    base = rsa.RSAParams.preset(preset)
    if _bool("rsa_tail_window", _pop(body, "rsa_tail_window")) is False:
        fields["tail_window_len"] = fields["short_resp_len"] or base.short_resp_len
    concurrency = _number("rsa_max_concurrency", _pop(body, "rsa_max_concurrency"), int) or 0
    if concurrency < 0:
        raise ApiError(400, f"rsa_max_concurrency must be >= 0, got {concurrency}")
    seed = _number("seed", body.get("seed"), int)
    try:
        params = rsa.RSAParams.preset(preset, **fields, **sampling, max_tokens=max_tokens,
                                      enable_thinking=enable_thinking)
    except ZayaError as e:
        raise ApiError(400, in_request_terms(str(e))) from None
    metadata = _bool("return_rsa_metadata", _pop(body, "return_rsa_metadata"))
    return RSARequest(params=params, seed=seed if seed is not None else int(time.time_ns() % (1 << 31)),
                      max_batch=concurrency or None, return_metadata=metadata is not False,
                      return_aggregation_prompt=bool(_bool("return_aggregation_prompt",
                                                           _pop(body, "return_aggregation_prompt"))))


REQUEST_FIELDS = ("rsa_n", "rsa_k", "rsa_t", "tail_window_len", "short_resp_len", "max_tokens", "rsa_final_n",
                  "final_temperature", "final_top_p", "final_top_k", "temperature", "top_p", "top_k", "min_p")


def in_request_terms(message: str) -> str:
    """An RSA error as a client of the server reads it: the engine's command-line flags (`--k`, `--n (rsa_n)`)
    become the request's fields (`rsa_k`, `rsa_n`)."""
    from .rsa.params import FLAGS

    for name in REQUEST_FIELDS:
        flag = re.escape(FLAGS[name])
        message = re.sub(rf"(?<![\w-]){flag}(?![\w-])( \({name}\))?", name, message)
    return message


def progress(event) -> Optional[dict]:
    """The JSON a streamed RSA request is shown of an engine event (None for the events it is not shown)."""
    if event.kind not in PROGRESS_KINDS:
        return None
    data = {k: v for k, v in event.data.items() if k not in ("rollout",) and isinstance(v, (int, float, str, list))}
    out = {"kind": event.kind, **data}
    if event.round >= 0:
        out["round"] = event.round
    if event.rollout >= 0:
        out["rollout"] = event.rollout
    return out


def choices(result) -> list:
    """One choice per response of the last round, reasoning split as vLLM's qwen3 parser serves it."""
    return [{"index": i, "message": {"role": "assistant", "content": f.content or None,
                                     "reasoning_content": f.reasoning or None},
             "finish_reason": "length" if f.finish_reason == "length" else "stop"}
            for i, f in enumerate(result.finals)]


def response(result, request: RSARequest, model: str) -> dict:
    """Zyphra's RSA chat completion for a finished run."""
    out = {"id": f"chatcmpl-rsa-{int(time.time() * 1000)}", "object": "chat.completion", "created": int(time.time()),
           "model": model, "choices": choices(result), "usage": dict(result.usage)}
    metadata = {**result.metadata, "rsa_seed": result.seed}
    if request.return_metadata:
        out["rsa_metadata"] = metadata
    if request.return_aggregation_prompt:
        prompt = result.aggregation_prompt  # the last round's first prompt (None without aggregation)
        out["aggregation_prompt"] = prompt
        if request.return_metadata:
            metadata["rsa_final_aggregation_prompt"] = prompt
    return out


def error_response(message: str, model: str) -> dict:
    """Zyphra's answer to a run that fails after its response has started: a completion saying so."""
    return {"id": f"chatcmpl-rsa-error-{int(time.time() * 1000)}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"RSA error: {message}"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, "rsa_error": True}
