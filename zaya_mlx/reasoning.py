"""Tell reasoning from answer in a stream of generated text.

ZAYA1 thinks inside `<think>...</think>` before it answers (vLLM serves it with the qwen3 reasoning parser).
The splitter works on text, not token ids, so it is right however the detokenizer cuts the stream: a tag
split over two pieces is held back until it is complete (or provably is not a tag).

Qwen3-style templates may already put `<think>` in the prompt (generation then starts inside the block), or
close an empty block there (`enable_thinking=False`: generation starts in the answer); `starts_in_reasoning`
reads that from the prompt's tokens. A block still open when generation stops stays reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

REASONING = "reasoning"
ANSWER = "answer"

THINK_START = "<think>"
THINK_END = "</think>"


def starts_in_reasoning(
    prompt_tokens: Sequence[int],
    think_start_id: Optional[int],
    think_end_id: Optional[int],
    turn_start_id: Optional[int] = None,
) -> bool:
    """True when the prompt leaves a think block open, so generation starts inside it.

    Only the last turn counts (the tokens after the last `turn_start_id`, e.g. `<|im_start|>`), so an
    unclosed block in an earlier turn of the history does not leak into this one.
    """
    if think_start_id is None:
        return False
    tokens = list(prompt_tokens)
    if turn_start_id is not None and turn_start_id in tokens:
        last_turn = len(tokens) - 1 - tokens[::-1].index(turn_start_id)
        tokens = tokens[last_turn + 1 :]
    last_open = max((i for i, t in enumerate(tokens) if t == think_start_id), default=-1)
    last_close = max((i for i, t in enumerate(tokens) if t == think_end_id), default=-1)
    return last_open > last_close


def partial_suffix(text: str, tags: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (0 if none)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


@dataclass
class ReasoningSplitter:
    """Feed generated text pieces; get `(channel, text)` pieces back, the tags themselves dropped.

    `feed(text)` returns the pieces that are certain so far; `flush()` returns what was held back (a trailing
    partial tag that never completed is text). `reasoning` and `answer` accumulate everything emitted.
    """

    in_reasoning: bool = False
    think_start: str = THINK_START
    think_end: str = THINK_END
    reasoning: str = ""
    answer: str = ""
    _pending: str = field(default="", repr=False)

    @property
    def channel(self) -> str:
        return REASONING if self.in_reasoning else ANSWER

    def _emit(self, out: list, text: str) -> None:
        if not text:
            return
        if self.in_reasoning:
            self.reasoning += text
        else:
            self.answer += text
        if out and out[-1][0] == self.channel:
            out[-1] = (self.channel, out[-1][1] + text)
        else:
            out.append((self.channel, text))

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self._pending + text
        self._pending = ""
        while buf:
            tag = self.think_end if self.in_reasoning else self.think_start
            # A stray opening tag inside reasoning (or closing tag in the answer) is plain text.
            i = buf.find(tag)
            if i < 0:
                hold = partial_suffix(buf, (tag,))
                self._emit(out, buf[: len(buf) - hold])
                self._pending = buf[len(buf) - hold :]
                break
            self._emit(out, buf[:i])
            self.in_reasoning = not self.in_reasoning
            buf = buf[i + len(tag) :]
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, self._pending)
        self._pending = ""
        return out


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[str, str]:
    """`(reasoning, answer)` of a whole generated text (a block left open is all reasoning)."""
    s = ReasoningSplitter(in_reasoning=starts_in_reasoning)
    s.feed(text)
    s.flush()
    return s.reasoning, s.answer
