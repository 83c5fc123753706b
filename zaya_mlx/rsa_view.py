"""The rich view of a Markovian RSA run, shared by `zaya rsa` and `/rsa` in `zaya chat`.

`RSAView` is an `on_event` callback for `zaya_mlx.rsa.run`: one progress bar per rollout (tokens out of the
budget, then how it finished and its answer), the round counter, and the round's aggregate tokens/s, live while
the console is a terminal; otherwise one plain line per finished round. `render_result` prints the answer,
the vote and a summary line.
"""

from __future__ import annotations

import time
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from .rsa import RSAEvent, RSAResult


def short(text: str, width: int) -> str:
    """One line of at most `width` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


class RSAView:
    """Call it with each RSAEvent; use as a context manager around `rsa.run`."""

    def __init__(self, console: Console, n: int, budget: int, rounds: int):
        self.console, self.n, self.budget, self.rounds = console, n, budget, rounds
        self.live_enabled = console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), console=console, expand=True)
        self.tasks = [self.progress.add_task(f"rollout {i + 1:>2}", total=budget, status="", start=True)
                      for i in range(n)]
        self.header = Text()
        self.plan_line = Text("", style="dim")
        self.round = -1
        self.round_tokens = 0
        self.round_start = time.perf_counter()
        self.live: Optional[Live] = None
        self._last_header = 0.0

    def __enter__(self) -> "RSAView":
        if self.live_enabled:
            self.live = Live(Group(self.plan_line, self.header, self.progress), console=self.console,
                             refresh_per_second=10, transient=True, redirect_stdout=False, redirect_stderr=False)
            self.live.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self.live is not None:
            self.live.stop()
        return False

    def _set_header(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_header < 0.1:
            return
        self._last_header = now
        tps = self.round_tokens / max(now - self.round_start, 1e-9)
        kind = "sampling" if self.round == 0 else "aggregating"
        self.header.plain = ""
        self.header.append(f"round {self.round}/{self.rounds}", style="bold")
        self.header.append(f" · {kind} · {self.round_tokens} tokens · {tps:,.1f} tok/s", style="")

    def __call__(self, e: RSAEvent) -> None:
        if e.kind == "token":
            self.round_tokens += 1
            self.progress.advance(self.tasks[e.rollout])
            self._set_header()
        elif e.kind == "plan":
            self.plan_line.plain = e.data["plan"].summary()
            if not self.live_enabled:
                self.console.print(self.plan_line)
        elif e.kind == "round_started":
            self.round, self.round_tokens, self.round_start = e.round, 0, time.perf_counter()
            for t in self.tasks:
                self.progress.reset(t, total=self.budget, status="")
            self._set_header(force=True)
        elif e.kind == "rollout_finished":
            self.progress.update(self.tasks[e.rollout], status=e.data["finish_reason"])
        elif e.kind == "answer_extracted":
            answer = e.data["answer"]
            shown = "no answer" if answer is None else short(answer, 24)
            self.progress.update(self.tasks[e.rollout], status=shown)
        elif e.kind == "round_finished":
            self._set_header(force=True)
            if not self.live_enabled:
                self.console.print(f"round {e.round}/{self.rounds}: {e.data['tokens']} tokens in "
                                   f"{e.data['seconds']:.1f} s, {e.data['tokens_per_s']:,.1f} tok/s", markup=False)


def render_result(console: Console, result: RSAResult, show_text: bool = False) -> None:
    """The voted answer, the votes, and a line of totals (with the winning rollout's text on request)."""
    if show_text and result.winner >= 0:
        console.print(Text(result.winner_text, style="dim"))
    if result.answer is None:
        console.print(Text("no rollout of the last round gave an answer", style="yellow"))
    else:
        line = Text("answer: ", style="bold")
        line.append(result.answer if "\n" not in result.answer else "\n" + result.answer, style="bold green")
        console.print(line)
    if result.votes:
        table = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
        table.add_column("votes", justify="right")
        table.add_column("answer")
        for answer, count in result.votes.items():
            table.add_row(str(count), Text(short(answer, 72)))
        console.print(table)
    t = result.timings
    console.print(Text(f"{len(result.rounds)} rounds · {result.params['n']} rollouts · {result.tokens_generated} "
                       f"tokens in {t['total_s']:.1f} s · {t['tokens_per_s']:,.1f} tok/s", style="dim"))


# --- /rsa in `zaya chat` ------------------------------------------------------------------------------------------

# key=value settings of `/rsa` (aliases on the right of the table below) and their types.
CHAT_KEYS = {"n": int, "c": int, "tau": int, "budget": int, "rounds": int, "seed": int, "temp": float,
             "top_p": float, "top_k": int, "min_p": float, "template": str, "max_batch": int}
ALIASES = {"beta": "budget", "k": "c", "t": "rounds", "temperature": "temp", "top-p": "top_p", "top-k": "top_k",
           "min-p": "min_p", "max-batch": "max_batch"}
CHAT_USAGE = "/rsa [on|off|laptop|report|key=value ...]"


def chat_state(ui) -> dict:
    """The RSA settings of a chat UI (kept on the UI object): enabled, preset, overrides."""
    state = getattr(ui, "rsa_state", None)
    if state is None:
        state = {"enabled": False, "preset": "laptop", "overrides": {}}
        ui.rsa_state = state
    return state


def chat_params(state: dict) -> dict:
    """The preset's values with the overrides on top, as `rsa.run` keywords."""
    from . import rsa

    p = rsa.PRESETS[state["preset"]]
    out = {"n": p.n, "c": p.c, "tau": p.tau, "budget": p.budget, "rounds": p.rounds, "seed": 0,
           "temp": rsa.DEFAULT_TEMPERATURE, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "template": rsa.DEFAULT_TEMPLATE,
           "max_batch": None}
    out.update(state["overrides"])
    return out


def _describe(state: dict) -> str:
    p = chat_params(state)
    mode = "on" if state["enabled"] else "off"
    extra = "".join(f" {k}={p[k]}" for k in ("seed", "top_p", "top_k", "min_p", "max_batch")
                    if p[k] not in (None, 0, 0.0, 1.0) or (k == "seed" and p[k]))
    return (f"RSA {mode} · preset {state['preset']}: n={p['n']} c={p['c']} tau={p['tau']} budget={p['budget']} "
            f"rounds={p['rounds']} temp={p['temp']} template={p['template']}{extra}")


def rsa_slash_command(ui, arg: str) -> None:
    """`/rsa`: show the settings; `on`/`off`: answer prompts with Markovian RSA or normally; `laptop`/`report`:
    pick a preset (clears the key=value overrides); `key=value`: set n, c, tau, budget (beta), rounds, seed, temp,
    top_p, top_k, min_p, template, max_batch."""
    from . import rsa
    from .errors import ZayaError

    state = chat_state(ui)
    for word in arg.split():
        low = word.lower()
        if low in ("on", "off"):
            state["enabled"] = low == "on"
            ui.prompt_handler = (lambda text: answer_with_rsa(ui, text)) if state["enabled"] else ui.stream_turn
        elif low in rsa.PRESETS:
            state["preset"], state["overrides"] = low, {}
        elif "=" in word:
            key, _, value = word.partition("=")
            key = ALIASES.get(key.lower(), key.lower().replace("-", "_"))
            if key not in CHAT_KEYS:
                raise ZayaError(f"/rsa: unknown setting {key!r}; settings: {', '.join(CHAT_KEYS)}")
            try:
                parsed = CHAT_KEYS[key](value)
            except ValueError:
                raise ZayaError(f"/rsa: {key} needs a {CHAT_KEYS[key].__name__}, got {value!r}") from None
            if key == "template":
                rsa.load_template(parsed)  # unknown names fail now, not at the next prompt
            elif key not in ("temp", "top_p", "min_p", "seed") and parsed < (0 if key == "rounds" else 1):
                raise ZayaError(f"/rsa: {key} must be at least {0 if key == 'rounds' else 1}")
            state["overrides"][key] = parsed
        else:
            raise ZayaError(f"/rsa: unknown argument {word!r}; usage: {CHAT_USAGE}")
    ui.note(_describe(state))


def answer_with_rsa(ui, text: str) -> None:
    """Answer `text` with Markovian RSA (the conversation's system prompt, thinking setting and model), show the
    live view, the answer and the vote, and add the turn to the conversation (the winning rollout's text as the
    assistant's reply). The problem is `text` alone: earlier turns are not part of it. Ctrl-C stops the run."""
    from . import rsa

    session = ui.session
    p = chat_params(chat_state(ui))
    view = RSAView(ui.console, p["n"], p["budget"], p["rounds"])
    try:
        with view:
            result = rsa.run(session.model, session.tokenizer, text, p["n"], p["c"], p["tau"], p["budget"],
                             p["rounds"], p["seed"], temperature=p["temp"], top_p=p["top_p"], top_k=p["top_k"],
                             min_p=p["min_p"], template=p["template"], max_batch=p["max_batch"],
                             enable_thinking=session.enable_thinking, system=session.system, on_event=view)
    except KeyboardInterrupt:
        ui.note("RSA stopped; nothing was added to the conversation")
        return
    render_result(ui.console, result)
    reply = result.winner_text if result.winner >= 0 else result.rounds[-1].rollouts[0].text
    session.messages.append({"role": "user", "content": text})
    session.messages.append({"role": "assistant", "content": reply})
