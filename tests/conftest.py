"""Session fixtures: tiny random checkpoints, written once per session, and their torch references."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test files can `import fixtures` under any import mode

from fixtures import load_reference, write_fixture_model, write_tokenizer  # noqa: E402


@pytest.fixture
def run_zaya(monkeypatch, capsys):
    """Run `zaya ARGS` in process: (exit code, stdout, stderr). The CLI always ends in SystemExit."""
    from zaya_mlx.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["zaya", *map(str, args)])
        with pytest.raises(SystemExit) as done:
            main()
        out = capsys.readouterr()
        return done.value.code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory (variant, layout, dtype, seed, shards) -> folder of a tiny checkpoint with a tokenizer.

    Built on first use and shared by the whole session; tests that damage a checkpoint must copy it first.
    """
    built = {}

    def get(variant="base", layout="transformers", dtype="float32", seed=0, shards=None):
        key = (variant, layout, dtype, seed, shards)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"zaya-{variant}-{layout}-{dtype}-s{seed}")
            write_fixture_model(folder, variant, layout, dtype, seed, with_tokenizer=True, shards=shards)
            built[key] = folder
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    """Factory (variant, seed) -> transformers' ZayaForCausalLM rebuilt from the fp32 transformers-layout folder."""
    refs = {}

    def get(variant="base", seed=0):
        if (variant, seed) not in refs:
            refs[variant, seed] = load_reference(tiny_checkpoint(variant, "transformers", "float32", seed))
        return refs[variant, seed]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint):
    """The base variant in transformers' layout, fp32, with tokenizer: the default checkpoint for other tests."""
    return tiny_checkpoint("base")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A folder holding only the tiny tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    return write_tokenizer(tmp_path_factory.mktemp("zaya-tokenizer"))
