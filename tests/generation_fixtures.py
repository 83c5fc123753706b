"""Helpers for the generation tests: a fixture model whose greedy output varies, and scripted samplers.

The shared tiny fixture ties its embeddings and its residual stream is dominated by the input embedding, so
its greedy continuation is the last token repeated: a cache bug would not change a single token. `varied`
copies a fixture folder with an untied random `lm_head` and a smaller input scale (weights only; the model
code is the same), whose greedy continuations wander through the vocabulary and depend on the context.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file

from fixtures import write_fixture_model

_FOLDERS: dict = {}
_LOADED: dict = {}


def varied_folder(root: Path, variant: str = "base", seed: int = 0) -> Path:
    """A fixture checkpoint (transformers layout, fp32, with tokenizer) with varied greedy output; cached."""
    key = (variant, seed)
    if key not in _FOLDERS:
        plain = Path(root) / f"plain-{variant}-{seed}"
        write_fixture_model(plain, variant=variant, seed=seed)
        dst = Path(root) / f"varied-{variant}-{seed}"
        shutil.copytree(plain, dst)
        config = json.loads((dst / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        shard = index["weight_map"]["model.embed_tokens.weight"]
        tensors = load_file(str(dst / shard))
        rng = np.random.default_rng(seed + 1000)
        vocab, hidden = tensors["model.embed_tokens.weight"].shape
        tensors["lm_head.weight"] = (rng.standard_normal((vocab, hidden)) * 3 / np.sqrt(hidden)).astype(np.float32)
        scale_shard = index["weight_map"]["model.input_hidden_states_scale"]
        assert scale_shard == shard
        tensors["model.input_hidden_states_scale"] = tensors["model.input_hidden_states_scale"] * 0.1
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
        index["weight_map"]["lm_head.weight"] = shard
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _FOLDERS[key] = dst
    return _FOLDERS[key]


def loaded(root: Path, variant: str = "base", seed: int = 0):
    """(model, tokenizer, folder) of `varied_folder`, loaded once (fp32)."""
    from zaya_mlx.generation import load

    key = (variant, seed)
    if key not in _LOADED:
        folder = varied_folder(root, variant, seed)
        model, tokenizer = load(folder, dtype="float32")
        _LOADED[key] = (model, tokenizer, folder)
    return _LOADED[key]


def scripted_sampler(token_ids):
    """A sampler that ignores the model and emits `token_ids` in order (then repeats the last one)."""
    ids = list(token_ids)
    state = {"i": 0}

    def sampler(logprobs):
        i = min(state["i"], len(ids) - 1)
        state["i"] += 1
        return mx.array([ids[i]] * logprobs.shape[0], dtype=mx.int32)

    return sampler


def full_logits(model, ids) -> np.ndarray:
    """fp32 logits [L, V] of one whole sequence, no cache."""
    return np.array(model(mx.array([list(ids)], dtype=mx.int32))[0])
