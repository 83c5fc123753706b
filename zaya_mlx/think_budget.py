"""How much a chat turn may reason, and what happens when its reasoning reaches the limit.

- "chunked" (the default): the reasoning goes on in a fresh context every `chunk` tokens. The new context holds
  the conversation, the opening think tag and the last `tail` tokens of the reasoning, and the model continues
  the think block from there; so no context ever holds more than the conversation plus `chunk` reasoning tokens
  plus the answer, however long the reasoning. After `total` reasoning tokens the think block is closed for
  the model and it answers (as "force" does). docs/long-reasoning.md says why the continuation is a plain one.
- "force" (budget forcing): one context; after `total` reasoning tokens, or when the context has no more room
  for reasoning, the think block is closed for the model and it answers.
- "off": the reasoning runs until the model closes it, max_tokens, or the end of the context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import ZayaError

MODES = ("chunked", "force", "off")


@dataclass(frozen=True)
class ThinkBudget:
    """`mode` ("chunked", "force", "off"); `total` reasoning tokens a turn may take in all; `chunk` reasoning
    tokens one context holds and `tail` (tau) of them carried into the next context (chunked mode)."""

    mode: str = "chunked"
    total: int = 65536
    chunk: int = 8192
    tail: int = 4096

    def __post_init__(self):
        if self.mode not in MODES:
            raise ZayaError(f"think budget mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.total < 1:
            raise ZayaError(f"think budget total must be at least 1, got {self.total}")
        if self.chunk < 2 or not 1 <= self.tail < self.chunk:
            raise ZayaError(f"think budget needs 1 <= tail < chunk, got chunk={self.chunk} tail={self.tail}")

    def __str__(self) -> str:
        if self.mode == "off":
            return "off"
        if self.mode == "force":
            return f"{self.total}"
        return f"chunk={self.chunk} tail={self.tail} total={self.total}"

    def describe(self) -> str:
        """One line for a user."""
        if self.mode == "off":
            return "reasoning unbounded (until the answer, max tokens or the end of the context)"
        if self.mode == "force":
            return f"reasoning closed after {self.total} tokens, then the answer"
        return (f"reasoning in chunks of {self.chunk} tokens, each carrying the last {self.tail} into a fresh "
                f"context; closed after {self.total} tokens in all")


def parse_think_budget(spec) -> ThinkBudget:
    """A ThinkBudget from a ThinkBudget, None (the default), or text: `off`; `N` (budget forcing at N reasoning
    tokens); `chunked` and/or `chunk=C tail=T total=N` (chunked, defaults for what is not given); `force N`."""
    if isinstance(spec, ThinkBudget):
        return spec
    if spec is None:
        return ThinkBudget()
    words = str(spec).replace(",", " ").split()
    if not words:
        raise ZayaError("think budget: expected off, N, or chunk=C tail=T total=N")
    mode, fields, bare = None, {}, False
    for word in words:
        key, eq, value = word.partition("=")
        if not eq and word.lower() in MODES:
            mode = word.lower()
            continue
        if not eq:
            key, value, bare = "total", word, True
        if key not in ("total", "chunk", "tail"):
            raise ZayaError(f"think budget: unknown setting {key!r} (total, chunk, tail)")
        try:
            fields[key] = int(value)
        except ValueError:
            raise ZayaError(f"think budget: {key} must be a whole number, got {value!r}") from None
    mode = mode or ("force" if bare else "chunked")
    if mode == "off":
        return ThinkBudget(mode="off")
    budget = replace(ThinkBudget(), mode=mode)
    if "chunk" in fields and "tail" not in fields:
        fields["tail"] = min(budget.tail, fields["chunk"] // 2)
    return replace(budget, **fields)


__all__ = ["MODES", "ThinkBudget", "parse_think_budget"]
