"""`zaya`: a thin typer CLI over the Python API. Each command only parses, calls the API and prints.

The environment is read here and nowhere else: ZAYA_FUSED, ZAYA_KERNELS and ZAYA_COMPILE override the model's
decode options (`decode_options`), and MLX's settings for the fused decode step (`decode.mlx_settings`) are applied
unless the user has set them.
"""

import contextlib
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from .config import DEFAULT_MODEL
from .errors import ZayaError, first_line
from .model_cache import FIRST_RUN_CONTEXT
from .files import write_text_atomic
from .sizes import format_bytes

# ZAYA1 reasons at length before answering (its context is 131K tokens): a short cap would rarely reach the answer.
MAX_TOKENS = 16384

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ZAYA1 on MLX.")


def _switch(name: str) -> Optional[bool]:
    """An environment switch: True for 1/on/true/yes, False for 0/off/false/no, None where unset or other."""
    value = os.environ.get(name, "").strip().lower()
    return True if value in ("1", "on", "true", "yes") else False if value in ("0", "off", "false", "no") else None


def decode_options():
    """The models' DecodeOptions: the defaults, with ZAYA_FUSED (1: always the fused step, 0: never; unset: on a
    GPU once checked), ZAYA_KERNELS=0 (the kernels' plain-MLX references) and ZAYA_COMPILE=0 (no mx.compile)."""
    from .decode import DecodeOptions

    return DecodeOptions(fused=_switch("ZAYA_FUSED"), kernels=_switch("ZAYA_KERNELS") is not False,
                         compile=_switch("ZAYA_COMPILE") is not False)


def apply_mlx_settings() -> None:
    """MLX's settings that the fused decode step is tuned for, where the user has not set them; before MLX's first
    GPU evaluation, which reads them."""
    from .decode import mlx_settings

    for name, value in mlx_settings().items():
        os.environ.setdefault(name, value)


def fail(message: str) -> None:
    """Print a one-line error and exit non-zero (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def read_stdin() -> str:
    """All of stdin as text; bytes that are not UTF-8 are a one-line error, not a traceback."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"stdin is not valid UTF-8 (byte {e.start + 1} of {len(data)})")


def check_output_file(option: str, path: Optional[str]) -> None:
    """Refuse, before any work, an output file that cannot be one: a folder, or in a folder that does not exist."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir() or not target.resolve().parent.is_dir():
        fail(f"{option} {path}: {'is a folder' if target.is_dir() else 'its folder does not exist'}; give a file path")


# --- the model a command runs without --model --------------------------------------------------------------------

FITS = (f"in bf16 where it fits this machine's memory with a {FIRST_RUN_CONTEXT // 1024}K context, else an MXFP4 copy "
        f"made once (zaya models).")


def default_model() -> str:
    """The default model for this machine (`model_cache.default_model`), its steps on stderr, and bars with the time
    left for the download and the quantization when it makes a copy."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .model_cache import default_model as choose

    err = Console(stderr=True, highlight=False)
    bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=err)
    tasks = {}

    def progress(stage: str, done: int, total: int, what: str) -> None:
        if not tasks:
            bar.start()
            tasks.update({s: bar.add_task(label, total=total or None)
                          for s, label in (("download", "downloading"), ("quantize", "quantizing"))})
        bar.update(tasks[stage], completed=done, total=max(total, done))  # file bytes run past the tensors' a little

    try:
        return str(choose(log=lambda line: bar.console.print(line, markup=False), progress=progress))
    finally:
        if tasks:
            bar.stop()


@app.command("models")
def models_command(
    remove: Optional[str] = typer.Option(None, "--remove", help="Delete a copy zaya-mlx made (its ID in the list)."),
    macs: bool = typer.Option(False, "--macs", help="Print which model fits which Mac (the README's table)."),
) -> None:
    """The ZAYA models in the cache: the hub's downloads and the quantized copies made for this machine."""
    from .model_cache import default_cache, list_models, mac_table, remove_model

    if macs:
        typer.echo(mac_table())
        return
    if remove is not None:
        entry = remove_model(remove)
        typer.echo(f"removed {entry.id} ({format_bytes(entry.size)}) from {entry.path}")
        return
    entries = list_models()
    if not entries:
        typer.echo(f"no ZAYA model in the cache ({default_cache()} and the hub's)")
        return
    rows = [("id", "format", "size", "path")] + [(e.id, e.format, format_bytes(e.size), str(e.path)) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])


