"""Zyphra's RSA requests: a chat completion whose JSON body carries RSA parameters runs Markovian RSA.

The body is read by `rsa.from_request` (Zyphra's proxy's names, aliases and refusals) over the server's RSA
preset, so a client written for Zyphra's proxy works unchanged. The answer is that proxy's: the last round's
responses as the choices (reasoning split as vLLM's qwen3 parser serves it), the whole run's token usage,
`rsa_metadata` (unless `return_rsa_metadata` is false) and `aggregation_prompt` when
`return_aggregation_prompt`. Ours: the request's `seed` (else a fresh one) seeds the run and comes back as
`rsa_metadata["rsa_seed"]`; `chat_template_kwargs.enable_thinking` renders every prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ZayaError
from .openai_api import ApiError, ChatRequest

PROGRESS_KINDS = ("round_started", "rollout_finished", "round_finished", "progress")


@dataclass
class RSARequest:
    params: Any  # rsa.RSAParams
    seed: int
    max_batch: Optional[int]
    return_metadata: bool
    return_aggregation_prompt: bool


def parse(body: dict, request: ChatRequest, preset: str) -> Optional[RSARequest]:
    """The RSA run a body asks for, over the server's `preset`; None for a plain request (no RSA field)."""
    from . import rsa

    try:
        got = rsa.from_request(body, base=rsa.RSAParams.preset(preset))
        if got is None:
            return None
        params, options, _ = got
        params = params.replace(enable_thinking=request.enable_thinking)
    except ZayaError as e:
        raise ApiError(400, str(e)) from None
    seed = request.seed if request.seed is not None else time.time_ns() % (1 << 31)
    return RSARequest(params=params, seed=seed, max_batch=options["max_batch"],
                      return_metadata=options["return_rsa_metadata"],
                      return_aggregation_prompt=options["return_aggregation_prompt"])


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
        prompt = result.aggregation_prompt
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
