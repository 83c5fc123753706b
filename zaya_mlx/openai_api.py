"""OpenAI's chat and text completions: a request body in, our generation's stream out as OpenAI JSON.

Reasoning goes to `reasoning_content` (vLLM's name, as its qwen3 reasoning parser gives it), the answer to
`content`, ZAYA's tool calls to `tool_calls` (`tool_calls.py`). mlx-lm's `process_message_content` brings
messages to the chat template's form (content parts joined, tool-call arguments as dicts), so `role: tool`
messages and earlier calls go back through the checkpoint's template as it expects them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ZayaError
from .generation import REASONING, GenerationResponse
from .tool_calls import CALL, TOOL_CALL_END, TOOL_CALL_START, ToolCallSplitter, openai_tool_call, parse_tool_call

FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length"}


class ApiError(Exception):
    """A request the server refuses: HTTP status and a one-line message, sent as OpenAI's error object."""

    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}


def _get(body: dict, name: str, kinds, default=None, *, low=None, high=None):
    """body[name] checked for type and range (bool is not a number here), or `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"{name} must be {bound}, got {value!r}")
    return value


# OpenAI's parameters this server does not implement, with the values that ask for nothing: a request that sets one
# to anything else is refused, so that no answer is sampled, or reported, otherwise than it asked
NOT_IMPLEMENTED = {"logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                   "logprobs": (None, False), "top_logprobs": (None, 0), "best_of": (None, 1), "echo": (None, False),
                   "suffix": (None, ""), "response_format": (None, {"type": "text"})}

# the roles a chat message may have: the chat template writes any role it is given as a turn of that name, which the
# model never saw; "developer" (OpenAI's newer name for the system role) is written as the system turn
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class Request:
    """What chat and text completions share: a checked body's sampling and limits. `max_tokens` None means: as
    many as the context has room for. repetition_penalty: vLLM's (1 or None: off)."""

    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    repetition_penalty: Optional[float] = None

    @staticmethod
    def common(body: dict, temperature: float, top_p: float) -> dict:
        for name, asks_nothing in NOT_IMPLEMENTED.items():
            if body.get(name) not in asks_nothing:
                raise ApiError(400, f"{name} is not implemented by this server: leave it unset")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop must be a string or a list of strings")
        options = body.get("stream_options") or {}
        max_tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return dict(
            stream=_get(body, "stream", bool, False),
            include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
            max_tokens=_get(body, max_tokens_key, int, None, low=1),
            temperature=float(_get(body, "temperature", (int, float), temperature, low=0)),
            top_p=float(_get(body, "top_p", (int, float), top_p, low=0, high=1)),
            top_k=max(0, _get(body, "top_k", int, 0, low=-1)),  # -1: vLLM's "off"
            min_p=float(_get(body, "min_p", (int, float), 0.0, low=0, high=1)),
            seed=_get(body, "seed", int, None),
            stop=stop,
            repetition_penalty=_get(body, "repetition_penalty", (int, float), None, low=0),
        )


@dataclass
class ChatRequest(Request):
    messages: list = field(default_factory=list)
    n: int = 1
    tools: Optional[list] = None
    enable_thinking: bool = True

    @classmethod
    def from_body(cls, body: dict, temperature: float, top_p: float) -> "ChatRequest":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "messages must be a non-empty list of message objects")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ApiError(400, "chat_template_kwargs must be an object")
        tools = body.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise ApiError(400, "tools must be a list")
        if body.get("tool_choice") == "none":
            tools = None
        return cls(messages=messages, n=_get(body, "n", int, 1, low=1), tools=tools,
                   enable_thinking=bool(kwargs.get("enable_thinking", True)),
                   **cls.common(body, temperature, top_p))


@dataclass
class TextRequest(Request):
    """A text completion: `prompt` is raw text (no chat template) or token ids."""

    prompt: Any = ""

    @classmethod
    def from_body(cls, body: dict, temperature: float, top_p: float) -> "TextRequest":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not ids:
            raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt a request)")
        if _get(body, "n", int, 1, low=1) != 1:
            raise ApiError(400, "n must be 1: this server writes one choice per request")
        return cls(prompt=prompt, **cls.common(body, temperature, top_p))