# --- chat (the terminal UI) ----------------------------------------------------------------------------------------


@app.command("chat")
def chat_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Hub repo id or local folder (any layout, or a "
                                        f"folder written by `zaya quantize`). Default: {DEFAULT_MODEL}, {FITS}"),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n",
                                             help="Most tokens per reply, reasoning included (default: no cap; the "
                                                  "think budget and the context bound a reply)."),
    think_budget: str = typer.Option("chunked", "--think-budget",
                                     help="How long a turn may reason: 'off'; N (close the think block after N "
                                          "tokens); 'chunk=C tail=T total=N' (go on in fresh contexts carrying the "
                                          "last T reasoning tokens; default chunk=8192 tail=4096 total=65536)."),
    temp: float = typer.Option(0.6, "--temp", "-t", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed, for reproducible sampling."),
    no_think: bool = typer.Option(False, "--no-think", help="Ask the model to answer without reasoning first."),
    show_reasoning: bool = typer.Option(False, "--show-reasoning",
                                        help="Show the reasoning in full (piped: print it inside <think>...</think>)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype of unquantized weights (default bfloat16)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize the KV cache to 8 or 4 bits: about half or a quarter of its memory (docs/kv-cache.md)."),
    log_file: Optional[Path] = typer.Option(None, "--log-file",
                                            help="Where warnings go while the chat runs (default "
                                                 "$XDG_CACHE_HOME/zaya-mlx/chat.log, ~/.cache if unset)."),
) -> None:
    """Chat in the terminal: streamed reasoning and Markdown answers, slash commands (/help). With stdin not a
    terminal, reads one prompt per line and prints the answers plainly."""
    from .chat_session import ChatSession
    from .generation import load
    from .think_budget import parse_think_budget
    from .tui import run_chat

    from .kv_cache import check_kv_bits

    budget = parse_think_budget(think_budget)
    check_kv_bits(kv_bits)
    if log_file is None:
        log_file = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zaya-mlx" / "chat.log"
    model = model or default_model()
    if sys.stdin.isatty():
        typer.echo(f"loading {model}…")
    loaded, tokenizer = load(model, dtype=dtype, decode=decode_options())
    session = ChatSession(loaded, tokenizer, system=system, enable_thinking=not no_think, think_budget=budget,
                          temperature=temp, top_p=top_p, max_tokens=max_tokens, seed=seed, kv_bits=kv_bits)
    raise typer.Exit(run_chat(session, show_reasoning=show_reasoning, model_label=model, log_path=log_file))


# --- generate / serve (text generation) ---------------------------------------------------------------------------


@app.command("generate")
def generate_command(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message ('-' reads it from stdin)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Hub repo id or local folder (any layout). "
                                        f"Default: {DEFAULT_MODEL}, {FITS}"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help=f"Most tokens to generate, reasoning "
                                             f"included (default {MAX_TOKENS}, or what the context has room for)."),
    temp: float = typer.Option(0.6, "--temp", "-t", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min-p times the top probability (0 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed, for reproducible sampling."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    no_think: bool = typer.Option(False, "--no-think", help="Ask the model to answer without reasoning first."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as plain text, without the chat template."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype of unquantized weights (default bfloat16)."),
) -> None:
    """Answer one prompt: the reasoning streams dimmed, the answer normally, then a line of speeds."""
    from rich.console import Console

    from .generation import REASONING, context_limit, load, stream_generate
    from .tokenizer import apply_chat_template, require_tokenizer

    if prompt == "-":
        prompt = read_stdin()
    if not prompt.strip():
        fail("the prompt is empty")
    llm, tokenizer = load(model or default_model(), dtype=dtype, decode=decode_options())
    require_tokenizer(tokenizer)
    if raw:
        ids = prompt
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = apply_chat_template(tokenizer, messages, enable_thinking=not no_think)
    if max_tokens is None:
        n_prompt = len(tokenizer.encode(ids)) if isinstance(ids, str) else len(ids)
        max_tokens = max(1, min(MAX_TOKENS, context_limit(llm) - n_prompt))
    stream = stream_generate(llm, tokenizer, ids, max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k,
                             min_p=min_p, seed=seed)
    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False, soft_wrap=True)
    channel, last = None, None
    for r in stream:
        if channel == REASONING and r.channel != REASONING:
            out.print()
            out.print()
        channel, last = r.channel, r
        if r.text:
            out.print(r.text, style="dim" if r.channel == REASONING else None, end="", markup=False)
    out.print()
    if last is not None:
        err.print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | generation: "
                  f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | peak memory "
                  f"{format_bytes(last.peak_memory_gb * 1e9)} | {last.finish_reason}", style="dim", markup=False)


