"""ZAYA as an mlx-lm model type: mlx_lm.load / generate on our folders, after `import zaya_mlx`."""

import importlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import zaya_mlx
from generation_fixtures import loaded
from zaya_mlx.generation import generate

PROMPT = [270, 78, 78, 81, 269, 277, 81, 84, 78, 70, 161, 202, 175]
ROOT = Path(__file__).resolve().parents[1]


def test_mlx_lm_models_zaya_is_our_module():
    module = importlib.import_module("mlx_lm.models.zaya")
    from zaya_mlx import model as ours

    assert module.Model is ours.Model and module.ModelArgs is ours.ModelArgs


@pytest.mark.parametrize("layout", ["transformers", "legacy"])
def test_mlx_lm_load_gives_our_logits(tiny_checkpoint, layout):
    import mlx_lm

    folder = tiny_checkpoint("base", layout)
    theirs, tokenizer = mlx_lm.load(str(folder))
    ours = zaya_mlx.load_model(folder, dtype="float32")
    ids = mx.array([PROMPT])
    np.testing.assert_array_equal(np.array(theirs(ids)), np.array(ours(ids)))
    assert 106 in tokenizer.eos_token_ids


def test_mlx_lm_generate_matches_ours(tmp_path_factory):
    import mlx_lm
    from mlx_lm.generate import stream_generate as mlx_lm_stream

    model, tokenizer, folder = loaded(tmp_path_factory.getbasetemp() / "generation")
    theirs, their_tokenizer = mlx_lm.load(str(folder))
    text = "hello the world"
    ours = generate(model, tokenizer, text, max_tokens=12)
    their_tokens = [r.token for r in mlx_lm_stream(theirs, their_tokenizer, text, max_tokens=12)]
    assert their_tokens == ours.tokens
    assert mlx_lm.generate(theirs, their_tokenizer, text, max_tokens=12) == ours.text


def test_mlx_lm_batch_generator_matches_ours(tmp_path_factory):
    import mlx_lm
    from mlx_lm.generate import batch_generate as mlx_lm_batch_generate

    _, _, folder = loaded(tmp_path_factory.getbasetemp() / "generation")
    model, tokenizer = mlx_lm.load(str(folder))
    prompts = [PROMPT, PROMPT[:4], PROMPT[:7]]
    theirs = mlx_lm_batch_generate(model, tokenizer, prompts, max_tokens=6).texts
    ours = zaya_mlx.batch_generate(model, prompts, max_tokens=6)
    assert theirs == [tokenizer.decode(o) for o in ours]
