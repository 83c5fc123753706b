"""Reasoning longer than the context, budget forcing and conversations longer than the context, on the tiny model
(context 512).

The model is the real tiny fixture with its logits replaced by a script of the sequence so far (`Scripted`): its
forwards fill the real cache, and the wrapper records what every forward sees. The script is Markovian, like the
reasoning it stands for: the next token depends on the last three tokens only. Its reasoning counts 0, 1, ...,
N - 1, each number two tokens (a "high" and a "low" digit from disjoint id ranges), then `</think>`, `OK`,
end of turn. So a reasoning continued from a tail goes on counting exactly where it was cut, and the expected
tokens of every chunk are known by hand.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest

from generation_fixtures import full_logits, loaded
from zaya_mlx import ZayaError
from zaya_mlx.chat_session import THINK_BUDGET_NOTE, ChatSession
from zaya_mlx.generation import cache_length
from zaya_mlx.think_budget import ThinkBudget, parse_think_budget
from zaya_mlx.tui import ChatUI

IM_START, IM_END, THINK, END_THINK = 105, 106, 107, 108
HI, LO, BASE = 3, 13, 32  # a number v is the tokens (HI + v // BASE, LO + v % BASE): ASCII "!" to "J"
CONTEXT = 512


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return loaded(tmp_path_factory.getbasetemp() / "generation")


def number(v: int) -> list[int]:
    return [HI + v // BASE, LO + v % BASE]


def reasoning_ids(n: int) -> list[int]:
    return [t for v in range(n) for t in number(v)]


class Scripted:
    """The tiny model (so every forward is real and fills the cache) with scripted logits; records every
    forward as (tokens the cache held before it, tokens it fed) and the whole sequence the context holds."""

    def __init__(self, model, tokenizer, numbers: int):
        self.model, self.args, self.layers = model, model.args, model.layers
        self.numbers = numbers
        self.header = [IM_START] + tokenizer.encode("assistant\n", add_special_tokens=False)
        self.ok = tokenizer.encode("OK", add_special_tokens=False)
        self.newlines = tokenizer.encode("\n\n", add_special_tokens=False)
        assert not set(self.ok + self.newlines) & set(range(HI, LO + BASE))
        self.seq: list[int] = []
        self.forwards: list[tuple[int, list[int]]] = []

    def make_cache(self, **options):
        return self.model.make_cache(**options)

    def next_token(self, seq: list[int]) -> int:
        last = seq[-1]
        if seq[-len(self.header):] == self.header:
            return THINK
        if last == THINK:
            return number(0)[0]
        if HI <= last < LO:  # a high digit: its low one follows
            v = 0 if seq[-2] == THINK else (seq[-3] - HI) * BASE + seq[-2] - LO + 1
            return number(v)[1]
        if LO <= last < LO + BASE:
            v = (seq[-2] - HI) * BASE + last - LO + 1
            return END_THINK if v == self.numbers else number(v)[0]
        if last == END_THINK or seq[-len(self.newlines):] == self.newlines:
            return self.ok[0]
        if last in self.ok[:-1]:
            return self.ok[self.ok.index(last) + 1]
        return IM_END  # the end of the answer, and any position of a prompt (whose logits nobody reads)

    def __call__(self, tokens, cache=None, **kwargs):
        held = cache_length(cache)
        fed = tokens[0].tolist()
        self.seq = self.seq[:held] + fed
        self.forwards.append((held, fed))
        logits = self.model(tokens, cache=cache, **kwargs)
        hot = mx.arange(logits.shape[-1]) == self.next_token(self.seq)
        return mx.broadcast_to(mx.where(hot, 0.0, -1e9).astype(logits.dtype), logits.shape)


def collect(session, text, **kw):
    """(tokens, responses) of one turn; a token's responses share its count."""
    tokens, responses = [], []
    for r in session.send(text, **kw):
        if not responses or r.generation_tokens != responses[-1].generation_tokens:
            tokens.append(r.token)
        responses.append(r)
    return tokens, responses


def test_think_budget_text():
    assert parse_think_budget("off").mode == "off"
    assert parse_think_budget("4096") == ThinkBudget(mode="force", total=4096)
    assert parse_think_budget("chunk=150 tail=50 total=400") == ThinkBudget("chunked", 400, 150, 50)
    assert parse_think_budget(None) == ThinkBudget() == parse_think_budget(str(ThinkBudget()))
    assert parse_think_budget("chunk=100").tail == 50  # a tail that fits the chunk
    for bad in ("chunk=10 tail=10", "lots", "total=0", "size=3", ""):
        with pytest.raises(ZayaError):
            parse_think_budget(bad)