SERVE_EXAMPLE = """With the server running:

curl http://127.0.0.1:8080/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{"messages": [{"role": "user", "content": "What is 17 * 23?"}]}'

from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")
reply = client.chat.completions.create(
    model="Zyphra/ZAYA1-8B",
    messages=[{"role": "user", "content": "What is 17 * 23?"}])
print(reply.choices[0].message.reasoning_content)
print(reply.choices[0].message.content)
"""


@app.command("serve", epilog=SERVE_EXAMPLE)
def serve_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Hub repo id or local folder (any layout). "
                                        f"Default: {DEFAULT_MODEL}, {FITS}"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    max_tokens: int = typer.Option(MAX_TOKENS, "--max-tokens", "-n", min=1,
                                   help="Most tokens per answer when a request names none (always capped to the "
                                        "context's room)."),
    temp: float = typer.Option(0.6, "--temp", "-t", help="Temperature when a request names none."),
    top_p: float = typer.Option(0.95, "--top-p", help="Top-p when a request names none."),
    max_queue: int = typer.Option(8, "--max-queue", min=1, help="Requests waiting at most; more get a 503."),
    max_body_mb: float = typer.Option(4.0, "--max-body-mb", help="Largest request body in MB; larger get a 413."),
    rsa_preset: Optional[str] = typer.Option(None, "--rsa-preset",
                                             help="RSA parameters a request leaves unset: laptop (default), quick "
                                                  "or zyphra (Zyphra's recipe as published)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype of unquantized weights (default bfloat16)."),
) -> None:
    """Serve the model over an OpenAI-compatible API: /v1/chat/completions (streamed or not, reasoning in
    reasoning_content, tool calls in tool_calls; a body with Zyphra's RSA parameters, such as rsa_n, runs
    Markovian RSA), /v1/completions (raw text), /v1/models, /health. Ctrl-C stops it."""
    from .server import serve

    if max_body_mb <= 0:
        fail("--max-body-mb must be positive")
    serve(model or default_model, host, port, dtype=dtype, max_tokens=max_tokens, temperature=temp, top_p=top_p,
          max_queue=max_queue, max_body=int(max_body_mb * 1e6), rsa_preset=rsa_preset)


# --- rsa (Markovian RSA) ------------------------------------------------------------------------------------------


