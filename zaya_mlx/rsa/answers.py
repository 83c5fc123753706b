"""Final answers: extraction from a rollout's text, mathematical equivalence, and the vote over final answers.

Zyphra's recipe answers with the last round's response itself; the vote (`final_vote`, over `rsa_final_n` > 1
final responses) is ours. Two answers are one when `answer_key` maps them to the same key: a rational value
(`\\frac12`, `\\dfrac{1}{2}`, `1/2`, `0.5` are all 1/2) or, for anything else, the LaTeX with its spacing,
sizing commands, `\\text{}` wrappers and a leading `x =` removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

from ..reasoning import THINK_END, THINK_START, split_reasoning

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete `\\boxed{...}` (nested braces balanced) or `\\boxed x`, in order."""
    out = []
    for m in _BOXED.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        out.append(text[i + 1 : j])
                        break
                j += 1
        elif m.group(0).endswith(" ") and i < len(text):  # "\boxed 5": up to whitespace or $
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                out.append(word.group(0))
    return out


def normalize_answer(answer: str) -> str:
    """Display form: whitespace collapsed, outer `$...$`/`\\(...\\)` and a trailing period removed."""
    a = " ".join(answer.split())
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(a) >= len(left) + len(right) and a.startswith(left) and a.endswith(right):
            a = a[len(left) : len(a) - len(right)].strip()
    return a.rstrip(".").strip()


def extract_answer(text: str, *, starts_in_reasoning: bool = False) -> tuple[Optional[str], str]:
    """`(answer, kind)` of one rollout's generated text; kind is "boxed", "text" or "missing".

    1. The last complete `\\boxed{...}` after the reasoning block, else the last one anywhere (a rollout cut off
       mid-reasoning may have boxed a result already).
    2. Else the text after the reasoning block (`</think>`), if any.
    3. Else missing (None): no box, and the reasoning block never closed or nothing followed it.
    A `</think>` before any `<think>` means the prompt opened the block (as if `starts_in_reasoning`).
    """
    close = text.find(THINK_END)
    if close >= 0 and THINK_START not in text[:close]:
        starts_in_reasoning = True
    _, after = split_reasoning(text, starts_in_reasoning=starts_in_reasoning)
    for part in (after, text):
        boxes = [b for b in _boxed_contents(part) if normalize_answer(b)]
        if boxes:
            return normalize_answer(boxes[-1]), "boxed"
    after = normalize_answer(after)
    return (after, "text") if after else (None, "missing")


# --- equivalence --------------------------------------------------------------------------------------------------

_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~")
_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")          # \frac12
_FRAC_HALF = re.compile(r"\\frac(\d)\{")             # \frac1{2}
_FRAC_OTHER = re.compile(r"\\frac\{([^{}]*)\}(\d)")  # \frac{1}2
_LHS = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?=(?!=)")  # x=, a_1=, y_{n}=
_NUMBER = re.compile(r"^[+-]?(\d+(?:\.\d*)?|\.\d+)$")


def _rational(s: str) -> Optional[Fraction]:
    """The exact value of an integer, decimal, `a/b` or `\\frac{a}{b}` (signs allowed), else None."""
    sign = 1
    while s[:1] in ("+", "-"):
        sign, s = (-sign if s[0] == "-" else sign), s[1:]
    m = re.fullmatch(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", s) or re.fullmatch(r"([^/]+)/([^/]+)", s)
    if m:
        num, den = _rational(m.group(1)), _rational(m.group(2))
        if num is None or den is None or den == 0:
            return None
        return sign * num / den
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d*)?", s):  # 1,000 (thousands separators)
        s = s.replace(",", "")
    if _NUMBER.match(s):
        return sign * Fraction(s)
    return None


def answer_key(answer: str) -> str:
    """What the vote compares: a rational value as `a/b`, else the normalized LaTeX (see the module's doc)."""
    s = normalize_answer(answer)
    s = _TEXT.sub(r"\1", s)
    s = _SPACING.sub("", s)
    s = _SIZING.sub("", s)
    s = "".join(s.split())
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\%", "").replace("%", "")
    s = _FRAC.sub(r"\\frac", s)
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF.sub(r"\\frac{\1}{", s)
    s = _FRAC_OTHER.sub(r"\\frac{\1}{\2}", s)
    s = _LHS.sub("", s)
    s = s.rstrip(".")
    value = _rational(s)
    if value is not None:
        return f"{value.numerator}/{value.denominator}"
    return s


def equivalent(a: str, b: str) -> bool:
    return answer_key(a) == answer_key(b)


@dataclass
class Vote:
    """answer: the winner (the form of its first occurrence); counts: each distinct answer -> votes, most first,
    ties in order of first occurrence; winner: the index of the winner's first occurrence (-1 with no answers);
    missing: how many responses gave no answer."""

    answer: Optional[str]
    counts: dict[str, int]
    winner: int
    missing: int


def vote(answers: Sequence[Optional[str]]) -> Vote:
    """Majority vote over answers compared by `answer_key`; a missing answer (None) casts no vote. Ties go to
    the answer that occurs first (lowest index)."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    shown: dict[str, str] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        k = answer_key(a)
        if k not in counts:
            counts[k], first[k], shown[k] = 0, i, a
        counts[k] += 1
    missing = sum(a is None for a in answers)
    if not counts:
        return Vote(None, {}, -1, missing)
    order = sorted(counts, key=lambda k: (-counts[k], first[k]))
    return Vote(shown[order[0]], {shown[k]: counts[k] for k in order}, first[order[0]], missing)
