"""`zaya chat`: the rich terminal UI over `ChatSession`.

Thin by design: `zaya_mlx.chat_session.ChatSession` holds the conversation, the KV cache reused across turns,
the sampling settings and the statistics; this module reads input, renders the stream and parses slash
commands. Everything the UI does is one `ChatSession` call.

- A turn: the reasoning streams live in a dim block under a line with its chunk, tokens, tokens/s and the
  context in use; each new reasoning chunk (a fresh context carrying the reasoning's tail) gets a mark. It
  folds to one line ("thought for N tokens in K chunks") when the answer starts (`/think` keeps it unfolded),
  the answer streams as Markdown (code highlighted), and a status line follows: why it stopped (if not at the
  end of the answer), prompt and generation tokens/s, tokens in the context out of the limit, KV cache size,
  peak memory. Ctrl-C stops the generation between two tokens; the session keeps the partial answer. When
  the session leaves old turns out of the context, one dim line says so.
- Input: `> ` prompt with readline editing and history; each line typed is its own input (a burst of lines
  typed ahead runs line by line), a trailing backslash continues the message on the next line, and a paste
  (bracketed, as terminals send it) arrives as one message. Ctrl-C twice on an empty prompt, or Ctrl-D, exits.
  While the first message is typed, a thread makes the model's first call (`ChatSession.prepare`: on a GPU the
  fused step's kernels compile and run their check), and the first message waits for it to end.
- Library warnings and anything else written to stderr go to a log file while the UI runs (`/stats` names
  it), never onto the screen.
- Piped stdin (`run_piped`): one prompt per line, answers printed plainly, one per prompt.

Extending: commands live in `COMMANDS` (name -> `Command`);
`register_command` adds or replaces one, and each `ChatUI` copies the table at start. A UI answers a prompt
with `ui.prompt_handler(text)` (default `ui.stream_turn`); `/rsa on` can swap in a handler that runs
`zaya_mlx.rsa.run` and renders its own progress, `/rsa off` puts `ui.stream_turn` back. The `/rsa` entry
below is the slot for it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.padding import Padding
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from .errors import ZayaError
from .files import write_text_atomic
from .sizes import format_bytes
from .think_budget import parse_think_budget

REASONING = "reasoning"
CODE_THEME = "monokai"


# --- small formatters --------------------------------------------------------------------------------------------


def _stat(stats, *names, default=None):
    """A field of `session.stats`, whether it is an object or a mapping."""
    for name in names:
        value = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
        if value is not None:
            return value
    return default


STOP_REASONS = {
    "length": "stopped at max tokens (/max N)",
    "context": "stopped: the context is full",
    "stop_string": "stopped at a stop string",
}


def status_line(last, stats, interrupted: bool = False) -> Text:
    """One dim line after a turn: why it stopped (unless at the end of the answer), prompt and generation
    tokens/s, reasoning chunks, context used, KV cache size, peak memory."""
    parts = []
    if interrupted:
        parts.append("interrupted")
    elif last is not None and last.finish_reason in STOP_REASONS:
        parts.append(STOP_REASONS[last.finish_reason])
    chunks = _stat(stats, "reasoning_chunks", default=0)
    if chunks > 1:
        parts.append(f"reasoning in {chunks} chunks")
    if last is not None:
        parts.append(f"prompt {last.prompt_tokens} tok @ {last.prompt_tps:.1f} tok/s")
        parts.append(f"gen {last.generation_tokens} tok @ {last.generation_tps:.1f} tok/s")
    used = _stat(stats, "context_tokens", "tokens_in_context")
    limit = _stat(stats, "context_limit")
    if used is not None:
        parts.append(f"context {used}/{limit}" if limit else f"context {used}")
    kv = _stat(stats, "kv_cache_bytes", "cache_bytes")
    if kv is not None:
        parts.append(f"KV {format_bytes(kv)}")
    peak = last.peak_memory_gb if last is not None else _stat(stats, "peak_memory_gb")
    if peak is not None:
        parts.append(f"peak {format_bytes(peak * 1e9)}")
    return Text(" · ".join(parts), style="dim")


# --- rendering a turn --------------------------------------------------------------------------------------------


class TurnView:
    """What one turn shows: a reasoning block (live, or folded to one line) and the answer as Markdown."""

    def __init__(self, show_reasoning: bool = False, context_limit: Optional[int] = None):
        self.show_reasoning = show_reasoning
        self.context_limit = context_limit
        self.reasoning = ""
        self.answer = ""
        self.reasoning_tokens = 0
        self.chunk = 1
        self.budget_reached_at: Optional[int] = None  # reasoning tokens when the think budget closed the block
        self.last = None  # the latest response (tokens/s, context in use)
        self.answer_started = False
        self.started = time.perf_counter()
        self.reasoning_seconds: Optional[float] = None
        self.live_chars: Optional[int] = None  # while live, draw only the end of a long reasoning block
        self.done = False  # the stream has ended

    def add(self, r) -> None:
        self.last = r
        if getattr(r, "note", None) == "think_budget":
            self.budget_reached_at = self.reasoning_tokens
        if r.channel == REASONING:
            chunk = getattr(r, "chunk", 1)
            if chunk != self.chunk:
                self.chunk = chunk
                self.reasoning += f"\n⋯ chunk {chunk}: a fresh context with the reasoning's tail ⋯\n"
            self.reasoning += r.text
            self.reasoning_tokens = r.generation_tokens
        else:
            if not self.answer_started:
                self.answer_started = True
                self.reasoning_seconds = time.perf_counter() - self.started
            self.answer += r.text

    @property
    def has_reasoning(self) -> bool:
        return bool(self.reasoning.strip())

    def thought_line(self) -> str:
        n = self.reasoning_tokens
        chunks = f" in {self.chunk} chunks" if self.chunk > 1 else ""
        secs = f", {self.reasoning_seconds:.1f} s" if self.reasoning_seconds is not None else ""
        return f"thought for {n} token{'s' if n != 1 else ''}{chunks}{secs}"

    def live_line(self) -> str:
        """While reasoning: the chunk, tokens so far, tokens/s and the context in use."""
        parts = ["thinking…"]
        if self.chunk > 1:
            parts.append(f"chunk {self.chunk}")
        if self.last is not None:
            parts.append(f"{self.reasoning_tokens} tokens @ {self.last.generation_tps:.1f} tok/s")
            used = getattr(self.last, "context_tokens", 0)
            if used:
                parts.append(f"context {used}/{self.context_limit}" if self.context_limit else f"context {used}")
        return " · ".join(parts)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.has_reasoning:
            if self.answer_started and not self.show_reasoning:
                yield Text(f"▸ {self.thought_line()} (/think shows it)", style="dim italic")
            elif self.done and not self.show_reasoning:
                # Stopped inside the reasoning (Ctrl-C, max tokens): its last lines, not all of it.
                yield Text(f"▸ {self.thought_line()}, no answer yet (/think shows it all)", style="dim italic")
                tail = 3 * max(20, options.max_width - 2) - 1
                body = self.reasoning.strip()
                yield Padding(Text(("…" + body[-tail:]) if len(body) > tail else body, style="dim"), (0, 0, 0, 2))
            else:
                head = f"▾ {self.thought_line()}" if self.answer_started or self.done else self.live_line()
                body = self.reasoning.strip()
                if self.live_chars is not None and len(body) > self.live_chars:
                    body = "…" + body[-self.live_chars :]
                yield Text(head, style="dim italic")
                yield Padding(Text(body, style="dim"), (0, 0, 0, 2))
        if self.budget_reached_at is not None:
            yield Text(f"think budget reached at {self.budget_reached_at} tokens: the think block was closed "
                       "and the model answers (/think-budget)", style="dim italic")
        answer = self.answer.strip()
        if answer:
            if self.has_reasoning:
                yield Text("")
            yield Markdown(answer, code_theme=CODE_THEME)


class Tail:
    """Draw only what fits the terminal, the first line and the last ones (a live view must never overflow it)."""

    def __init__(self, renderable, reserve: int = 1):
        self.renderable = renderable
        self.reserve = reserve

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = max(1, console.size.height - self.reserve)
        lines = console.render_lines(self.renderable, options.update(height=None), pad=False)
        if len(lines) > height:  # keep the first line (the reasoning header or the folded line) in view
            lines = lines[:1] + lines[len(lines) - height + 1 :]
        for line in lines:
            yield from line
            yield Segment.line()


class _CtrlC:
    """While active, the first Ctrl-C only sets `hit` (the loop stops between two tokens); a second one raises.

    On a terminal it also turns off the echo of typed keys and the flush of pending output that Ctrl-C does by
    default (both would scramble the live view); type-ahead is kept for the next prompt.
    """

    def __init__(self, stdin: Optional[TextIO] = None):
        self.hit = False
        self.stdin = stdin
        self._previous = None
        self._termios = None

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self):
        self.hit = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: plain KeyboardInterrupt semantics
            self._previous = None
        try:
            import termios

            if self.stdin is not None and self.stdin.isatty():
                fd = self.stdin.fileno()
                saved = termios.tcgetattr(fd)
                quiet = list(saved)
                quiet[3] = (quiet[3] & ~termios.ECHO) | termios.NOFLSH
                termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
                self._termios = (fd, saved)
        except (ImportError, OSError, ValueError, AttributeError):
            self._termios = None
        return self

    def __exit__(self, *exc):
        if self._termios is not None:
            import termios

            fd, saved = self._termios
            try:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            except OSError:
                pass
            self._termios = None
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --- slash commands ----------------------------------------------------------------------------------------------


@dataclass
class Command:
    name: str  # with the slash: "/temp"
    handler: Callable[["ChatUI", str], None]  # (ui, the text after the command name, stripped)
    usage: str
    help: str


COMMANDS: Dict[str, Command] = {}


def register_command(name: str, handler: Callable[["ChatUI", str], None], usage: str = "", help: str = "") -> None:
    """Add (or replace) a slash command for every ChatUI created afterwards."""
    name = name if name.startswith("/") else "/" + name
    COMMANDS[name] = Command(name, handler, usage or name, help)


def command(name: str, usage: str = "", help: str = ""):
    def wrap(fn):
        register_command(name, fn, usage, help)
        return fn

    return wrap


@command("/help", help="this list")
def _cmd_help(ui: "ChatUI", arg: str) -> None:
    table = Table.grid(padding=(0, 2))
    for cmd in ui.commands.values():
        table.add_row(Text(cmd.usage, style="bold"), cmd.help)
    table.add_row(Text("text\\", style="bold"), "a trailing backslash continues the message on the next line")
    table.add_row(Text("Ctrl-C", style="bold"), "stop the answer (kept in the history); twice on an empty prompt: exit")
    ui.console.print(table)


@command("/reset", help="start a new conversation (the system prompt stays)")
def _cmd_reset(ui: "ChatUI", arg: str) -> None:
    ui.session.reset()
    ui.last_view = None
    ui.note("conversation cleared")


@command("/system", usage="/system TEXT", help="set the system prompt (the conversation goes on); alone: show it")
def _cmd_system(ui: "ChatUI", arg: str) -> None:
    if not arg:
        current = ui.system_prompt()
        ui.note(f"system prompt: {current}" if current else "no system prompt")
        return
    ui.session.set_system(arg)
    ui.note("system prompt set")


@command("/temp", usage="/temp X", help="sampling temperature (0 = greedy)")
def _cmd_temp(ui: "ChatUI", arg: str) -> None:
    try:
        value = float(arg)
        if value < 0 or value != value:
            raise ValueError
    except ValueError:
        ui.note(f"usage: /temp X, a number >= 0 (now {ui.setting('temperature')})")
        return
    ui.set_setting("temperature", value)
    ui.note(f"temperature {value:g}")


@command("/max", usage="/max N|off", help="most tokens a reply may take (reasoning included); off: no cap")
def _cmd_max(ui: "ChatUI", arg: str) -> None:
    if arg.lower() == "off":
        ui.set_setting("max_tokens", None)
        ui.note("max tokens off (the think budget and the context bound a reply)")
        return
    try:
        value = int(arg)
        if value < 1:
            raise ValueError
    except ValueError:
        ui.note(f"usage: /max N, a whole number >= 1, or off (now {ui.setting('max_tokens') or 'off'})")
        return
    ui.set_setting("max_tokens", value)
    ui.note(f"max tokens {value}")


@command("/think-budget", usage="/think-budget off|N|chunk=C tail=T total=N",
         help="how long a turn may reason: N closes the think block after N tokens; chunk/tail/total go on in "
              "fresh contexts carrying the reasoning's tail; alone: show it")
def _cmd_think_budget(ui: "ChatUI", arg: str) -> None:
    if arg:
        ui.session.think_budget = parse_think_budget(arg)
    ui.note(f"think budget {ui.session.think_budget}: {ui.session.think_budget.describe()}")


@command("/think", help="show or fold the reasoning blocks")
def _cmd_think(ui: "ChatUI", arg: str) -> None:
    ui.show_reasoning = not ui.show_reasoning
    if ui.show_reasoning:
        ui.note("reasoning shown in full")
        if ui.last_view is not None and ui.last_view.has_reasoning:
            ui.console.print(Padding(Text(ui.last_view.reasoning.strip(), style="dim"), (0, 0, 0, 2)))
    else:
        ui.note("reasoning folded to one line")


STAT_LABELS = {
    "prompt_tokens": "prompt tokens, last turn",
    "prompt_tps": "prompt tok/s",
    "generation_tokens": "generated tokens, last turn",
    "generation_tps": "generation tok/s",
    "context_tokens": "tokens in context",
    "context_limit": "context limit",
    "kv_cache_bytes": "KV cache",
    "peak_memory_gb": "peak memory",
    "reused_tokens": "tokens reused from the cache",
    "reasoning_chunks": "reasoning chunks, last turn",
    "think_budget_reached": "think budget reached, last turn",
    "dropped_turns": "oldest turns left out of the context",
}


@command("/stats", help="speed, context, KV cache and memory of this conversation")
def _cmd_stats(ui: "ChatUI", arg: str) -> None:
    stats = ui.session.stats
    items = stats.items() if isinstance(stats, dict) else vars(stats).items()
    table = Table.grid(padding=(0, 2))
    for key, value in items:
        if key.endswith("bytes") and isinstance(value, (int, float)):
            shown = format_bytes(value)
        elif key.endswith("_gb") and isinstance(value, (int, float)):
            shown = format_bytes(value * 1e9)
        elif isinstance(value, float):
            shown = f"{value:.1f}"
        else:
            shown = str(value)
        table.add_row(Text(STAT_LABELS.get(key, key.replace("_", " ")), style="bold"), shown)
    for name in ("temperature", "top_p", "max_tokens"):
        value = ui.setting(name)
        if value is not None:
            table.add_row(Text(name.replace("_", " "), style="bold"), f"{value:g}")
    table.add_row(Text("think budget", style="bold"), str(ui.session.think_budget))
    ui.console.print(table)
    if ui.log_path is not None:  # whole, however long (the terminal wraps it)
        ui.console.print(Text.assemble(("log file", "bold"), f"  {ui.log_path}"), soft_wrap=True)


@command("/save", usage="/save FILE", help="write the conversation to FILE (JSON)")
def _cmd_save(ui: "ChatUI", arg: str) -> None:
    if not arg:
        ui.note("usage: /save FILE")
        return
    path = Path(arg).expanduser()
    data = ui.session.to_json()
    text = data if isinstance(data, str) else json.dumps(data, indent=2, ensure_ascii=False)
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")  # a refused path: a ZayaError, one line
    ui.note(f"saved {len(ui.session.messages)} messages to {path}")


@command("/load", usage="/load FILE", help="replace the conversation with the one in FILE")
def _cmd_load(ui: "ChatUI", arg: str) -> None:
    if not arg:
        ui.note("usage: /load FILE")
        return
    path = Path(arg).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        ui.note(f"cannot read {path}: {e.strerror or e}")
        return
    ui.load_conversation(text)
    ui.last_view = None
    ui.note(f"loaded {len(ui.session.messages)} messages from {path}")


@command("/rsa", usage="/rsa [on|off|PRESET|key=value]",
         help="Markovian RSA mode: answer with rounds of aggregating rollouts; alone: show its settings")
def _cmd_rsa(ui: "ChatUI", arg: str) -> None:
    from .rsa_view import rsa_slash_command  # the mode, its settings and its view live there

    rsa_slash_command(ui, arg)


@command("/exit", help="leave (also Ctrl-D)")
def _cmd_exit(ui: "ChatUI", arg: str) -> None:
    ui.running = False


# --- the interactive UI ------------------------------------------------------------------------------------------

PROMPT = "> "
CONTINUATION = "… "


def _color_prompt(text: str, console: Console) -> str:
    """The input prompt, colored when the console is, with readline's invisible-text markers around escapes."""
    if console.no_color or not console.is_terminal or console.color_system is None:
        return text
    return f"\001\x1b[1;32m\002{text}\001\x1b[0m\002"


