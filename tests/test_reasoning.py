"""The reasoning/answer split on crafted streams, cut at every place, and wired into generation."""

import itertools

import pytest

from generation_fixtures import loaded, scripted_sampler
from zaya_mlx.generation import generate, stream_generate
from zaya_mlx.reasoning import ANSWER, REASONING, ReasoningSplitter, split_reasoning, starts_in_reasoning
from zaya_mlx.tokenizer import apply_chat_template

IM_START, IM_END, THINK, END_THINK = 105, 106, 107, 108


def run(pieces, start=False):
    s = ReasoningSplitter(in_reasoning=start)
    out = []
    for p in pieces:
        out += s.feed(p)
    out += s.flush()
    reasoning = "".join(t for c, t in out if c == REASONING)
    answer = "".join(t for c, t in out if c == ANSWER)
    assert (reasoning, answer) == (s.reasoning, s.answer)
    assert all(t for _, t in out)  # no empty pieces
    return reasoning, answer


def cuts(text, n):
    """Every way to cut `text` into n + 1 pieces."""
    for points in itertools.combinations(range(1, len(text)), n):
        bounds = (0, *points, len(text))
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


CASES = [
    # (stream, generation starts in reasoning, reasoning, answer)
    ("<think>\nweigh it</think>\n\nIt is 4.", False, "\nweigh it", "\n\nIt is 4."),
    ("weigh it</think>It is 4.", True, "weigh it", "It is 4."),  # the template opened <think>
    ("<think>still thinking when it stopped", False, "still thinking when it stopped", ""),
    ("no reasoning at all", False, "", "no reasoning at all"),
    ("<think></think>empty block", False, "", "empty block"),
    ("a < b and </thinking> is not a tag", False, "", "a < b and </thinking> is not a tag"),
    ("<think>x <think> y</think>z", False, "x <think> y", "z"),  # a nested open tag is reasoning text
    ("ends with half a tag <thi", False, "", "ends with half a tag <thi"),
    ("<think>r</think>a<think>r2</think>a2", False, "rr2", "aa2"),
]


@pytest.mark.parametrize("text,start,reasoning,answer", CASES)
def test_split_whole_and_cut_everywhere(text, start, reasoning, answer):
    assert split_reasoning(text, start) == (reasoning, answer)
    for pieces in itertools.chain(cuts(text, 1), cuts(text, 2) if len(text) < 40 else ()):
        assert run(pieces, start) == (reasoning, answer), pieces
    assert run(list(text), start) == (reasoning, answer)  # a character at a time


def test_partial_tag_is_held_back_until_it_resolves():
    s = ReasoningSplitter()
    assert s.feed("x <th") == [(ANSWER, "x ")]
    assert s.feed("ink") == []
    assert s.feed(">y </thi") == [(REASONING, "y ")]
    assert s.channel == REASONING
    assert s.feed("nk>z </th") == [(ANSWER, "z </th")]  # in the answer only an opening tag is held back
    assert s.flush() == []


def test_prompt_opens_reasoning_only_in_its_last_turn():
    turn = [IM_START, 10, 11]
    assert starts_in_reasoning(turn + [THINK, 12], THINK, END_THINK, IM_START)
    assert not starts_in_reasoning(turn + [THINK, 12, END_THINK, 13], THINK, END_THINK, IM_START)  # no-think
    assert not starts_in_reasoning(turn, THINK, END_THINK, IM_START)
    # an earlier turn left a block open (an interrupted answer); the new turn has none
    assert not starts_in_reasoning(turn + [THINK, 12, IM_END] + turn, THINK, END_THINK, IM_START)
    assert not starts_in_reasoning(turn + [THINK], None, None, IM_START)


def test_generation_streams_channels(tmp_path_factory):
    model, tokenizer, _ = loaded(tmp_path_factory.getbasetemp() / "generation")
    script = [THINK] + tokenizer.encode("the sum", add_special_tokens=False) + [END_THINK] + \
        tokenizer.encode(" is 4", add_special_tokens=False) + [IM_END]
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "2+2?"}])
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=50, sampler=scripted_sampler(script)))
    reasoning = "".join(r.text for r in responses if r.channel == REASONING)
    answer = "".join(r.text for r in responses if r.channel == ANSWER)
    assert (reasoning, answer) == ("the sum", " is 4")
    assert responses[-1].finish_reason == "stop" and responses[-1].token == IM_END
    assert all("think>" not in r.text for r in responses)
    result = generate(model, tokenizer, prompt, max_tokens=50, sampler=scripted_sampler(script))
    assert (result.reasoning, result.answer, result.text) == ("the sum", " is 4", "<think>the sum</think> is 4")
    assert result.tokens == script

    # The template opened the block (qwen3 convention): generation starts in reasoning; left open at the end.
    opened = prompt + [THINK]
    script = tokenizer.encode("still going", add_special_tokens=False)
    result = generate(model, tokenizer, opened, max_tokens=len(script), sampler=scripted_sampler(script))
    assert (result.reasoning, result.answer, result.finish_reason) == ("still going", "", "length")
    # enable_thinking=False closes an empty block in the prompt: generation starts in the answer.
    closed = apply_chat_template(tokenizer, [{"role": "user", "content": "2+2?"}], enable_thinking=False)
    assert tokenizer.decode(closed).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    result = generate(model, tokenizer, closed, max_tokens=len(script), sampler=scripted_sampler(script))
    assert (result.reasoning, result.answer) == ("", "still going")
