"""`zaya chat` in a real terminal: tmux runs the program, the tests type keys and read the pane.

The models are scripted tiny fixtures (see test_chat_piped.py): one answers `<think>Hm</think>OK` to anything,
one reasons `HHHH...` until stopped. Waits are functional (poll the pane until text appears, with a
deadline); nothing asserts on timing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_chat_piped import (CHAT, END_THINK, IM_END, REPO, THINK, answer_model, chat_env,  # noqa: F401 (fixtures)
                             endless_model, generation_prompt_last_id, scripted_checkpoint, token_ids)

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")

STATUS = re.compile(r"gen \d+ tok @ [\d.]+ tok/s")
_ids = itertools.count()
# Runs the program, then prints its exit status. The shell traps SIGINT (the handler resets to the default in
# the program, which installs its own), so a Ctrl-C that the program handles does not end the shell too.
_WRAPPER = 'trap : INT; "$@"; echo "[exit $?]"'


class Pane:
    """One tmux server (its own socket) running one command in a 120x40 pane that stays after it exits."""

    def __init__(self, args, width: int = 120, height: int = 40, env: dict | None = None):
        self.socket = f"zaya-tui-{os.getpid()}-{next(_ids)}"
        subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-x", str(width), "-y", str(height),
             "-s", "chat", "-c", str(REPO), "sh", "-c", _WRAPPER, "sh", *args,
             ";", "set-option", "-t", "chat", "remain-on-exit", "on"],
            check=True, env=chat_env(**(env or {})), cwd=REPO)

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True).stdout

    def send(self, *keys) -> None:
        self.tmux("send-keys", "-t", "chat", *keys)

    def type(self, text: str) -> None:
        """Type literal text (no key names), then Enter."""
        self.tmux("send-keys", "-t", "chat", "-l", text)
        self.send("Enter")

    def text(self, escapes: bool = False) -> str:
        """The whole pane with its scrollback; wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat", *(["-e"] if escapes else []))

    def wait_for(self, pattern, count: int = 1, timeout: float = 60.0) -> str:
        """Poll the pane until `pattern` (a regex) matches `count` times; the pane text, or fail showing it."""
        rx = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if len(rx.findall(text)) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"pane never showed {rx.pattern!r} x{count}:\n{text}")
            time.sleep(0.1)

    def wait_prompt(self, timeout: float = 60.0) -> None:
        """Wait until the input prompt `> ` is the last thing on the pane (keys sent now go to the prompt)."""
        deadline = time.monotonic() + timeout
        while not re.search(r"(^|\n)>$", self.text().rstrip()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no prompt:\n{self.text()}")
            time.sleep(0.1)

    def exit_status(self, timeout: float = 30.0, resend: str | None = None) -> int:
        """The program's exit status, once it has exited (read from the wrapper's last line: tmux itself does
        not always reap a finished pane process in time). `resend`: a key sent again once if the program is
        still up after a few seconds (a Ctrl-C that lands just before Python's readline waits on input is only
        seen at the next key: a race in CPython's readline loop, not in the program)."""
        deadline = time.monotonic() + timeout
        nudge_at = time.monotonic() + 5.0
        while True:
            found = re.findall(r"^\[exit (\d+)\]$", self.text(), re.M)
            if found:
                return int(found[-1])
            if resend and time.monotonic() > nudge_at:
                self.send(resend)
                resend = None
            if time.monotonic() > deadline:
                raise AssertionError(f"the program did not exit:\n{self.text()}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def pane():
    panes = []

    def start(*args, env: dict | None = None) -> Pane:
        p = Pane([*CHAT, *args], env=env)
        panes.append(p)
        p.wait_for(r"Ctrl-D exits")  # the banner: the model is loaded and the prompt is up
        return p

    yield start
    for p in panes:
        p.close()


def test_turn_commands_multiline_save_and_exit(pane, answer_model, tmp_path):
    p = pane("--model", str(answer_model), "--temp", "0", "--dtype", "float32")

    # A turn: reasoning folded to one dim line, the answer, and the status line with speeds and memory.
    p.type("hello")
    text = p.wait_for(STATUS)
    assert re.search(r"^▸ thought for \d+ tokens", text, re.M), text
    assert re.search(r"^OK\s*$", text, re.M), text
    status = next(line for line in text.splitlines() if STATUS.search(line))
    assert re.search(r"prompt \d+ tok @ [\d.]+ tok/s", status) and re.search(r"context \d+/512", status), status
    assert "KV " in status and "peak " in status, status
    styled = p.text(escapes=True)
    thought = next(line for line in styled.splitlines() if "thought for" in line)
    assert re.search(r"\x1b\[[0-9;]*\b2\b[0-9;]*m", thought.split("thought")[0]), repr(thought)  # dim

    # Slash commands.
    p.type("/nope")
    p.wait_for(r"unknown command /nope; /help lists")
    p.type("/system Be terse.")
    p.wait_for(r"^system prompt set")
    p.type("/stats")
    p.wait_for(r"^KV cache\s+[\d.]+ [KM]?B")
    p.type("/think")
    p.wait_for(r"^reasoning shown in full")
    p.wait_for(r"^  Hm\s*$")  # the last turn's reasoning, now shown

    # A message over two lines (trailing backslash); the reasoning is now shown in full.
    p.type("line one\\")
    p.wait_for(r"^…\s*$")  # the continuation prompt
    p.type("line two")
    text = p.wait_for(STATUS, count=2)
    assert re.search(r"^▾ thought for \d+ tokens", text, re.M), text

    # A file that cannot be written or read is a line, and the conversation goes on.
    p.type(f"/save {tmp_path}")
    p.wait_for(r"^error: cannot write .*: Is a directory")
    p.type(f"/save {tmp_path / 'typo' / 'conv.json'}")  # a mistyped folder is refused, not made
    p.wait_for(r"^error: cannot write .*typo/conv\.json: its folder")  # (the pane wraps the rest)
    assert not (tmp_path / "typo").exists()
    p.type(f"/load {tmp_path / 'none.json'}")
    p.wait_for(r"^cannot read .*: No such file or directory")
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]  # no temporary file left behind

    saved = tmp_path / "conv.json"
    p.type(f"/save {saved}")
    p.wait_for(r"^saved 5 messages to ")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be terse."
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "line one\nline two"]
    assert all(m["content"].endswith("OK") for m in messages if m["role"] == "assistant")

    # /load puts a saved conversation back.
    p.type("/reset")
    p.wait_for(r"^conversation cleared")
    p.type(f"/load {saved}")
    p.wait_for(r"^loaded 5 messages from ")

    # Ctrl-C on an empty prompt asks for a second one (a Ctrl-C that comes just after an answer ended does not end
    # the conversation); a line typed in between starts over; two in a row leave, with status 0.
    p.wait_prompt()
    p.send("C-c")
    p.wait_for(r"^Ctrl-C again to exit")
    p.type("/think")
    p.wait_for(r"^reasoning folded")
    p.wait_prompt()
    p.send("C-c")
    p.wait_for(r"^Ctrl-C again to exit", count=2)
    p.wait_prompt()
    p.send("C-c")
    assert p.exit_status(resend="C-c") == 0