class ChatUI:
    """The interactive loop: read a message, run a command or a turn, render."""

    def __init__(self, session, console: Optional[Console] = None, show_reasoning: bool = False,
                 model_label: str = "", stdin: Optional[TextIO] = None, log_path: Optional[Path] = None):
        self.session = session
        self.log_path = log_path  # where library warnings and stderr go while the UI runs
        self.console = console or Console(highlight=False)
        self.show_reasoning = show_reasoning
        self.model_label = model_label
        self.stdin = stdin or sys.stdin
        self.commands: Dict[str, Command] = dict(COMMANDS)
        self.prompt_handler: Callable[[str], None] = self.stream_turn
        self.last_view: Optional[TurnView] = None
        self.running = True

    # small helpers the commands use
    def note(self, text: str) -> None:
        self.console.print(Text(text, style="cyan"))

    def setting(self, name: str):
        """A sampling setting of the session (temperature, top_p, max_tokens, ...)."""
        return self.session.sampling.get(name)

    def set_setting(self, name: str, value) -> None:
        self.session.sampling[name] = value

    def system_prompt(self) -> Optional[str]:
        return self.session.system

    def load_conversation(self, text: str) -> None:
        """Replace the session with one saved by /save (`ChatSession.to_json`); the cache is rebuilt lazily."""
        old = self.session
        self.session = type(old).from_json(old.model, old.tokenizer, text, max_context=old.max_context,
                                           prefill_step_size=old.prefill_step_size, think_budget=old.think_budget)

    # input
    def read_message(self) -> Optional[str]:
        """One message (several lines joined), or None to exit. Ctrl-C with text typed clears the line; on an empty
        prompt it asks for a second one to exit, so that a Ctrl-C meant to stop an answer that has just ended does
        not end the conversation."""
        lines: list = []
        prompt = PROMPT
        asked = False  # the last key was a Ctrl-C on an empty prompt
        while True:
            try:
                line = input(_color_prompt(prompt, self.console))
            except EOFError:
                self.console.print()
                return None
            except KeyboardInterrupt:
                typed = _line_buffer()
                self.console.print()
                if lines or typed:
                    lines, prompt, asked = [], PROMPT, False
                    continue
                if asked:
                    return None
                asked = True
                self.console.print(Text("Ctrl-C again to exit (or Ctrl-D, /exit)", style="dim"))
                continue
            asked = False
            lines.append(line)
            if lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
                prompt = CONTINUATION
                continue
            return "\n".join(lines)

    # the loop
    def banner(self) -> None:
        stats = self.session.stats
        limit = _stat(stats, "context_limit")
        head = Text("ZAYA1 chat", style="bold")
        if self.model_label:
            head.append(f" · {self.model_label}", style="")
        if limit:
            head.append(f" · context {limit} tokens", style="dim")
        self.console.print(head)
        self.console.print(Text("/help for commands · Ctrl-C stops an answer · Ctrl-D exits", style="dim"))

    def run(self) -> None:
        preparing = self.session.start_preparing()  # the model's first call, while the first message is typed
        self.banner()
        while self.running:
            text = self.read_message()
            if preparing.is_alive():  # no model work, nor exit, while it runs
                self.console.print(Text("preparing the model (its GPU kernels build once a process)…", style="dim"))
                preparing.join()
            if text is None:
                break
            try:
                self.handle(text)
            except KeyboardInterrupt:  # Ctrl-C in a command (a turn handles its own)
                self.note("cancelled")

    def handle(self, text: str) -> None:
        """A line of input: a slash command, or a prompt for the model."""
        if not text.strip():
            return
        stripped = text.strip()
        if stripped.startswith("//"):
            text = stripped[1:]  # "//x" sends "/x" to the model
        elif stripped.startswith("/"):
            name = stripped.split(maxsplit=1)[0].lower()
            arg = stripped[len(name):]
            cmd = self.commands.get(name)
            if cmd is not None:
                try:
                    cmd.handler(self, arg.strip())
                except ZayaError as e:
                    self.console.print(Text(f"error: {e}", style="red"))
                return
            if "/" not in name[1:]:  # "/usr/bin/x ..." is a prompt, "/foo" a typo
                self.note(f"unknown command {name}; /help lists the commands")
                return
        try:
            self.prompt_handler(text)
        except ZayaError as e:
            self.console.print(Text(f"error: {e}", style="red"))

    def stream_turn(self, text: str, **overrides) -> TurnView:
        """Send `text`, stream the reasoning and answer, then the status line. Ctrl-C stops between tokens."""
        view = TurnView(show_reasoning=self.show_reasoning, context_limit=self.session.max_context)
        last = None
        interrupted = False
        live = None
        responses = self.session.send(text, **overrides)
        left_out = self.left_out_line()
        if left_out:
            self.console.print(Text(left_out, style="dim"))
        try:
            with _CtrlC(self.stdin) as ctrl_c:
                if self.console.is_terminal:
                    view.live_chars = max(200, self.console.size.width * self.console.size.height)
                    live = Live(Tail(view), console=self.console, refresh_per_second=12, transient=True,
                                redirect_stdout=False, redirect_stderr=False)
                    live.start()
                try:
                    for r in responses:
                        view.add(r)
                        last = r
                        if ctrl_c.hit:
                            interrupted = True
                            break
                except KeyboardInterrupt:
                    interrupted = True
                finally:
                    responses.close()  # the session keeps what was generated so far
                    if live is not None:
                        live.stop()
        finally:
            view.live_chars = None
            view.done = True
        self.last_view = view
        self.console.print(view)
        self.console.print(status_line(last, self.session.stats, interrupted))
        return view

    def left_out_line(self) -> Optional[str]:
        """What the session's last `send` left out of the context to fit it, in one line (None if nothing)."""
        turns = self.session.last_dropped_turns
        parts = ["earlier reasoning"] if self.session.last_dropped_reasoning else []
        if turns:
            parts.append(f"the {turns} oldest turns" if turns > 1 else "the oldest turn")
        if not parts:
            return None
        return (f"context {self.session.max_context} tokens: left out {' and '.join(parts)} "
                "(still in /save)")


