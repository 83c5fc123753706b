"""`zaya chat` with stdin not a terminal: one prompt per line, answers printed plainly, exit 0 at EOF.

Also home of `scripted_checkpoint`, which the terminal-UI tests share: a tiny fixture whose greedy output is a
script of token ids, so a turn has known reasoning and a known answer. Only weights change (the product has
no test hooks): every layer's output projection is zeroed and the residual scales made identity, so the final
hidden state is the current token's embedding; the chain's tokens get embeddings in a few private channels,
x_i = r_i (u_i + u_{i+1}) with r_{i+1} > 2 r_i, so the tied logits <norm(x_cur), x_v> are largest for the
next token in the chain (and exactly 0 for every other token). The last token of the chain repeats forever.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHAT = [sys.executable, "-m", "zaya_mlx.cli", "chat"]

THINK, END_THINK, IM_END = 107, 108, 106


def chat_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def token_ids(folder: Path, text: str) -> list:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def generation_prompt_last_id(folder: Path) -> int:
    """The last token of a rendered chat prompt (the end of `<|im_start|>assistant\\n`)."""
    from zaya_mlx.tokenizer import apply_chat_template, load_tokenizer

    ids = apply_chat_template(load_tokenizer(folder), [{"role": "user", "content": "hi"}], enable_thinking=True)
    return ids[-1]


def scripted_checkpoint(src: Path, dst: Path, chain: list, context: int | None = None) -> Path:
    """Copy the fixture folder `src` to `dst` with weights that make greedy decoding follow `chain`
    (chain[0] is the prompt's last token). `context` raises max_position_embeddings (for long generations)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    assert len(set(chain)) == len(chain), "a chain token may appear once"
    shutil.copytree(src, dst)
    tensors = {}
    for f in sorted(dst.glob("model*.safetensors")):
        tensors.update(load_file(str(f)))
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    for name, v in tensors.items():
        if name.endswith("o_proj.weight") or name.endswith("experts.down_proj"):
            tensors[name] = np.zeros_like(v)  # layers add nothing to the residual stream
        elif "residual_scale." in name or name.startswith("model.input_hidden_states_"):
            tensors[name] = np.ones_like(v) if name.endswith("scale") else np.zeros_like(v)
        elif name == "model.norm.weight":
            tensors[name] = np.ones_like(v)
    embed = tensors["model.embed_tokens.weight"].copy()
    embed[:, : len(chain) + 1] = 0
    for i, tok in enumerate(chain):
        embed[tok] = 0
        embed[tok, i] = embed[tok, i + 1] = 0.02 * 2.5**i
    tensors["model.embed_tokens.weight"] = embed
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if context:
        config = json.loads((dst / "config.json").read_text())
        config["max_position_embeddings"] = context
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="session")
def answer_model(tiny_model_dir, tmp_path_factory) -> Path:
    """Greedy output `<think>Hm</think>OK<|im_end|>` for any prompt; checked through the Python API."""
    from zaya_mlx import load
    from zaya_mlx.chat_session import ChatSession

    src = Path(tiny_model_dir)
    chain = [generation_prompt_last_id(src), THINK, *token_ids(src, "Hm"), END_THINK, *token_ids(src, "OK"), IM_END]
    folder = scripted_checkpoint(src, tmp_path_factory.mktemp("scripted") / "answer", chain)
    model, tokenizer = load(folder, dtype="float32")
    session = ChatSession(model, tokenizer, temperature=0.0, max_tokens=20)
    assert session.ask("hello") == "OK" and session.last_reasoning == "Hm", "the scripted fixture does not follow its script"
    return folder


@pytest.fixture(scope="session")
def endless_model(tiny_model_dir, tmp_path_factory) -> Path:
    """Greedy output `<think>HHHH...` without end (a long context), to interrupt mid-generation."""
    src = Path(tiny_model_dir)
    chain = [generation_prompt_last_id(src), THINK, *token_ids(src, "H")]
    return scripted_checkpoint(src, tmp_path_factory.mktemp("scripted") / "endless", chain, context=1 << 20)


def run_chat(args, stdin: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(CHAT + args, input=stdin, capture_output=True, text=True, timeout=timeout, env=chat_env(),
                          cwd=REPO)


def test_piped_two_prompts_two_answers(answer_model):
    out = run_chat(["--model", str(answer_model), "--temp", "0", "--dtype", "float32"], "hello\n\nand again\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "OK\nOK\n"  # blank lines are skipped; no reasoning, no colors, no status
    assert "\x1b" not in out.stdout


def test_piped_show_reasoning(answer_model):
    out = run_chat(["--model", str(answer_model), "--temp", "0", "--show-reasoning"], "hello\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "<think>\nHm\n</think>\nOK\n"


def test_piped_line_that_is_not_utf8(answer_model):
    """A line of bytes that are not UTF-8: one error line naming it, the lines after it still answered, exit 1."""
    out = subprocess.run(CHAT + ["--model", str(answer_model), "--temp", "0", "--dtype", "float32"],
                         input=b"hello\n\xff\xfe oops\nand again\n", capture_output=True, timeout=60, env=chat_env(),
                         cwd=REPO)
    assert out.stdout.decode() == "OK\nOK\n"
    lines = out.stderr.decode().strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: line 2 of stdin is not valid UTF-8"), lines


def test_piped_bad_model_is_one_line(tmp_path):
    out = run_chat(["--model", str(tmp_path / "nowhere")], "hello\n", timeout=30)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_piped_missing_hub_model_says_how_to_get_it(tmp_path):
    out = subprocess.run(CHAT + ["--model", "zaya-test-nobody/no-such-model"], input="hello\n", capture_output=True,
                         text=True, timeout=30, cwd=REPO,
                         env=chat_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub")))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download" in lines[0], out.stderr