def test_ctrl_c_stops_generation_and_keeps_the_partial_answer(pane, endless_model, tmp_path):
    p = pane("--model", str(endless_model), "--temp", "0", "--max-tokens", "200000")
    p.type("go")
    p.wait_for(r"^thinking…")
    p.wait_for(r"H{40}")  # reasoning streams live
    p.send("C-c")
    text = p.wait_for(r"^interrupted · prompt \d+ tok")
    assert STATUS.search(text), text

    saved = tmp_path / "partial.json"
    p.type(f"/save {saved}")
    p.wait_for(r"^saved 2 messages to ")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "go"
    assert re.fullmatch(r"<think>H{40,}", messages[1]["content"]), messages[1]["content"][:80]

    # The conversation goes on after an interruption; /max caps the next answer.
    p.type("/max 5")
    p.wait_for(r"^max tokens 5")
    p.type("again")
    p.wait_for(r"^stopped at max tokens")

    # Ctrl-D leaves, with status 0.
    p.wait_prompt()
    p.send("C-d")
    assert p.exit_status() == 0


# Reasoning tokens of `alphabet_model`: distinct single characters (a scripted chain visits each token once).
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture(scope="session")
def alphabet_model(tiny_model_dir, tmp_path_factory):
    """Greedy output `<think>abc...789</think>OK<|im_end|>`; each token follows from the one before alone, so a
    reasoning continued from its tail goes on where it was cut."""
    src = Path(tiny_model_dir)
    chain = [generation_prompt_last_id(src), THINK, *(token_ids(src, c)[0] for c in ALPHABET), END_THINK,
             *token_ids(src, "OK"), IM_END]
    return scripted_checkpoint(src, tmp_path_factory.mktemp("scripted") / "alphabet", chain)