def _line_buffer() -> str:
    try:
        import readline

        return readline.get_line_buffer()
    except Exception:
        return ""


# --- piped mode --------------------------------------------------------------------------------------------------


def run_piped(session, lines: Iterable[str], out: TextIO, show_reasoning: bool = False) -> int:
    """One prompt per non-empty line, in one conversation; each answer printed plainly, ending in one newline.
    With `show_reasoning`, the reasoning comes first inside `<think>...</think>`. Returns the prompts answered."""
    answered = 0
    for line in lines:
        prompt = line.rstrip("\r\n")
        if not prompt.strip():
            continue
        writer = _PlainWriter(out)
        in_reasoning = False
        for r in session.send(prompt):
            if r.channel == REASONING:
                if show_reasoning and r.text:
                    if not in_reasoning:
                        out.write("<think>\n")
                        in_reasoning = True
                    writer.write(r.text)
            else:
                if in_reasoning:
                    writer.end()
                    out.write("\n</think>\n")
                    in_reasoning = False
                    writer = _PlainWriter(out)
                writer.write(r.text)
            out.flush()
        if in_reasoning:
            writer.end()
            out.write("\n</think>\n")
            writer = _PlainWriter(out)
        writer.end()
        out.write("\n")
        out.flush()
        answered += 1
    return answered


