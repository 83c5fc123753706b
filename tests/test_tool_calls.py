"""ZAYA's tool-call format: split from streamed text however it is cut, parsed and typed by the tool's schema."""

import pytest

from zaya_mlx.tool_calls import CALL, TEXT, ToolCallSplitter, parse_tool_call

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "number"}, "exact": {"type": "boolean"}, "tags": {"type": "array"},
    "note": {"type": "string"}}}}}]
BODY = ("\n<function=add>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n0.5\n</parameter>\n<parameter=exact>\nfalse\n"
        "</parameter>\n<parameter=tags>\n[\"x\", 1]\n</parameter>\n<parameter=note>\n 7 \n</parameter>\n</function>\n")
TEXT_WITH_CALLS = f"Adding.<zyphra_tool_call>{BODY}</zyphra_tool_call>\n<zyphra_tool_call>{BODY}</zyphra_tool_call>"


def _merged(pieces):
    out = []
    for kind, value in pieces:
        if out and kind == TEXT and out[-1][0] == TEXT:
            out[-1] = (TEXT, out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


@pytest.mark.parametrize("step", [1, 3, 7, len(TEXT_WITH_CALLS)])
def test_splitter_finds_calls_however_the_text_is_cut(step):
    splitter = ToolCallSplitter()
    pieces = []
    for i in range(0, len(TEXT_WITH_CALLS), step):
        pieces += splitter.feed(TEXT_WITH_CALLS[i : i + step])
    pieces += splitter.flush()
    assert _merged(pieces) == [(TEXT, "Adding."), (CALL, BODY), (TEXT, "\n"), (CALL, BODY)]


def test_an_unclosed_call_comes_back_as_text():
    splitter = ToolCallSplitter()
    cut = TEXT_WITH_CALLS[:40]
    assert _merged(splitter.feed(cut) + splitter.flush()) == [(TEXT, cut)]


def test_values_are_typed_by_the_schema():
    assert parse_tool_call(BODY, TOOLS) == {
        "name": "add", "arguments": {"a": 2, "b": 0.5, "exact": False, "tags": ["x", 1], "note": " 7 "}}
    assert parse_tool_call(BODY)["arguments"]["a"] == "2"  # no schema: strings, as written


def test_a_body_without_a_function_is_not_a_call():
    with pytest.raises(ValueError):
        parse_tool_call("\n<parameter=a>\n2\n</parameter>\n", TOOLS)


def test_a_malformed_call_stays_in_the_answer():
    from zaya_mlx.generation import GenerationResponse
    from zaya_mlx.openai_api import ChatStream

    text = "Sure.<zyphra_tool_call>\nnot a call\n</zyphra_tool_call>"
    stream = ChatStream(TOOLS)
    stream.feed(GenerationResponse(text=text, token=1, channel="answer", prompt_tokens=1, prompt_tps=0.0,
                                   generation_tokens=1, generation_tps=0.0, peak_memory_gb=0.0, finish_reason="stop"))
    stream.flush()
    assert stream.message()["content"] == text and "tool_calls" not in stream.message()
    assert stream.finish_reason("stop") == "stop"
