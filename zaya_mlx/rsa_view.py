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