def test_reasoning_in_three_chunks_ends_with_an_answer(gen):
    model, tokenizer, _ = gen
    numbers = 300  # 600 reasoning tokens, more than the context: chunks of 250 carrying 50 (250, +200, +150)
    scripted = Scripted(model, tokenizer, numbers)
    session = ChatSession(scripted, tokenizer, think_budget="chunk=250 tail=50 total=10000", temperature=0.0)
    prompt = session.prompt_ids("count")
    tokens, responses = collect(session, "count")

    expected = reasoning_ids(numbers)
    assert tokens == [THINK] + expected + [END_THINK] + scripted.ok + [IM_END]
    assert session.last_answer == "OK" and session.last_finish_reason == "stop"
    assert session.last_reasoning == tokenizer.decode(expected)
    assert session.stats.reasoning_chunks == 3 and not session.stats.think_budget_reached
    assert max(r.chunk for r in responses) == 3 and responses[-1].finish_reason == "stop"

    # No forward ever sees more than the context.
    assert all(held + len(fed) <= CONTEXT for held, fed in scripted.forwards)
    # Each new chunk goes back to the end of the prompt and carries exactly the reasoning's last 50 tokens:
    # after 250 reasoning tokens, then after 450 (250 + 200 new).
    restarts = [(held, fed) for i, (held, fed) in enumerate(scripted.forwards)
                if i and held < scripted.forwards[i - 1][0] + len(scripted.forwards[i - 1][1])]
    assert [held for held, _ in restarts] == [len(prompt) - 1] * 2
    fed_after = []
    for held, _ in restarts:
        i = scripted.forwards.index((held, _))
        seq = []
        for h, fed in scripted.forwards[i:]:
            if h != held + len(seq):
                break
            seq += fed
        fed_after.append(seq)
    # The restart feeds the prompt's last token, `<think>`, the tail, and then decodes from there on.
    assert fed_after[0][: 2 + 50] == prompt[-1:] + [THINK] + expected[200:250]
    assert fed_after[1][: 2 + 50] == prompt[-1:] + [THINK] + expected[400:450]
    # The cache ends holding the prompt, `<think>`, the last tail and what followed it.
    assert session.cache_tokens == prompt + [THINK] + expected[400:] + [END_THINK] + scripted.ok + [IM_END]
    assert session.messages[-1]["content"] == "<think>" + tokenizer.decode(expected) + "</think>OK"


def test_budget_forcing_closes_the_think_block(gen):
    model, tokenizer, _ = gen
    scripted = Scripted(model, tokenizer, numbers=300)  # would reason for 600 tokens
    session = ChatSession(scripted, tokenizer, think_budget="100", temperature=0.0)
    prompt = session.prompt_ids("count")
    tokens, responses = collect(session, "count")
    assert tokens == [THINK] + reasoning_ids(50) + scripted.ok + [IM_END]
    assert session.last_answer == "OK" and session.stats.think_budget_reached
    assert [r.note for r in responses if r.note] == [THINK_BUDGET_NOTE]
    # The model saw its think block closed (`</think>` and a blank line) before it answered.
    assert session.cache_tokens == prompt + [THINK] + reasoning_ids(50) + [END_THINK] + scripted.newlines + \
        scripted.ok + [IM_END]
    assert session.messages[-1]["content"].endswith("</think>\n\nOK")
    assert ChatSession.from_json(scripted, tokenizer, session.to_json()).think_budget == ThinkBudget("force", 100)

    # Off: the reasoning runs to the end of the context (here the session's, 128), and the stop reason says so.
    scripted = Scripted(model, tokenizer, numbers=300)
    session = ChatSession(scripted, tokenizer, think_budget="off", temperature=0.0, max_context=128)
    tokens, responses = collect(session, "count")
    assert responses[-1].finish_reason == "context" == session.last_finish_reason
    assert len(session.cache_tokens) == 128 and session.last_answer == ""