@app.command("rsa")
def rsa_command(
    problem: Optional[str] = typer.Argument(None, help="The problem ('-' reads it from stdin); not with --resume."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Hub repo id or local folder (any layout). "
                                        f"Default: {DEFAULT_MODEL}, {FITS}"),
    preset: Optional[str] = typer.Option(None, "--preset", help="zyphra (Zyphra's recipe as published), laptop (default) or quick."),
    n: Optional[int] = typer.Option(None, "--n", help="Population: rollouts a round (rsa_n)."),
    k: Optional[int] = typer.Option(None, "--k", help="Candidates an aggregation prompt shows (rsa_k)."),
    t: Optional[int] = typer.Option(None, "--t", help="Aggregation rounds after round 0 (rsa_t; 0 = one plain answer)."),
    tail_window_len: Optional[int] = typer.Option(None, "--tail-window-len", help="Words (or tokens) a candidate carries."),
    short_resp_len: Optional[int] = typer.Option(None, "--short-resp-len", help="New tokens a rollout in every round but the last."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="New tokens a rollout in the last round."),
    final_n: Optional[int] = typer.Option(None, "--final-n", help="Prompts in the last round (rsa_final_n; 0 = n)."),
    final_temp: Optional[float] = typer.Option(None, "--final-temp", help="The last round's temperature."),
    final_top_p: Optional[float] = typer.Option(None, "--final-top-p", help="The last round's top-p."),
    final_top_k: Optional[int] = typer.Option(None, "--final-top-k", help="The last round's top-k."),
    temp: Optional[float] = typer.Option(None, "--temp", help="Every other round's temperature (Zyphra's example: 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Every other round's top-p."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Every other round's top-k (0 = off)."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Every other round's min-p (0 = off)."),
    tail_source: Optional[str] = typer.Option(None, "--tail-source", help="served (answer, else reasoning) or reasoning."),
    tail_unit: Optional[str] = typer.Option(None, "--tail-unit", help="words (Zyphra's) or tokens (ids, not re-tokenised)."),
    final_vote: Optional[bool] = typer.Option(None, "--vote", help="Vote over the final answers (with --final-n > 1)."),
    unbounded: bool = typer.Option(False, "--unbounded", help="No token bound on word tails (Zyphra's prompts even for tails without whitespace)."),
    no_think: bool = typer.Option(False, "--no-think", help="Render the prompts with thinking off."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize the rollouts' KV cache to 8 or 4 bits: about half or a quarter of its memory (docs/kv-cache.md)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds the draws of candidates and every rollout's sampler (default 0)."),
    run_dir: Optional[str] = typer.Option(None, "--run", help="The run folder (default: a new one under ~/.cache/zaya-mlx/rsa)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this folder where it stopped."),
    presets: bool = typer.Option(False, "--presets", help="Show every preset's plan for this problem and model, then exit."),
    memory: Optional[float] = typer.Option(None, "--memory", min=0.1, max=1e5, help="Memory budget in GB (default: a safe share)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Most rollouts decoding together (slots)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt (round 0 only, as in Zyphra's proxy)."),
    show_text: bool = typer.Option(False, "--show-text", help="Print the final response's text."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the whole result (rounds, candidates, metadata) here."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype of unquantized weights (default bfloat16)."),
) -> None:
    """Markovian RSA as Zyphra runs it: rounds of rollouts, each aggregating candidates of the last round; the
    last round's response is the answer."""
    from pathlib import Path

    import mlx.core as mx
    from rich.console import Console

    from . import rsa
    from .generation import load
    from .loading import resolve_model_path
    from .rsa import distributed
    from .rsa_view import RSAView, render_result

    if problem == "-":
        problem = read_stdin()
    if resume is None and problem is None:
        fail("give a problem, or --resume DIR to continue a run")
    if resume is None and not problem.strip():
        fail("the problem is empty")
    check_output_file("--json", json_out)
    if max_batch is not None and max_batch < 1:
        fail(f"--max-batch must be at least 1, got {max_batch}")
    overrides = dict(
        rsa_n=n, rsa_k=k, rsa_t=t, tail_window_len=tail_window_len, short_resp_len=short_resp_len,
        max_tokens=max_tokens, rsa_final_n=final_n, final_temperature=final_temp, final_top_p=final_top_p,
        final_top_k=final_top_k, temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, tail_source=tail_source,
        tail_unit=tail_unit, final_vote=final_vote, bounded_context=False if unbounded else None,
        enable_thinking=False if no_think else None, kv_bits=kv_bits)

    def define():  # the run: from the arguments, or the folder it resumes (anything given must agree with it)
        messages = None
        if problem is not None:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": problem}]
        given = {k: v for k, v in overrides.items() if v is not None}
        if resume is None:
            return None, rsa.RSAParams.preset(preset, **given), seed or 0, messages, model, dtype
        folder = rsa.RunFolder.open(resume)
        folder.check(params=rsa.RSAParams.preset(preset, **given) if preset else folder.params.replace(**given),
                     seed=seed, messages=messages)
        return folder, folder.params, folder.seed, folder.messages, model or folder.model["path"], \
            dtype or folder.model.get("dtype")

    group = distributed.launched_group()  # under mlx.launch: host 0 keeps the folder and the view
    hosts = distributed.Hosts(group) if group is not None else None
    lead = hosts is None or hosts.rank == 0
    folder, params, seed, messages, model, dtype = define() if hosts is None else \
        distributed.share_run(hosts, define, model, dtype)
    model = model or default_model()  # each host's own default

    def identify():
        identity = rsa.model_identity(resolve_model_path(model), dtype)
        if folder is not None:
            folder.check(model=identity)
        return identity

    identity = identify() if hosts is None else distributed.check_same_model(hosts, identify)
    path = Path(identity["path"])
    console = Console(highlight=False, soft_wrap=True, quiet=not lead)
    with console.status(f"loading {model}…", spinner="dots") if console.is_terminal else contextlib.nullcontext():
        llm, tokenizer = load(path, dtype=dtype, decode=decode_options())
    budget = int(memory * 1e9) if memory else None
    device = f"{mx.default_device()} {mx.device_info().get('device_name', '')}".strip() + \
        (f" x{hosts.size} hosts" if hosts else "")
    runs_root = Path(run_dir).expanduser().parent if run_dir else folder.path.parent if folder else None
    rate = rsa.measured_rate(runs_root or rsa.default_runs_root(), identity["hash"], device)
    if presets:
        for name, preset_ in rsa.PRESETS.items():
            try:
                plan = rsa.plan_run(messages, preset_.params.replace(kv_bits=params.kv_bits), model=llm,
                                    tokenizer=tokenizer, max_batch=max_batch, memory_budget=budget)
                console.print(f"{name}: {preset_.description}\n  {plan.summary()}\n  {rsa.estimate_line(plan, rate)}",
                              markup=False)
            except ZayaError as e:
                console.print(f"{name}: {preset_.description}\n  does not fit: {e}", markup=False)
        return

    def make_plan():
        return rsa.plan_run(messages, params, model=llm, tokenizer=tokenizer, max_batch=max_batch, memory_budget=budget)

    plan = make_plan() if hosts is None else hosts.each(make_plan, share=lambda p: p.slots)[0]
    fresh = folder is None
    if fresh and lead:
        folder = rsa.RunFolder.create(run_dir or rsa.new_run_path(messages), params=params, seed=seed,
                                      messages=messages, model=identity)
    if not lead:  # another host: it decodes; host 0 shows the run and keeps it
        try:
            rsa.run(messages, params, model=llm, tokenizer=tokenizer, seed=seed, memory_budget=budget,
                    max_batch=max_batch, group=hosts)
        except KeyboardInterrupt:
            raise typer.Exit(130)
        return
    console.print(f"run folder: {folder.path}", style="dim", markup=False)
    left = plan.worst_case_tokens - sum(params.max_tokens_in(r.round) for r in folder.finished())
    view = RSAView(console, params, estimate=rsa.estimate_line(plan, rate, left))
    if hosts is not None:  # mlx.launch ends the other hosts with SIGTERM when one fails: save and say how to resume
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with view:
            result = rsa.run(messages, params, model=llm, tokenizer=tokenizer, seed=seed, on_event=view,
                             memory_budget=budget, max_batch=max_batch, journal=folder, group=hosts)
    except (KeyboardInterrupt, distributed.HostLost, RuntimeError) as e:
        # Ctrl-C; another host lost; or the back end refusing an op or a kernel mid-run (MLX raises RuntimeError):
        # the finished rollouts are in the run folder either way, so say how many and how to go on.
        stopped = isinstance(e, KeyboardInterrupt)
        why = "interrupted: " if stopped else f"error: {first_line(e)}; "
        # A second Ctrl-C, or mlx.launch ending the hosts that remain when one fails (SIGTERM), must not cut the
        # saving and its message short.
        previous = {stop: signal.signal(stop, signal.SIG_IGN) for stop in (signal.SIGINT, signal.SIGTERM)}
        folder.write_rates(tokens=view.state.tokens, seconds=view.state.elapsed(), slots=plan.slots, device=device)
        done = len(folder.finished())
        typer.echo(f"{why}{done} of {params.total_rollouts()} rollouts are saved in {folder.path}; resume with: "
                   f"zaya rsa --resume {shlex.quote(str(folder.path))}", err=True)
        if isinstance(e, distributed.HostLost):  # the run folder is durable; a group that lost a host can block in
            sys.stderr.flush()  # its teardown, so leave now
            sys.stdout.flush()
            os._exit(1)
        for stop, handler in previous.items():
            signal.signal(stop, handler)
        raise typer.Exit(130 if stopped else 1)
    except ZayaError:
        if fresh:
            folder.discard()  # refused before any rollout: leave nothing behind
        raise
    folder.write_rates(tokens=view.state.tokens, seconds=result.timings["total_s"], slots=plan.slots, device=device)
    render_result(console, result, show_text=show_text)
    if json_out:
        import dataclasses
        import json

        write_text_atomic(json_out, json.dumps(dataclasses.asdict(result), indent=1, default=str) + "\n")


# --- quantize ------------------------------------------------------------------------------------------------------


@app.command("quantize")
def quantize_command(
    src: str = typer.Argument(..., help="Hub repo id or local folder, in any layout the loader reads."),
    out: str = typer.Argument(..., help="The MLX folder to write (must not exist unless --force)."),
    recipe: str = typer.Option("mxfp4", "--recipe", "-r",
                               help="mxfp4 (default), affine4, affine8, mixed, nvfp4, mxfp8, or a recipe JSON file."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (atomically, at the end)."),
    shard_size: float = typer.Option(5.0, "--shard-size", help="GiB of weights per output shard."),
) -> None:
    """Quantize SRC into an MLX folder that zaya and mlx-lm load: quantized weights, config, tokenizer."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .quantization import quantize

    if shard_size <= 0:
        fail("--shard-size must be positive")
    bar = Progress(TextColumn("{task.description}", style="cyan"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True))
    task = bar.add_task("quantizing", total=None, start=False)

    def progress(what: str, done: int, total: int) -> None:  # the bar appears once the checks have passed
        if not bar.live.is_started:
            bar.start()
            bar.start_task(task)
        bar.update(task, description=what, completed=done, total=total)

    try:
        report = quantize(src, out, recipe=recipe, force=force, progress=progress,
                          max_shard_size=int(shard_size * (1 << 30)))
    finally:
        if bar.live.is_started:
            bar.stop()
    Console().print(report.table())


# --- bench ---------------------------------------------------------------------------------------------------------


@app.command("bench")
def bench_command(
    quant: Optional[str] = typer.Option(None, "--quant", "-q", help="Comma-separated weights: bf16 or a built-in recipe of `zaya quantize` (mxfp4, affine4, ...); default bf16,mxfp4; random weights only."),
    batch: str = typer.Option("1,8", "--batch", "-b", help="Comma-separated batch sizes."),
    context: str = typer.Option("256", "--context", help="Comma-separated tokens in the cache before decoding is timed (filled in chunks)."),
    rows: Optional[str] = typer.Option(None, "--rows", help="Batch x context pairs, e.g. 1x256,16x16384 (in place of every --batch with every --context)."),
    kv: str = typer.Option("bf16", "--kv", help="Comma-separated KV cache formats: bf16, 8, 4 (bits)."),
    steps: int = typer.Option(64, "--steps", min=1, help="Decode steps timed."),
    runs: int = typer.Option(3, "--runs", min=1, help="Timed decode runs; each rate is their median."),
    chunk: int = typer.Option(2048, "--prefill-chunk", min=1, help="Tokens a row of the batch per prefill chunk."),
    model_path: Optional[str] = typer.Option(None, "--model", help="Measure this checkpoint (folder or hub id) instead of random weights."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", min=0.001, max=1000, help="The device's memory bandwidth in TB/s, for the bound (default: known for H100 and H200)."),
    memory: Optional[float] = typer.Option(None, "--memory", min=0.1, max=1e5, help="Memory budget in GB for the plan (default: a share of the machine's)."),
    plain: bool = typer.Option(False, "--plain", help="Also time the model's plain-ops decode path (no fused kernels)."),
    small: bool = typer.Option(False, "--small", help="A tiny model of the same structure (a smoke run)."),
    experts: Optional[int] = typer.Option(None, "--experts", min=1, help="Fewer experts (a token still reads one): the same step, a model that builds in seconds, for A/B runs."),
    group_experts_from: Optional[str] = typer.Option(None, "--group-experts-from", help="Comma-separated batch sizes from which the expert kernel runs grouped by expert, or off; a fused run for each, e.g. off,8 (default: the model's, off)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON here."),
    markdown_out: Optional[str] = typer.Option(None, "--markdown", help="Write the results table (Markdown) here."),
) -> None:
    """ZAYA1-8B's decode and prefill speed on this machine: full-size random weights, or a checkpoint (--model)."""
    import json

    from .benchmark import UNQUANTIZED, markdown, run, to_dict, weight_choices
    from .kv_cache import parse_kv

    check_output_file("--json", json_out)
    check_output_file("--markdown", markdown_out)
    if model_path is not None and (quant or small or experts):
        raise ZayaError("--model measures the checkpoint as it is: drop --quant, --small and --experts")
    quants = tuple(q.strip() for q in (quant or "bf16,mxfp4").split(",") if q.strip())
    unknown = [q for q in quants if q not in (*UNQUANTIZED, *weight_choices())]
    if not quants or unknown:
        raise ZayaError(f"--quant {quant!r}: choose from {', '.join(weight_choices())}")
    if rows is not None:
        pairs = _positive_list(rows, "--rows", "batch x context pairs such as 1x256,16x16384", pairs=True)
    else:
        pairs = tuple((b, c) for b in _positive_list(batch, "--batch", "batch sizes")
                      for c in _positive_list(context, "--context", "token counts"))
    kv_formats = tuple(dict.fromkeys(parse_kv(k) for k in kv.split(",") if k.strip())) or (None,)
    grouping = _batch_thresholds(group_experts_from, "--group-experts-from")
    results = run(
        quants=quants, rows=pairs, kv_formats=kv_formats, steps=steps, small=small, plain=plain, experts=experts,
        runs=runs, chunk=chunk,
        bandwidth=bandwidth * 1e12 if bandwidth else None, model_path=model_path, memory=memory,
        options=decode_options(), group_experts_from=grouping, log=typer.echo,
    )
    table = markdown(results, "zaya bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
                     bandwidth * 1e12 if bandwidth else None)
    typer.echo(table)
    if json_out:
        write_text_atomic(json_out, json.dumps([to_dict(r) for r in results], indent=1) + "\n")
    if markdown_out:
        write_text_atomic(markdown_out, table)
    failed = [f for r in results for f in r.failed]
    if failed:
        raise ZayaError(f"{len(failed)} row(s) did not run, the first: {failed[0]}")


def _batch_thresholds(text: Optional[str], option: str) -> Optional[tuple]:
    """'off,8' -> (None, 8): a DecodeOptions batch threshold for each run (None: off); None for no option given."""
    if text is None:
        return None
    items = [g.strip().lower() for g in text.split(",") if g.strip()] or [""]
    return tuple(dict.fromkeys(None if g == "off" else _positive_list(g, option, "batch sizes or off")[0]
                               for g in items))


def _positive_list(text: str, option: str, what: str, pairs: bool = False) -> tuple:
    """'1,8' -> (1, 8); with pairs, '1x256,16x16384' -> ((1, 256), (16, 16384)); a ZayaError for anything else."""
    try:
        items = [p.strip() for p in text.split(",") if p.strip()]
        out = tuple(tuple(int(v) for v in p.lower().split("x")) if pairs else int(p) for p in items)
        flat = [v for p in out for v in (p if pairs else (p,))]
        ok = out and min(flat) >= 1 and (not pairs or all(len(p) == 2 for p in out))
    except ValueError:
        ok = False
    if not ok:
        raise ZayaError(f"{option} {text!r}: expected {what} (>= 1), comma-separated")
    return out


# --- doctor (what this machine runs) -------------------------------------------------------------------------------


@app.command("doctor")
def doctor_command(
    quant: str = typer.Option("mxfp4", "--quant", help="Weight format of the tiny random model the checks use."),
) -> None:
    """This machine, MLX's back end, each decode kernel against its reference, the decode path a model would take,
    and a short run's peak memory: a block to paste into a bug report. Downloads nothing."""
    from .benchmark import UNQUANTIZED, weight_choices
    from .doctor import diagnose

    if quant not in (*UNQUANTIZED, *weight_choices()):
        raise ZayaError(f"--quant {quant!r}: choose from {', '.join(weight_choices())}")
    report = diagnose(None if quant in UNQUANTIZED else quant, options=decode_options())
    typer.echo(report.text())
    raise typer.Exit(0 if all(k.ok for k in report.kernels) else 1)


def _one_line_warnings() -> None:
    """Show a library warning (the fused-decode check's fallback, say) as one line on stderr, not Python's
    file:line form with a source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        typer.echo(f"warning: {message}", err=True)

    warnings.showwarning = show


def main() -> None:
    _one_line_warnings()
    apply_mlx_settings()
    try:
        code = app(standalone_mode=False)  # usage errors come here, not to click's boxed message
    except ZayaError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # the system refused a file or a socket that no check named first (a full disk, a permission)
        typer.echo(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), err=True)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except Exception as e:
        message = getattr(e, "format_message", None)  # click's usage errors (typer vendors click in some versions)
        if message is None:
            raise
        if message():  # empty for `zaya` alone, which has shown the help
            typer.echo(f"error: {message()}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
