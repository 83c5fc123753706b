"""The view of a Markovian RSA run, shared by `zaya rsa` and `/rsa` in `zaya chat`.

`RSAView` is an `on_event` callback for `zaya_mlx.rsa.run`. In a terminal: a status line (round r/T+1, rollouts
done / running / pending, tokens, decode and prefill rates, elapsed time, the time left as a range, peak
memory), a bar per running rollout, and a line kept per finished round. In a pipe: a line per finished rollout,
a line per finished round, and a progress line every `pipe_every` seconds. `render_result` prints the answer.
"""

from __future__ import annotations

import time
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from .rsa import RSAEvent, RSAParams, RSAResult
from .rsa.runfolder import clock
from .sizes import format_bytes


def short(text: str, width: int) -> str:
    """One line of at most `width` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


class RunProgress:
    """What the view shows, computed from the events alone (also used by the Python API's callers)."""

    def __init__(self, params: RSAParams):
        self.p = params
        self.total = params.total_rollouts()
        self.done = 0
        self.running: dict[tuple, int] = {}
        self.tokens = 0
        self.finished_tokens = 0
        self.start = time.perf_counter()
        self.round = 0
        self.resumed = 0
        self.rates = {"prefill_tps": 0.0, "decode_tps": 0.0, "peak_bytes": 0}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return self.tokens / max(self.elapsed(), 1e-9)

    def left(self) -> tuple[int, int]:
        """Tokens still to decode: (at the mean length of the finished rollouts, at full budgets)."""
        worst = sum(self.p.max_tokens_in(r) - n for (r, _), n in self.running.items())
        pending = self.total - self.done - len(self.running)
        final_pending = min(pending, self.p.final_count if self.p.rsa_t > 0 else pending)
        worst += (pending - final_pending) * self.p.short_resp_len + final_pending * self.p.max_tokens
        finished = self.done - self.resumed
        mean = self.finished_tokens / finished if finished else None
        if mean is None:
            return worst, worst
        likely = sum(max(0, int(mean) - n) for n in self.running.values()) + int(pending * mean)
        return min(likely, worst), worst

    def eta(self) -> str:
        rate = self.rate()
        if self.tokens < 1 or rate <= 0:
            return "time left: after the first tokens"
        likely, worst = self.left()
        return f"left {clock(likely / rate)}-{clock(worst / rate)}"


class RSAView:
    """Call it with each RSAEvent; use as a context manager around `rsa.run`."""

    def __init__(self, console: Console, params: RSAParams, *, pipe_every: float = 30.0, estimate: str = ""):
        self.console, self.p, self.estimate = console, params, estimate
        self.live_enabled = console.is_terminal
        self.state = RunProgress(params)
        self.pipe_every, self.last_pipe = pipe_every, time.perf_counter()
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                             console=console, expand=True)
        self.tasks: dict[tuple, int] = {}
        self.status = Text()
        self.live: Optional[Live] = None
        self._last_status = 0.0

    def __enter__(self) -> "RSAView":
        return self

    def _start_live(self) -> None:
        """The live area appears with the first rollout, after the plan was printed (a refused plan shows none)."""
        if self.live_enabled and self.live is None:
            self.live = Live(Group(self.status, self.bars), console=self.console, refresh_per_second=4,
                             transient=True, redirect_stdout=False, redirect_stderr=False)
            self.live.start()

    def __exit__(self, *exc) -> bool:
        if self.live is not None:
            self.live.stop()
            self.print(self.line(), "dim")  # the live area is gone: keep where the run ended
        return False

    def line(self) -> str:
        s = self.state
        pending = s.total - s.done - len(s.running)
        r = s.rates  # measured once a second: none yet in a run's first second
        split = (f" (decode {r['decode_tps']:,.0f}, prefill {r['prefill_tps']:,.0f})"
                 if r["decode_tps"] or r["prefill_tps"] else "")
        peak = f" · peak {format_bytes(r['peak_bytes'])}" if r["peak_bytes"] else ""
        return (f"round {s.round}/{self.p.rsa_t} · {s.done}/{s.total} done, {len(s.running)} running, {pending} "
                f"pending · {s.tokens:,} tokens · {s.rate():,.1f} tok/s{split} · {clock(s.elapsed())} · {s.eta()}"
                f"{peak}")

    def _refresh(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.live_enabled:
            if force or now - self._last_status > 0.25:
                self._last_status = now
                self.status.plain = self.line()
        elif now - self.last_pipe >= self.pipe_every:
            self.last_pipe = now
            self.console.print(self.line(), markup=False, highlight=False)

    def print(self, text: str, style: Optional[str] = None) -> None:
        self.console.print(Text(text, style=style) if style else text, markup=False, highlight=False)

    def __call__(self, e: RSAEvent) -> None:
        s = self.state
        if e.kind == "token":
            s.tokens += 1
            key = (e.round, e.rollout)
            s.running[key] = s.running.get(key, 0) + 1
            if key in self.tasks:
                self.bars.advance(self.tasks[key])
            self._refresh()
        elif e.kind == "progress":
            s.rates = {k: e.data[k] for k in ("prefill_tps", "decode_tps", "peak_bytes")}
            self._refresh()
        elif e.kind == "plan":
            self.print(e.data["plan"].summary(), "dim")
            if self.estimate:
                self.print(self.estimate, "dim")
        elif e.kind == "resumed":
            s.done = s.resumed = e.data["rollouts"]
            self.print(f"resumed: {s.done} finished rollouts read back", "dim")
        elif e.kind == "round_started":
            s.round = max(s.round, e.round)
        elif e.kind == "rollout_started":
            key = (e.round, e.rollout)
            s.running[key] = 0
            self._start_live()
            if self.live_enabled:
                self.tasks[key] = self.bars.add_task(f"r{e.round} #{e.rollout + 1:<3}",
                                                     total=self.p.max_tokens_in(e.round))
            self._refresh(force=True)
        elif e.kind == "rollout_finished":
            key = (e.round, e.rollout)
            s.running.pop(key, None)
            s.done += 1
            s.finished_tokens += e.data["tokens"]
            if key in self.tasks:
                self.bars.remove_task(self.tasks.pop(key))
            if not self.live_enabled:
                answer = e.data["answer"]
                self.print(f"round {e.round} rollout {e.rollout + 1}: {e.data['tokens']} tokens, "
                           f"{e.data['finish_reason']}, answer {short(answer, 40) if answer else '-'}")
            self._refresh(force=True)
        elif e.kind == "round_finished":
            answers = [a for a in e.data["answers"] if a is not None]
            shown = ", ".join(short(a, 16) for a in answers[:8]) + (" …" if len(answers) > 8 else "")
            self.print(f"round {e.round}/{self.p.rsa_t}: {e.data['tokens']:,} tokens "
                       f"(mean {e.data['mean_tokens']:,.0f})"
                       f" in {clock(e.data['seconds'])}; answers: {shown or 'none'}")
            self._refresh(force=True)


def render_result(console: Console, result: RSAResult, show_text: bool = False) -> None:
    """The final response's answer (and the vote, when there is one) and a line of totals."""
    if show_text:
        console.print(Text(result.text, style="dim"))
    if result.answer is None:
        console.print(Text("the final response gave no answer", style="yellow"))
    else:
        line = Text("answer: ", style="bold")
        line.append(result.answer if "\n" not in result.answer else "\n" + result.answer, style="bold green")
        console.print(line)
    if result.vote is not None and result.vote.counts:
        table = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
        table.add_column("votes", justify="right")
        table.add_column("answer")
        for answer, count in result.vote.counts.items():
            table.add_row(str(count), Text(short(answer, 72)))
        console.print(table)
    t = result.timings
    now = f" ({t['tokens_decoded']:,} decoded now)" if t["tokens_decoded"] != result.tokens_generated else ""
    console.print(Text(f"{len(result.rounds)} rounds · {sum(len(r.rollouts) for r in result.rounds)} rollouts · "
                       f"{result.tokens_generated:,} tokens{now} in {clock(t['total_s'])} · {t['tokens_per_s']:,.1f} "
                       "tok/s", style="dim"))


# --- /rsa in `zaya chat` ------------------------------------------------------------------------------------------

ALIASES = {"n": "rsa_n", "k": "rsa_k", "t": "rsa_t", "final_n": "rsa_final_n", "temp": "temperature",
           "final_temp": "final_temperature", "vote": "final_vote"}
RUN_KEYS = {"seed": int, "max_batch": int}
CHAT_USAGE = "/rsa [on|off|PRESET|key=value ...]"


def chat_state(ui) -> dict:
    """The RSA settings of a chat UI (kept on the UI object): enabled, preset, overrides, run options."""
    state = getattr(ui, "rsa_state", None)
    if state is None:
        from .rsa import DEFAULT_PRESET

        state = {"enabled": False, "preset": DEFAULT_PRESET, "overrides": {}, "seed": 0, "max_batch": None}
        ui.rsa_state = state
    return state


def _parse(key: str, value: str):
    import dataclasses

    from .errors import ZayaError

    if key in RUN_KEYS:
        kind = int
    else:
        field = {f.name: f for f in dataclasses.fields(RSAParams)}.get(key)
        if field is None:
            raise ZayaError(f"/rsa: unknown setting {key!r}")
        default = getattr(RSAParams(), key)
        kind = int if default is None else type(default)  # kv_bits: unset by default, a whole number when given
    if kind is bool:
        if value.lower() not in ("on", "off", "true", "false", "1", "0"):
            raise ZayaError(f"/rsa: {key} is on or off, got {value!r}")
        return value.lower() in ("on", "true", "1")
    try:
        return kind(value)
    except ValueError:
        raise ZayaError(f"/rsa: {key} needs {'a whole number' if kind is int else 'a number'}, got {value!r}") from None


def rsa_slash_command(ui, arg: str) -> None:
    """`/rsa`: show the settings; `on`/`off`: answer prompts with Markovian RSA or normally; a preset name:
    pick it (clears the overrides); `key=value`: any RSAParams field (n, k, t are rsa_n, rsa_k, rsa_t), seed,
    max_batch. The settings are checked as they are given."""
    from .errors import ZayaError
    from .rsa import PRESETS

    state = chat_state(ui)
    for word in arg.split():
        low = word.lower()
        if low in ("on", "off"):
            state["enabled"] = low == "on"
            ui.prompt_handler = (lambda text: answer_with_rsa(ui, text)) if state["enabled"] else ui.stream_turn
        elif low in PRESETS:
            state["preset"], state["overrides"] = low, {}
        elif "=" in word:
            key, _, value = word.partition("=")
            key = key.lower().replace("-", "_")
            key = ALIASES.get(key, key)
            parsed = _parse(key, value)
            if key in RUN_KEYS:
                if key == "max_batch" and parsed < 1:
                    raise ZayaError(f"/rsa: max_batch must be at least 1, got {parsed}")
                state[key] = parsed
            else:
                RSAParams.preset(state["preset"], **{**state["overrides"], key: parsed})  # refuse it now
                state["overrides"][key] = parsed
        else:
            raise ZayaError(f"/rsa: unknown argument {word!r}; usage: {CHAT_USAGE}")
    ui.note(_describe(state))


def chat_params(state: dict) -> RSAParams:
    return RSAParams.preset(state["preset"], **state["overrides"])


def _describe(state: dict) -> str:
    p = chat_params(state)
    mode = "on" if state["enabled"] else "off"
    return (f"RSA {mode} · preset {state['preset']}: n={p.rsa_n} k={p.rsa_k} t={p.rsa_t} "
            f"tail_window_len={p.tail_window_len} short_resp_len={p.short_resp_len} max_tokens={p.max_tokens} "
            f"final_n={p.rsa_final_n} temp={p.temperature} seed={state['seed']}")


def answer_with_rsa(ui, text: str) -> None:
    """Answer `text` with Markovian RSA (the conversation's system prompt, thinking setting, model and KV format
    unless `/rsa kv_bits=` says otherwise), show the live view and the answer, and add the turn to the conversation
    (the final response as the assistant's reply). Earlier turns are not part of the problem. Ctrl-C stops the
    run."""
    from . import rsa

    session = ui.session
    state = chat_state(ui)
    params = chat_params(state).replace(enable_thinking=session.enable_thinking,
                                        kv_bits=state["overrides"].get("kv_bits", session.kv_bits))
    messages = ([{"role": "system", "content": session.system}] if session.system else []) + \
        [{"role": "user", "content": text}]
    view = RSAView(ui.console, params)
    try:
        with view:
            result = rsa.run(messages, params, model=session.model, tokenizer=session.tokenizer, seed=state["seed"],
                             max_batch=state["max_batch"], on_event=view)
    except KeyboardInterrupt:
        ui.note("RSA stopped; nothing was added to the conversation")
        return
    render_result(ui.console, result)
    session.messages.append({"role": "user", "content": text})
    session.messages.append({"role": "assistant", "content": result.text})