def test_conversation_ten_times_the_context_keeps_going(gen):
    model, tokenizer, _ = gen
    scripted = Scripted(model, tokenizer, numbers=1)  # replies `<think>` one number `</think>OK`
    session = ChatSession(scripted, tokenizer, system="Count.", temperature=0.0)
    said, turns, dropped, reused = 0, 0, 0, 0
    while said <= 10 * CONTEXT:  # tokens of the user's messages and of the replies
        text = f"turn {turns}: " + "the cat sat on the mat and " * 4
        before = session.cache_tokens
        tokens, _ = collect(session, text)
        assert session.last_answer == "OK" and session.last_finish_reason == "stop", turns
        assert session.stats.reused_tokens + session.stats.prompt_tokens <= CONTEXT / 2 and session.messages[0] == {"role": "system", "content": "Count."}
        said += len(tokenizer.encode(text, add_special_tokens=False)) + len(tokens)
        turns += 1
        dropped += session.last_dropped_turns
        if session.last_dropped_turns:  # the UI says what went in one line
            n = session.last_dropped_turns
            assert ChatUI(session).left_out_line() == (
                f"context 512 tokens: left out {'earlier reasoning and ' if session.last_dropped_reasoning else ''}"
                f"{'the oldest turn' if n == 1 else f'the {n} oldest turns'} (still in /save)")
        # Between drops, a turn prefills only its new tokens (the whole cache is reused).
        reused += session.last_dropped_turns == 0 and session.stats.reused_tokens == len(before) > 0
    assert len(session.messages) == 1 + 2 * turns  # the history keeps every turn; the context leaves them out
    assert dropped == session.stats.dropped_turns > turns / 2
    assert reused > turns / 3
    assert all(held + len(fed) <= CONTEXT for held, fed in scripted.forwards)
    # After all the drops and rollbacks the cache is what a full prefill of its tokens gives.
    probe = 42
    cached = model(mx.array([[probe]]), cache=copy.deepcopy(session.cache))[0, -1]
    np.testing.assert_allclose(np.array(cached), full_logits(model, session.cache_tokens + [probe])[-1],
                               atol=1e-4, rtol=1e-4)


def test_earlier_reasoning_is_left_out_before_turns(gen):
    model, tokenizer, _ = gen
    scripted = Scripted(model, tokenizer, numbers=30)  # 60 reasoning tokens a reply, a 2-token answer
    session = ChatSession(scripted, tokenizer, temperature=0.0)
    for turn in range(4):
        held = session.cache_tokens
        prompt = session.prompt_ids("go on")
        collect(session, "go on")
        if len(held) + 20 > CONTEXT / 2:
            break
    # The fourth turn would pass half the context: the earlier turns lose their reasoning, and nothing else.
    assert turn == 3 and session.last_dropped_reasoning and session.last_dropped_turns == 0
    assert THINK not in prompt and tokenizer.decode(prompt).count("go on") == 4
    assert ChatUI(session).left_out_line() == "context 512 tokens: left out earlier reasoning (still in /save)"
    # The cache is reused up to the first turn whose rendering changed (its answer, after its reasoning went).
    assert 0 < session.stats.reused_tokens < len(prompt)
    assert session.cache_tokens[: len(prompt)] == prompt


def test_turn_view_marks_chunks_and_keeps_speed_and_context_in_view():
    from rich.console import Console

    from zaya_mlx.chat_session import ChatResponse
    from zaya_mlx.tui import TurnView

    def response(text, n, chunk, channel="reasoning", note=None):
        return ChatResponse(text=text, token=1, channel=channel, prompt_tokens=5, prompt_tps=1.0, generation_tokens=n,
                            generation_tps=25.0, peak_memory_gb=0.0, chunk=chunk, context_tokens=100 + n, note=note)

    def screen(view):
        console = Console(width=100, record=True, color_system=None)
        console.print(view)
        return "\n".join(line.rstrip() for line in console.export_text().splitlines())

    view = TurnView(context_limit=CONTEXT)
    view.add(response("abc", 3, 1))
    assert screen(view).splitlines()[:2] == ["thinking… · 3 tokens @ 25.0 tok/s · context 103/512", "  abc"]
    view.add(response("def", 4, 2))
    lines = screen(view).splitlines()
    assert lines[0] == "thinking… · chunk 2 · 4 tokens @ 25.0 tok/s · context 104/512"
    assert [line.strip() for line in lines[1:4]] == ["abc", "⋯ chunk 2: a fresh context with the reasoning's tail ⋯",
                                                    "def"]
    view.add(response("OK", 5, 2, channel="answer", note=THINK_BUDGET_NOTE))
    lines = screen(view).splitlines()
    assert lines[0].startswith("▸ thought for 4 tokens in 2 chunks, ")
    assert lines[1].startswith("think budget reached at 4 tokens: the think block was closed")
    assert lines[-1].strip() == "OK"
