"""The checkpoint's tokenizer, as mlx-lm's `TokenizerWrapper` (streaming detokenizer, think tokens, EOS set).

`load_tokenizer(folder)` reads `tokenizer.json` / `tokenizer_config.json` (and `chat_template.jinja`, which
transformers picks up itself) through mlx-lm's loader. EOS ids are the checkpoint's: config.json's and
generation_config.json's `eos_token_id` (int or list), the tokenizer's eos token, and `<|im_end|>` when the
vocabulary has it (ZAYA's end of turn; the transformers config already names it, the legacy one may not).

A folder without tokenizer files loads as `NoTokenizer(folder)`: falsy, and any use of it raises one
ZayaError that says which folder lacks a tokenizer, so model-only work (token ids in, token ids out) still runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import ZayaError
from .files import model_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Kinds of file the tokenizer loaders (mlx-lm's, transformers') may open in a model folder.
TOKENIZER_SUFFIXES = (".json", ".model", ".jinja", ".txt", ".tiktoken")
END_OF_TURN = "<|im_end|>"
TURN_START = "<|im_start|>"


class NoTokenizer:
    """Stands in for the tokenizer of a checkpoint that ships none; any use is a clear error."""

    def __init__(self, folder):
        object.__setattr__(self, "folder", str(folder))

    def __bool__(self) -> bool:
        return False

    def error(self) -> ZayaError:
        return ZayaError(
            f"{self.folder} has no tokenizer (no tokenizer.json or tokenizer.model); text in or out needs one: "
            "copy the tokenizer files of Zyphra/ZAYA1-8B into it, or pass token ids"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise self.error()

    def __repr__(self) -> str:
        return f"NoTokenizer({self.folder!r})"


def require_tokenizer(tokenizer):
    """The tokenizer itself, or the one-line ZayaError that says there is none."""
    if isinstance(tokenizer, NoTokenizer):
        raise tokenizer.error()
    if tokenizer is None:
        raise ZayaError("this needs a tokenizer, and none was given (load the model with zaya_mlx.load)")
    return tokenizer


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def checkpoint_eos_ids(folder) -> list[int]:
    """EOS ids named by config.json and generation_config.json (in that order, no duplicates)."""
    folder = Path(folder)
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.exists():
            try:
                ids += _ids(json.loads(path.read_text()).get("eos_token_id"))
            except (json.JSONDecodeError, TypeError, ValueError):
                pass
    return list(dict.fromkeys(ids))


def has_tokenizer(folder) -> bool:
    folder = Path(folder)
    return any((folder / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(folder, eos_token_ids: Optional[Iterable[int]] = None):
    """mlx-lm's TokenizerWrapper for a checkpoint folder, or `NoTokenizer(folder)` when it has none."""
    from mlx_lm.tokenizer_utils import load as _mlx_lm_load_tokenizer

    folder = Path(folder)
    if not has_tokenizer(folder):
        return NoTokenizer(folder)
    for f in folder.iterdir():  # what the tokenizer loaders may open: regular files inside the folder only
        if f.suffix in TOKENIZER_SUFFIXES:
            model_file(folder, f.name)
    eos = checkpoint_eos_ids(folder) if eos_token_ids is None else _ids(list(eos_token_ids))
    try:
        tokenizer = _mlx_lm_load_tokenizer(folder, eos_token_ids=eos)
    except Exception as e:  # a broken tokenizer file is a user error, not a traceback
        raise ZayaError(f"cannot read the tokenizer in {folder}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    end_of_turn = tokenizer.get_vocab().get(END_OF_TURN)
    if end_of_turn is not None:
        tokenizer.add_eos_token(end_of_turn)
    return tokenizer


def turn_start_id(tokenizer) -> Optional[int]:
    """The id of `<|im_start|>`, if the vocabulary has it."""
    return tokenizer.get_vocab().get(TURN_START)


def render_chat(tokenizer, messages: list[dict], *, enable_thinking: bool = True, add_generation_prompt: bool = True,
                tools: Optional[list] = None) -> str:
    """The chat template's text for `messages` (what `apply_chat_template` tokenizes)."""
    tokenizer = require_tokenizer(tokenizer)
    if not getattr(tokenizer, "has_chat_template", False):
        raise ZayaError("the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json); "
                        "pass raw text or token ids instead")
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             enable_thinking=enable_thinking, **kwargs)
    except Exception as e:  # jinja errors (raise_exception in the template, bad roles) as one line
        raise ZayaError(f"the chat template rejected the messages: {str(e).splitlines()[0] if str(e) else e!r}") from e


def apply_chat_template(tokenizer, messages: list[dict], *, enable_thinking: bool = True,
                        add_generation_prompt: bool = True, tools: Optional[list] = None) -> list[int]:
    """Token ids of the rendered conversation. The template writes any BOS itself, so none is added."""
    text = render_chat(tokenizer, messages, enable_thinking=enable_thinking,
                       add_generation_prompt=add_generation_prompt, tools=tools)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Raw text (no template) to ids, as mlx-lm does: the tokenizer's special tokens unless it starts with BOS."""
    tokenizer = require_tokenizer(tokenizer)
    bos = tokenizer.bos_token
    add_special = bos is None or not prompt.startswith(bos)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special))
