"""What a finished rollout carries into the next round: its candidate text and the tail of it.

Zyphra's proxy sits behind vLLM's `qwen3` reasoning parser, takes a response's `content` (the answer section)
when it is non-empty and its reasoning otherwise, then keeps the text before `</think>` (if any), stripped, and
its last `tail_window_len` whitespace-separated words joined by single spaces (`extract_reasoning_from_response`
and `extract_tail_segment` in Zyphra's `examples/markovian_rsa/rsa_proxy_server.py`). `served_split` is the
parser's rule, `candidate_text` the choice of section (source "served" or "reasoning"), `word_tail` Zyphra's
cut. `token_tail` is ours: the same section as token ids, its last `window` ids, never re-tokenised.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..reasoning import THINK_END, THINK_START


def served_split(text: str) -> tuple[str, Optional[str]]:
    """`(reasoning, content)` as vLLM's qwen3 reasoning parser splits a completion: an opening `<think>` is
    dropped; without `</think>` everything is reasoning (content None); else the text before the first
    `</think>` is reasoning and the rest content (None when empty)."""
    before, tag, after = text.partition(THINK_START)
    output = after if tag else before
    if THINK_END not in output:
        return output, None
    reasoning, _, content = output.partition(THINK_END)
    return reasoning, content or None


def candidate_text(text: str, source: str) -> str:
    """The section of a rollout's text a candidate is cut from. "served": the content when non-empty, else the
    reasoning (Zyphra's `_chat_choice_content`); "reasoning": the completion with its opening `<think>` dropped,
    which `word_tail` then cuts at `</think>`."""
    reasoning, content = served_split(text)
    if source == "served":
        return content if content else reasoning
    before, tag, after = text.partition(THINK_START)
    return after if tag else before


def word_tail(response: str, window: int) -> str:
    """Zyphra's candidate: the text before `</think>` if it has one, else all of it, stripped; then its last
    `window` whitespace words joined by single spaces (an empty cut keeps the stripped text)."""
    reasoning = response or ""
    if THINK_END in reasoning:
        reasoning = reasoning.split(THINK_END)[0].strip()
    else:
        reasoning = reasoning.strip()
    if reasoning and window > 0:
        segment = " ".join(reasoning.split()[-window:]).strip()
        if segment:
            reasoning = segment
    return reasoning


def token_tail(tokens: Sequence[int], window: int, source: str, *, think_start_id: Optional[int],
               think_end_id: Optional[int], has_content) -> list[int]:
    """The last `window` ids of the section `candidate_text` picks, found by the think tags' ids (`tokens`
    without the stop id). `has_content(ids)` says whether an answer section has visible text (the served rule
    takes the reasoning when it has none)."""
    ids = list(tokens)
    if think_start_id is not None and think_start_id in ids:
        start = ids.index(think_start_id)
        if think_end_id is None or think_end_id not in ids[:start]:
            ids = ids[start + 1 :]
    end = ids.index(think_end_id) if think_end_id is not None and think_end_id in ids else -1
    if end < 0:
        section = ids
    elif source == "served" and has_content(ids[end + 1 :]):
        section = ids[end + 1 :]
    else:
        section = ids[:end]
    return section[-window:] if window > 0 else section