def test_long_reasoning_bursts_pastes_and_warnings(pane, alphabet_model, tmp_path):
    p = pane("--model", str(alphabet_model), "--temp", "0", "--dtype", "float32", "--think-budget",
             "chunk=16 tail=6 total=1000", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    # 36 reasoning tokens in contexts of 16: 16, then 10 new after each tail of 6 (the count has <think> too).
    p.type("Count, please.")
    text = p.wait_for(STATUS)
    assert re.search(r"^▸ thought for 37 tokens in 3 chunks", text, re.M), text
    assert re.search(r"^OK\s*$", text, re.M), text
    assert re.search(r"^reasoning in 3 chunks · prompt \d+ tok", text, re.M), text
    p.type("/think")
    text = p.wait_for(r"chunk 3: a fresh context")
    block = text.split("reasoning shown in full\n")[1].split("\n>")[0]
    shown = "".join(line.strip() for line in block.splitlines() if "chunk" not in line)
    assert shown == ALPHABET  # every reasoning token once, in order, across the chunks

    # Two commands typed ahead in one burst: each line is its own input.
    p.send("/think-budget 8", "Enter", "/max 33", "Enter")
    p.wait_for(r"^think budget 8: reasoning closed after 8 tokens")
    p.wait_for(r"^max tokens 33")
    p.type("Again.")  # budget forcing: the think block closed after 8 tokens, then the answer
    text = p.wait_for(STATUS, count=2)
    assert re.search(r"^think budget reached at \d+ tokens: the think block was closed", text, re.M), text

    # A message longer than the tokenizer's limit: transformers warns, the chat refuses it in one line.
    p.type("x " * 600)
    text = p.wait_for(r"^error: the message is \d+ tokens with the system prompt, over the context limit of 512")
    assert "Token indices" not in text and "[transformers]" not in text, text
    p.type("/stats")
    log = tmp_path / "cache" / "zaya-mlx" / "chat.log"
    p.wait_for(rf"^log file\s+{re.escape(str(log))}")
    assert "Token indices sequence length is longer" in log.read_text()

    # A paste (the terminal brackets it) stays one message.
    p.tmux("set-buffer", "-b", "two", "first line\nsecond line")
    p.tmux("paste-buffer", "-p", "-b", "two", "-t", "chat")
    p.send("Enter")
    p.wait_for(STATUS, count=3)
    saved = tmp_path / "conv.json"
    p.type(f"/save {saved}")
    p.wait_for(r"^saved 6 messages to ")
    assert json.loads(saved.read_text())["messages"][4]["content"] == "first line\nsecond line"


def test_the_model_is_prepared_while_the_first_message_is_typed(answer_model, monkeypatch):
    """ChatSession.prepare (on a GPU: the fused step's kernels compiled and checked) runs in a thread from the start:
    it finishes only once typing has begun (so it did not run before the prompt), and the first message is handled
    only after it has finished."""
    import builtins
    import io
    import threading

    import mlx.core as mx
    from rich.console import Console

    from zaya_mlx import load
    from zaya_mlx.chat_session import ChatSession
    from zaya_mlx.tui import ChatUI

    model, tokenizer = load(answer_model, dtype="float32")
    ui = ChatUI(ChatSession(model, tokenizer, temperature=0.0, max_tokens=20),
                console=Console(file=io.StringIO(), width=120))
    typing, prepared, events = threading.Event(), threading.Event(), []

    stream = mx.default_stream(mx.default_device())

    def prepare():
        # in its own thread, but on the main thread's stream (a thread's default stream is its own in MLX)
        events.append(("prepare starts", threading.current_thread() is threading.main_thread(),
                       mx.default_stream(mx.default_device()) == stream))
        assert typing.wait(10), "the prompt never came up while the model was being prepared"
        events.append(("prepared", None))
        prepared.set()

    lines = iter(["hello"])

    def typed(prompt=""):
        typing.set()
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    handle = ui.handle
    monkeypatch.setattr(ui.session, "prepare", prepare)
    monkeypatch.setattr(builtins, "input", typed)
    monkeypatch.setattr(ui, "handle", lambda text: events.append(("handled", prepared.is_set())) or handle(text))
    ui.run()
    assert events == [("prepare starts", False, True), ("prepared", None), ("handled", True)]
    assert ui.session.last_answer == "OK"
