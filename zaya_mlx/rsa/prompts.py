"""Prompts of a Markovian RSA run, as token ids.

Round 0 is the request's messages (the whole conversation) under the chat template. Every later prompt is one
user message, Zyphra's aggregation text (`zaya_mlx/templates/rsa_aggregate.jinja` for K > 1 candidates,
`rsa_refine.jinja` for one: the model's trained input format, like a chat template) around the question and
the candidates, rendered with the chat template and tokenized whole, as vLLM does. Token tails are spliced in
as ids between the tokenized pieces of the text around them instead.

The question is the first user message's content cut before its first "Let's think". Zyphra's proxy takes
the first message whatever its role, which with a system prompt first is the system text; we take the first
user message, the same thing whenever the conversation starts with the user.
"""

from __future__ import annotations

from importlib import resources
from typing import Sequence

from ..errors import ZayaError

_SENTINEL = "\u27e6RSA-CANDIDATE-{}\u27e7"  # never produced by the template or a chat template


def load_template(name: str) -> str:
    return (resources.files("zaya_mlx.templates") / f"rsa_{name}.jinja").read_text(encoding="utf-8")


def message_text(content) -> str:
    """A message's content as text: a string, or the text parts of a list joined with newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if isinstance(item, dict):
                if item.get("type") == "text" or "text" in item:
                    parts.append(str(item.get("text", "")))
            else:
                parts.append(str(item))
        return "\n".join(p for p in parts if p)
    return "" if content is None else str(content)


def question_of(messages: Sequence[dict]) -> str:
    """The first user message's text up to its first "Let's think" (not stripped: the template's caller does)."""
    for m in messages:
        if m.get("role", "user") == "user":
            return message_text(m.get("content")).split("Let's think")[0]
    raise ZayaError("RSA needs a user message: the messages have none")


def aggregation_text(question: str, candidates: Sequence[str]) -> str:
    """Zyphra's aggregation prompt for these candidates (each stripped, as Zyphra's code does)."""
    import jinja2

    name = "refine" if len(candidates) == 1 else "aggregate"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    return env.from_string(load_template(name)).render(question=question.strip(),
                                                       candidates=[(c or "").strip() for c in candidates])


def as_messages(messages_or_problem) -> list[dict]:
    """A problem string becomes one user message; a list of messages is copied."""
    if isinstance(messages_or_problem, str):
        if not messages_or_problem.strip():
            raise ZayaError("the RSA problem is empty")
        return [{"role": "user", "content": messages_or_problem}]
    messages = [dict(m) for m in messages_or_problem]
    if not messages:
        raise ZayaError("RSA needs a non-empty messages list")
    return messages


class PromptBuilder:
    """Token ids of a run's prompts. `round0`: the messages; `build_words(texts)` / `build_tokens(ids)`: an
    aggregation prompt; `head`: the ids every aggregation prompt starts with (its chat header, the instructions
    and the question), prefilled once and shared; `fixed_tokens`: an aggregation prompt's ids besides its
    candidates (for the context bound)."""

    def __init__(self, tokenizer, messages: Sequence[dict], candidates: int, *, enable_thinking: bool = True):
        from ..tokenizer import apply_chat_template, require_tokenizer

        self.tokenizer = require_tokenizer(tokenizer)
        self.messages = list(messages)
        self.enable_thinking = enable_thinking
        self.question = question_of(self.messages)
        self.candidates = candidates
        self.round0 = apply_chat_template(self.tokenizer, self.messages, enable_thinking=enable_thinking)
        marks = [_SENTINEL.format(i) for i in range(candidates)]
        text = self._render(aggregation_text(self.question, marks))
        parts, rest = [], text
        for m in marks:
            before, sep, rest = rest.partition(m)
            if not sep:
                raise ZayaError("the chat template dropped or reordered the RSA candidates")
            parts.append(before)
        parts.append(rest)
        self.pieces = [self._encode(p) for p in parts]
        self.fixed_tokens = sum(len(p) for p in self.pieces)
        # The head stops a few ids short of the first candidate: the whole-text tokenization of a word prompt may
        # merge the last characters before a candidate with its first ones.
        self.head = self.pieces[0][: max(0, len(self.pieces[0]) - 4)]

    def _render(self, content: str) -> str:
        from ..tokenizer import render_chat

        return render_chat(self.tokenizer, [{"role": "user", "content": content}],
                           enable_thinking=self.enable_thinking)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, candidates: Sequence[str]) -> str:
        """The aggregation prompt's user message for these candidate texts."""
        return aggregation_text(self.question, candidates)

    def build_words(self, candidates: Sequence[str]) -> list[int]:
        """Zyphra's prompt: the whole rendered text tokenized at once."""
        return self._encode(self._render(self.text(candidates)))

    def build_tokens(self, candidates: Sequence[Sequence[int]]) -> list[int]:
        """The prompt with each candidate's ids spliced in where its text would be."""
        if len(candidates) != self.candidates:
            raise ValueError(f"expected {self.candidates} candidates, got {len(candidates)}")
        ids = list(self.pieces[0])
        for cand, piece in zip(candidates, self.pieces[1:]):
            ids += list(cand)
            ids += piece
        return ids