def template_messages(request: ChatRequest) -> list[dict]:
    """A copy of the request's messages in the chat template's form (mlx-lm's `process_message_content`)."""
    import copy

    from mlx_lm.server import process_message_content

    messages = copy.deepcopy(request.messages)
    for m in messages:
        if m["role"] == "developer":
            m["role"] = "system"
    try:
        process_message_content(messages)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ApiError(400, f"messages: {e}") from None
    return messages


def prompt_ids(tokenizer, request: ChatRequest) -> list[int]:
    """The chat template's token ids for the request's messages (and tools)."""
    from .tokenizer import apply_chat_template

    try:
        return apply_chat_template(tokenizer, template_messages(request), enable_thinking=request.enable_thinking,
                                   tools=request.tools)
    except ZayaError as e:
        raise ApiError(400, str(e)) from None


class ChatStream:
    """Generation responses in, OpenAI deltas out; accumulates the whole message for a non-streamed answer."""

    def __init__(self, tools: Optional[list]):
        self.tools = tools
        self.splitter = ToolCallSplitter() if tools else None
        self.reasoning, self.content, self.tool_calls = [], [], []
        self.completion_tokens = 0

    def _answer(self, pieces, delta: dict) -> None:
        for kind, text in pieces:
            if kind == CALL:
                try:
                    call = openai_tool_call(parse_tool_call(text, self.tools), index=len(self.tool_calls))
                except (ValueError, KeyError):
                    text = f"{TOOL_CALL_START}{text}{TOOL_CALL_END}"  # not a call: kept as the text it was
                else:
                    self.tool_calls.append(call)
                    delta.setdefault("tool_calls", []).append(call)
                    continue
            if text:
                self.content.append(text)
                delta["content"] = delta.get("content", "") + text

    def feed(self, r: GenerationResponse) -> dict:
        """The delta for one response ({} when it has nothing to show yet)."""
        self.completion_tokens = r.generation_tokens
        delta: dict = {}
        if r.channel == REASONING:
            if r.text:
                self.reasoning.append(r.text)
                delta["reasoning_content"] = r.text
        elif self.splitter is not None:
            self._answer(self.splitter.feed(r.text), delta)
        elif r.text:
            self.content.append(r.text)
            delta["content"] = r.text
        return delta

    def flush(self) -> dict:
        delta: dict = {}
        if self.splitter is not None:
            self._answer(self.splitter.flush(), delta)
        return delta

    def finish_reason(self, reason: Optional[str]) -> str:
        reason = FINISH_REASONS.get(reason, "stop")
        return "tool_calls" if self.tool_calls and reason == "stop" else reason

    def message(self) -> dict:
        out: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None,
                               "reasoning_content": "".join(self.reasoning) or None}
        if self.tool_calls:
            out["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls]
        return out


class RawText:
    """The model's text as it wrote it, think tags included, from the split stream: a change of channel is where
    a tag was (`stream_generate` drops the tags and nothing else)."""

    def __init__(self, tokenizer, ids):
        from .generation import prompt_opens_reasoning

        self.channel = REASONING if prompt_opens_reasoning(tokenizer, ids) else "answer"
        thinking = getattr(tokenizer, "has_thinking", False)
        self.start = tokenizer.think_start if thinking else "<think>"
        self.end = tokenizer.think_end if thinking else "</think>"

    def feed(self, r: GenerationResponse) -> str:
        tag = ""
        if r.channel != self.channel:
            tag = self.start if r.channel == REASONING else self.end
            self.channel = r.channel
        return tag + r.text


def text_completion(request_id: str, model: str, text: Optional[str], finish_reason: Optional[str] = None) -> dict:
    """A text completion, or a streamed piece of one; `text` None gives one with no choices (usage)."""
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chunk(request_id: str, model: str, delta: Optional[dict], finish_reason: Optional[str] = None,
          index: int = 0) -> dict:
    """A streamed chunk; `delta` None gives one with no choices (usage, RSA progress)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish_reason}]
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, message: dict, finish_reason: str, use: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}], "usage": use}
