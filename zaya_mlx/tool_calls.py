"""ZAYA's tool calls: find them in the generated answer and turn them into OpenAI `tool_calls`.

ZAYA writes a call as Qwen3-Coder's XML inside its own tags (single special tokens; vLLM's `zaya_xml` parser):

    <zyphra_tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </zyphra_tool_call>

The body is mlx-lm's `qwen3_coder` tool-parser format, so its `parse_tool_call` reads it, typing each value from
the tool's JSON schema (integer, number, boolean, object/array as JSON, else the string). `ToolCallSplitter`
separates calls from the answer's text as it streams, holding back a tag split over two pieces.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from mlx_lm.tool_parsers import qwen3_coder

from .reasoning import partial_suffix

TOOL_CALL_START = "<zyphra_tool_call>"
TOOL_CALL_END = "</zyphra_tool_call>"

TEXT = "text"
CALL = "call"


def parse_tool_call(body: str, tools: Optional[list] = None) -> dict:
    """`{"name", "arguments"}` of one call's body (the text between the tags); ValueError if it is not a call."""
    return qwen3_coder.parse_tool_call(body.strip(), tools)


def openai_tool_call(call: dict, index: Optional[int] = None) -> dict:
    """An OpenAI `tool_calls` entry (arguments as a JSON string); `index` for streamed deltas."""
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
    if index is not None:
        out["index"] = index
    return out


class ToolCallSplitter:
    """Feed answer text; get `(TEXT, text)` and `(CALL, body)` pieces back in order, the tags dropped.

    A call is returned once its closing tag arrives. `flush()` returns what was held back: a call that never
    closed (generation stopped inside it) comes back as text, tag included, so nothing the model wrote is lost.
    """

    def __init__(self):
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        buf = self._buffer + text
        while True:
            if self._in_call:
                end = buf.find(TOOL_CALL_END)
                if end < 0:
                    break
                out.append((CALL, buf[:end]))
                buf = buf[end + len(TOOL_CALL_END):]
                self._in_call = False
            else:
                start = buf.find(TOOL_CALL_START)
                if start < 0:
                    hold = partial_suffix(buf, (TOOL_CALL_START,))
                    if buf[: len(buf) - hold]:
                        out.append((TEXT, buf[: len(buf) - hold]))
                    buf = buf[len(buf) - hold:]
                    break
                if start:
                    out.append((TEXT, buf[:start]))
                buf = buf[start + len(TOOL_CALL_START):]
                self._in_call = True
        self._buffer = buf
        return out

    def flush(self) -> list[tuple[str, Any]]:
        held = (TOOL_CALL_START if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return [(TEXT, held)] if held else []