def utf8_lines(stdin, skipped: list) -> Iterator[str]:
    """stdin's lines as text. A line that is not UTF-8 is reported in one line on stderr, its number appended to
    `skipped`, and the lines after it are still read."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # already text
        yield from stdin
        return
    for number, line in enumerate(raw, 1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.append(number)
            print(f"error: line {number} of stdin is not valid UTF-8 (byte {e.start + 1}); skipped", file=sys.stderr,
                  flush=True)


class _PlainWriter:
    """Streams text with the leading and trailing whitespace of the whole dropped."""

    def __init__(self, out: TextIO):
        self.out = out
        self.started = False
        self.pending = ""

    def write(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
        body = text.rstrip()
        if body:
            self.out.write(self.pending + body)
            self.pending = text[len(body):]
        else:
            self.pending += text

    def end(self) -> None:
        self.pending = ""


# --- entry point ---------------------------------------------------------------------------------------------------


def run_chat(session, *, show_reasoning: bool = False, model_label: str = "", log_path: Optional[Path] = None,
             stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None) -> int:
    """`zaya chat` over a loaded `ChatSession`: the interactive UI (stdin a terminal) or piped mode. In the UI,
    stderr (library warnings included) goes to `log_path` (named in /stats). Returns the exit code."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if not stdin.isatty():
        skipped = []
        run_piped(session, utf8_lines(stdin, skipped), stdout, show_reasoning=show_reasoning)
        return 1 if skipped else 0
    try:
        import readline  # line editing and history for input()

        # A paste arrives between bracket marks and stays one message; lines typed ahead stay separate inputs.
        # (GNU readline's setting; macOS's libedit has no such thing and reads every line alone.)
        if "libedit" not in (readline.__doc__ or ""):
            readline.parse_and_bind("set enable-bracketed-paste on")
    except ImportError:
        pass
    console = Console(highlight=False, file=stdout)
    ui = ChatUI(session, console=console, show_reasoning=show_reasoning, model_label=model_label, stdin=stdin,
                log_path=log_path)
    with StderrToFile(log_path):
        ui.run()
    return 0


class StderrToFile:
    """While active, file descriptor 2 (Python's warnings and logging, C libraries' messages) writes to a log
    file, so nothing but the UI reaches the screen. With no path, stderr stays as it is."""

    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path is not None else None
        self._saved: Optional[int] = None

    def __enter__(self):
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr.flush()
        self._saved = os.dup(2)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            sys.stderr.flush()
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None
        return False
