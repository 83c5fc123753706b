"""`zaya generate`: streams with the chat template, reasoning dimmed, a one-line summary; user errors are one
line on stderr and a non-zero exit, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import write_fixture_model
from generation_fixtures import loaded
from zaya_mlx.generation import generate
from zaya_mlx.tokenizer import apply_chat_template

ROOT = Path(__file__).resolve().parents[1]


def zaya(*args, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "zaya_mlx.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return loaded(tmp_path_factory.getbasetemp() / "generation")


def test_generate_streams_the_chat_answer(gen):
    model, tokenizer, folder = gen
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    expected = generate(model, tokenizer, apply_chat_template(tokenizer, messages), max_tokens=6)
    result = zaya("generate", "-m", str(folder), "-p", "hello", "--system", "Be brief.", "-n", "6", "--temp", "0",
                  "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.answer + "\n"
    summary = result.stderr.strip().splitlines()
    assert len(summary) == 1 and "tok/s" in summary[0] and "peak memory" in summary[0] and "6 tokens" in summary[0]


def test_default_max_tokens_fits_the_context(gen):
    """Without -n, generation runs until the context is full (the fixture's 512 tokens), never past it."""
    model, tokenizer, folder = gen
    n_prompt = len(apply_chat_template(tokenizer, [{"role": "user", "content": "hello"}]))
    result = zaya("generate", "-m", str(folder), "-p", "hello", "--temp", "0", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert model.args.max_position_embeddings == 512
    assert f"generation: {512 - n_prompt} tokens" in summary and summary.endswith("| length"), summary


def test_reasoning_is_dimmed(gen, monkeypatch, run_zaya):
    _, _, folder = gen
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    # A raw prompt that ends in <think>: all of the generation is reasoning.
    code, out, err = run_zaya("generate", "-m", str(folder), "-p", "hello <think>", "--raw",
                              "-n", "4", "--temp", "0", "--dtype", "float32")
    assert code in (0, None)
    assert "\x1b[2m" in out  # dim


def test_user_errors_are_one_line(gen, tmp_path, run_zaya):
    _, _, folder = gen
    write_fixture_model(tmp_path / "no-tokenizer", with_tokenizer=False)
    cases = [
        (["-m", str(tmp_path / "missing"), "-p", "hi"], "no model folder"),
        (["-m", str(tmp_path / "no-tokenizer"), "-p", "hi"], "has no tokenizer"),
        (["-m", str(folder), "-p", "hi", "-n", "100000"], "context limit"),
        (["-m", str(folder), "-p", "hi " * 600, "-n", "1"], "over the context limit"),
        (["-m", str(folder), "-p", "hi", "--top-p", "0"], "top-p"),
        (["-m", str(folder), "-p", "hi", "--temp", "nan"], "temperature"),
        (["-m", str(folder), "-p", "hi", "--temp", "inf"], "temperature"),
        (["-m", str(folder), "-p", "  "], "empty"),
    ]
    for args, message in cases:
        code, out, err = run_zaya("generate", *args)
        assert code == 1, (args, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
        assert "Traceback" not in err and out == ""


def test_real_entry_point_errors_and_offline_default(tmp_path):
    write_fixture_model(tmp_path / "no-tokenizer", with_tokenizer=False)
    result = zaya("generate", "-m", str(tmp_path / "no-tokenizer"), "-p", "hi")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "has no tokenizer" in result.stderr
    # The default model with no network and no local copy: one line that says how to get it.
    result = zaya("generate", "-p", "hi", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "Zyphra/ZAYA1-8B" in result.stderr and "download" in result.stderr


def test_a_library_warning_is_one_line_on_the_command_line():
    """The fused-decode check warns (RuntimeWarning) when it falls back; `zaya` shows that as one line."""
    code = ("import warnings\nfrom zaya_mlx import cli\ncli._one_line_warnings()\n"
            "warnings.warn('zaya-mlx: the fused decode kernels failed their check', RuntimeWarning)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stderr == "warning: zaya-mlx: the fused decode kernels failed their check\n"


def test_stdin_that_is_not_utf8_is_one_line(gen):
    """`-p -` with bytes that are not UTF-8: one line naming the byte, exit 1, before the model loads."""
    _, _, folder = gen
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "zaya_mlx.cli", "generate", "-m", str(folder), "-p", "-"],
                            input=b"caf\xe9 au lait\n", capture_output=True, env=env, cwd=ROOT, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b""
    assert err.count("\n") == 1 and "not valid UTF-8" in err and "byte 4" in err, err
