"""ZAYA in mlx-lm: mlx_lm.load / generate on any ZAYA folder after `import zaya_mlx`, and mlx-lm's own commands
(`mlx_lm generate --trust-remote-code`) on the folders `zaya quantize` writes."""

import importlib
import os
import subprocess
import sys
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


# --- mlx-lm's own commands on the folders `zaya quantize` writes -------------------------------------------------

STAND_IN = '''
"""A stand-in for an `mlx_lm/models/zaya.py` that a future mlx-lm release ships (other semantics)."""
class ModelArgs:
    @classmethod
    def from_dict(cls, config):
        raise RuntimeError("the stand-in mlx_lm.models.zaya was used")

class Model:
    pass
'''


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    _, _, folder = loaded(tmp_path_factory.getbasetemp() / "generation")
    out = tmp_path_factory.mktemp("mlx-lm-commands") / "zaya-mxfp4"
    zaya_mlx.quantize(folder, out, "mxfp4")
    return out


def _generated(stdout: str) -> str:
    """The text `mlx_lm.generate` prints between its two `==========` lines."""
    return stdout.split("==========\n")[1].removesuffix("\n")


def _ours(folder) -> str:
    model, tokenizer = zaya_mlx.load(folder, dtype="float32")
    return generate(model, tokenizer, "hello the world", max_tokens=8).text


GENERATE = ["--trust-remote-code", "--ignore-chat-template", "--prompt", "hello the world", "--max-tokens", "8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_mlx_lm_generate_command_runs_quantized_folders(quantized_folder):
    done = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(quantized_folder), *GENERATE],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _generated(done.stdout) == _ours(quantized_folder)


def test_quantized_folders_keep_our_model_when_mlx_lm_ships_a_zaya_module(quantized_folder, tiny_checkpoint,
                                                                            tmp_path):
    (tmp_path / "zaya.py").write_text(STAND_IN)
    script = f"""
import sys
import mlx_lm, mlx_lm.generate, mlx_lm.models
mlx_lm.models.__path__.insert(0, {str(tmp_path)!r})  # mlx_lm.models.zaya is now the stand-in
try:
    mlx_lm.load({str(tiny_checkpoint("base"))!r})  # a folder without model_file gets the stand-in
except RuntimeError as e:
    print("control:", e)
sys.argv = ["mlx_lm.generate", "--model", {str(quantized_folder)!r}, *{GENERATE!r}]
sys.modules["mlx_lm.generate"].main()  # the package's `generate` attribute is the function
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("control: the stand-in mlx_lm.models.zaya was used\n")
    assert _generated(done.stdout) == _ours(quantized_folder)
