"""`zaya serve`: one ZAYA model behind an OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/models`).

A chat completion whose body carries Zyphra's RSA parameters runs Markovian RSA (`rsa_request.py`): not
streamed, Zyphra's form (a newline at once and every `heartbeat` seconds, then the JSON); streamed, progress
chunks as rollouts and rounds finish, then the answers.

Threads: each connection has a handler thread that reads, checks and tokenizes its request and writes the
response; the model runs on the main thread only, one job at a time from a bounded queue (MLX streams belong
to a thread, and a thread that ran MLX work can abort the process when it exits). A full queue is a 503.

What a careless client cannot do: send a body over `max_body` bytes (413, the body is not kept), ask for
another model (404 naming only the served model's id; nothing is loaded), send a prompt over the context
(400), or make it decode past the context (`max_tokens` is capped to the room left). When a client goes
away its job is cancelled at the next token. SIGINT and SIGTERM cancel the running job and end the process
cleanly. Built on the standard library's HTTP server, as mlx-lm's is; unlike mlx-lm's, it serves only the
model it was started with.
"""

from __future__ import annotations

import errno
import itertools
import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

import mlx_lm.server  # noqa: F401  (imported on the main thread: handler threads use its message helpers)

from . import rsa_request
from .config import DEFAULT_MODEL
from .errors import ZayaError
from .generation import context_limit, stream_generate, token_ids
from .openai_api import FINISH_REASONS, ApiError, ChatRequest, ChatStream, RawText, Request, TextRequest, chunk, \
    completion, new_id, prompt_ids, template_messages, text_completion, usage
from .sampling import check_sampling
from .sizes import format_bytes

CHECK_SECONDS = 0.5  # how often a handler checks that its client is still there
DRAIN_LIMIT = 1 << 28  # most bytes of an oversized body read (and dropped) so the client sees the 413


class Job:
    """Work for the main thread, and the events it sends back to the handler thread that waits for it."""

    def __init__(self, work: Callable[["Job"], None], label: str):
        self.work, self.label = work, label
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def put(self, kind: str, value=None) -> None:
        self.events.put((kind, value))

    def cancel(self) -> None:
        self.cancelled.set()


class ClientGone(Exception):
    pass


def client_gone(sock: socket.socket) -> bool:
    """True when the peer has closed the connection (readable with nothing to read, or reset)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Server:
    """The listening socket, the served model, the job queue. `run()` serves until SIGINT or SIGTERM."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, *, max_queue: int = 8,
                 max_body: int = 4 << 20, max_tokens: int = 16384, temperature: float = 0.6, top_p: float = 0.95,
                 rsa_preset: Optional[str] = None, heartbeat: float = 10.0,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)):
        from .rsa import DEFAULT_PRESET, PRESETS

        if (rsa_preset or DEFAULT_PRESET) not in PRESETS:
            raise ZayaError(f"unknown RSA preset {rsa_preset!r}: use one of {', '.join(PRESETS)}")
        check_sampling(temperature, top_p)  # the defaults of every request: refused here, not in each answer
        self.max_body, self.max_tokens, self.temperature, self.top_p = max_body, max_tokens, temperature, top_p
        self.rsa_preset, self.heartbeat, self.log = rsa_preset or DEFAULT_PRESET, heartbeat, log
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.running: Optional[Job] = None
        self.stopping = threading.Event()
        self.model = self.tokenizer = None
        self.model_id, self.names, self.context = "", set(), 0
        self.httpd = _bind(host, port, self)

    @property
    def address(self) -> tuple:
        return self.httpd.server_address[:2]

    def load(self, model: str, dtype=None) -> None:
        """Load the model (here, before serving: a model that does not load never starts a server), and make its
        first call (`Model.prepare_decode`), so that the first request does not wait for it."""
        from .generation import load
        from .tokenizer import require_tokenizer

        self.model, self.tokenizer = load(model, dtype=dtype)
        require_tokenizer(self.tokenizer)
        self.model.prepare_decode()
        path = Path(model).expanduser()
        self.model_id = path.name if path.exists() else str(model)
        self.names = {self.model_id, str(model), DEFAULT_MODEL, DEFAULT_MODEL.split("/")[1]}
        self.context = context_limit(self.model)

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.jobs.maxsize} requests waiting); retry later",
                           code="queue_full") from None

    def health(self) -> dict:
        return {"status": "stopping" if self.stopping.is_set() else "ok", "model": self.model_id,
                "running": int(self.running is not None), "queued": self.jobs.qsize()}

    # --- the main thread ----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM; jobs run here, on the calling (main) thread."""
        def stop(signum, frame):
            self.stopping.set()
            if self.running is not None:
                self.running.cancel()

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        http = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        http.start()
        host, port = self.address
        self.log(f"serving {self.model_id} on http://{host}:{port}/v1 (Ctrl-C stops)")
        try:
            while not self.stopping.is_set():
                try:
                    job = self.jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
                self._run_job(job)
        finally:
            self.httpd.shutdown()
            while not self.jobs.empty():
                job = self.jobs.get_nowait()
                job.put("error", ApiError(503, "the server is shutting down"))
                job.put("end")
            self.httpd.server_close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.log("stopped")

    def _run_job(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.put("end")
            return
        self.running = job
        try:
            job.work(job)
        except ZayaError as e:
            job.put("error", ApiError(400, str(e)))
        except Exception as e:  # a bug must not take the server down: the client gets a 500, the log the trace
            self.log(f"{job.label}: internal error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            job.put("error", ApiError(500, f"internal error: {type(e).__name__}: {e}"))
        finally:
            self.running = None
            job.put("end")

    def generate(self, job: Job, ids: list, request: Request, max_tokens: int) -> None:
        stream = stream_generate(self.model, self.tokenizer, ids, max_tokens=max_tokens,
                                 temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                                 min_p=request.min_p, repetition_penalty=request.repetition_penalty,
                                 seed=request.seed, stop=request.stop)
        r = None
        with closing(stream):
            for r in stream:
                job.put("token", r)
                if job.cancelled.is_set():
                    self._cancelled(job, f"cancelled after {r.generation_tokens} of {max_tokens} tokens")
                    return
        if r is not None:
            self.log(f"{job.label}: prompt {r.prompt_tokens} tokens at {r.prompt_tps:.1f} tok/s, "
                     f"{r.generation_tokens} generated at {r.generation_tps:.1f} tok/s, peak memory "
                     f"{format_bytes(r.peak_memory_gb * 1e9)} ({r.finish_reason})")

    def run_rsa(self, job: Job, messages: list, run) -> None:
        from . import rsa

        def on_event(event):
            shown = rsa_request.progress(event)
            if shown is not None:
                job.put("progress", shown)

        try:
            result = rsa.run(messages, run.params, model=self.model, tokenizer=self.tokenizer, seed=run.seed,
                             on_event=on_event, cancel=job.cancelled, max_batch=run.max_batch)
        except rsa.Cancelled:
            self._cancelled(job, "RSA run cancelled")
            return
        p, t = run.params, result.timings
        self.log(f"{job.label}: RSA N {p.rsa_n}, K {p.rsa_k}, T {p.rsa_t}: {result.tokens_generated} tokens in "
                 f"{t['total_s']:.1f} s ({t['tokens_per_s']:.1f} tok/s), {result.plan.slots} slots")
        job.put("result", result)

    def _cancelled(self, job: Job, what: str) -> None:
        """Log a cancelled job; one cancelled by the server stopping tells its client so (a 503 or an error
        event), rather than passing a cut answer off as finished."""
        if self.stopping.is_set():
            self.log(f"{job.label}: {what} (server stopping)")
            job.put("error", ApiError(503, "the server stopped before the answer was complete"))
        else:
            self.log(f"{job.label}: {what} (client gone)")


def _bind(host: str, port: int, app: Server) -> ThreadingHTTPServer:
    class HTTPServer(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    HTTPServer.app = app
    try:
        return HTTPServer((host, port), Handler)
    except OverflowError:  # the socket module's word for a port out of range
        raise ZayaError(f"cannot listen on {host}:{port}: a port is a number from 0 to 65535") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ZayaError(f"port {port} on {host} is in use (another server?): stop it or pass --port") from None
        raise ZayaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a client may take to send its request

    @property
    def app(self) -> Server:
        return self.server.app

    def log_message(self, format, *args):
        self.app.log(f"{self.client_address[0]} {format % args}")

    # --- plumbing -----------------------------------------------------------------------------------------------

    def _send_json(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: ApiError, close: bool = False) -> None:
        try:
            self._send_json(e.status, e.body(), close=close)
        except OSError:
            self.close_connection = True

    def _read_body(self) -> dict:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not read)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length[:40]!r}") from None
        if n > self.app.max_body:
            self._drain(n)
            raise ApiError(413, f"the body is {n:,} bytes, over this server's limit of {self.app.max_body:,} "
                           "(zaya serve --max-body-mb)")
        try:
            body = json.loads(self.rfile.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _drain(self, n: int) -> None:
        """Read and drop an oversized body (up to DRAIN_LIMIT) so the client reads the 413 instead of a reset."""
        self.close_connection = True
        left = min(n, DRAIN_LIMIT)
        try:
            while left > 0:
                got = self.rfile.read(min(left, 1 << 16))
                if not got:
                    break
                left -= len(got)
        except OSError:
            pass

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is None or name in self.app.names:
            return
        shown = name[:100] if isinstance(name, str) else repr(name)[:100]
        raise ApiError(404, f"the model {shown!r} is not served here; this server serves {self.app.model_id!r} "
                       "(GET /v1/models)", code="model_not_found")

    def _events(self, job: Job, ticks: bool = False):
        """The job's events as they come (and `("tick", None)` when none came for a while, with `ticks`);
        cancels the job and raises ClientGone if the client goes away."""
        checked = time.monotonic()
        while True:
            try:
                kind, value = job.events.get(timeout=CHECK_SECONDS)
            except queue.Empty:
                kind = value = None
            if time.monotonic() - checked >= CHECK_SECONDS:
                checked = time.monotonic()
                if client_gone(self.connection):
                    job.cancel()
                    raise ClientGone()
            if kind == "end":
                return
            if kind is not None or ticks:
                yield kind or "tick", value

    def _write(self, job: Job, data: bytes) -> None:
        """Write part of a response; a client that has gone cancels the job (ClientGone)."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            job.cancel()
            raise ClientGone() from None

    def _write_event(self, job: Job, obj) -> None:
        self._write(job, f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

    # --- routes -------------------------------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        models = {"object": "list", "data": [self._model_card()]}
        if path == "/v1/models":
            self._send_json(200, models)
        elif path == f"/v1/models/{self.app.model_id}":
            self._send_json(200, self._model_card())
        elif path == "/health":
            self._send_json(200, self.app.health())
        else:
            self._send_error(ApiError(404, f"no route GET {path[:100]}"))

    def _model_card(self) -> dict:
        return {"id": self.app.model_id, "object": "model", "created": 0, "owned_by": "zaya-mlx",
                "max_model_len": self.app.context}

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            route = {"/v1/chat/completions": self._chat, "/chat/completions": self._chat,
                     "/v1/completions": self._text, "/completions": self._text}.get(path)
            if route is None:
                self._drain(int(self.headers.get("Content-Length") or 0))
                raise ApiError(404, f"no route POST {path[:100]} (this server answers /v1/chat/completions and "
                               "/v1/completions)")
            body = self._read_body()
            self._check_model(body)
            route(body)
        except ApiError as e:
            self._send_error(e, close=self.close_connection)
        except (ClientGone, ConnectionError):
            self.close_connection = True
        except ValueError as e:
            self._send_error(ApiError(400, str(e)), close=True)

    @staticmethod
    def _check_sampling(request: Request) -> None:
        try:
            check_sampling(request.temperature, request.top_p, request.top_k, request.min_p, request.repetition_penalty)
        except ZayaError as e:
            raise ApiError(400, str(e)) from None

    def _generation(self, ids: list, request: Request) -> Job:
        """Queue the generation of `ids` (checked against the context; max_tokens capped to the room left)."""
        app = self.app
        room = app.context - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, over the context limit of {app.context} tokens; "
                           "shorten it", code="context_length_exceeded")
        max_tokens = min(request.max_tokens or app.max_tokens, room)
        job = Job(lambda job: app.generate(job, ids, request, max_tokens), f"request {new_id()[9:17]}")
        app.submit(job)
        return job

    def _responses(self, job: Job):
        """A non-streamed request's generation responses, all of them (an error raises)."""
        responses = []
        for kind, value in self._events(job):
            if kind == "error":
                raise value
            responses.append(value)
        if not responses:
            raise ApiError(503, "the server is shutting down")
        return responses

    def _stream(self, job: Job):
        """Start an event stream once the job's first event is in (an error before it is still an HTTP status);
        the job's events, that one included."""
        events = self._events(job)
        first = next(events, None)
        if first is not None and first[0] == "error":
            raise first[1]
        self._start_events()
        return itertools.chain([first] if first is not None else [], events)

    def _chat(self, body: dict) -> None:
        app = self.app
        request = ChatRequest.from_body(body, app.temperature, app.top_p)
        self._check_sampling(request)
        if rsa_request.is_rsa(body):
            return self._rsa(body, request)
        if request.n != 1:
            raise ApiError(400, "n must be 1: this server writes one choice per request (RSA requests take n as rsa_n)")
        ids = prompt_ids(app.tokenizer, request)
        job = self._generation(ids, request)
        if request.stream:
            self._stream_chat(job, request, len(ids))
            return
        stream = ChatStream(request.tools)
        responses = self._responses(job)
        for r in responses:
            stream.feed(r)
        stream.flush()
        self._send_json(200, completion(new_id(), app.model_id, stream.message(),
                                        stream.finish_reason(responses[-1].finish_reason),
                                        usage(len(ids), stream.completion_tokens)))

    def _text(self, body: dict) -> None:
        """A text completion: the raw prompt (no chat template), the model's text as written, think tags kept."""
        from .tokenizer import encode_prompt

        app = self.app
        request = TextRequest.from_body(body, app.temperature, app.top_p)
        self._check_sampling(request)
        prompt = encode_prompt(app.tokenizer, request.prompt) if isinstance(request.prompt, str) else request.prompt
        try:
            ids = token_ids(prompt, app.model.args.vocab_size)
        except ZayaError as e:
            raise ApiError(400, str(e)) from None
        job = self._generation(ids, request)
        raw, rid, model = RawText(app.tokenizer, ids), f"cmpl-{new_id()[9:]}", app.model_id
        if request.stream:
            last = None
            for kind, value in self._stream(job):
                if kind == "error":
                    self._write_event(job, value.body())
                    return
                last, text = value, raw.feed(value)
                if text:
                    self._write_event(job, text_completion(rid, model, text))
            self._write_event(job, text_completion(rid, model, "", FINISH_REASONS.get(last and last.finish_reason, "stop")))
            if request.include_usage:
                self._write_event(job, {**text_completion(rid, model, None),
                                        "usage": usage(len(ids), last.generation_tokens if last else 0)})
            self._write_event(job, "[DONE]")
            return
        responses = self._responses(job)
        text = "".join(raw.feed(r) for r in responses)
        out = text_completion(rid, model, text, FINISH_REASONS.get(responses[-1].finish_reason, "stop"))
        self._send_json(200, {**out, "usage": usage(len(ids), responses[-1].generation_tokens)})

    # --- RSA ----------------------------------------------------------------------------------------------------

    def _rsa(self, body: dict, request: ChatRequest) -> None:
        """Check the run (parameters, memory plan) before answering, so that a refusal is a 4xx; then queue it."""
        from . import rsa

        app = self.app
        if request.repetition_penalty not in (None, 1):
            raise ApiError(400, "repetition_penalty is not implemented for RSA requests: leave it unset")
        sampling = {k: getattr(request, k) for k in ("temperature", "top_p", "top_k", "min_p") if body.get(k) is not None}
        run = rsa_request.parse(body, app.rsa_preset, sampling, request.max_tokens, request.enable_thinking)
        messages = template_messages(request)
        try:
            rsa.plan_run(messages, run.params, model=app.model, tokenizer=app.tokenizer, max_batch=run.max_batch)
        except ZayaError as e:
            raise ApiError(400, rsa_request.in_request_terms(str(e))) from None
        job = Job(lambda job: app.run_rsa(job, messages, run), f"RSA request {new_id()[9:17]}")
        app.submit(job)
        if request.stream:
            self._stream_rsa(job, run)
        else:
            self._complete_rsa(job, run)

    def _complete_rsa(self, job: Job, run) -> None:
        """Zyphra's form: a newline at once and every `heartbeat` seconds while the run lasts, then the JSON."""
        model = self.app.model_id
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._write(job, b"\n")
        beat = time.monotonic()
        answer = rsa_request.error_response("the server is shutting down", model)
        for kind, value in self._events(job, ticks=True):
            if kind == "result":
                answer = rsa_request.response(value, run, model)
            elif kind == "error":
                answer = rsa_request.error_response(value.message, model)
            elif time.monotonic() - beat >= self.app.heartbeat:
                self._write(job, b"\n")
                beat = time.monotonic()
        self._write(job, json.dumps(answer).encode())

    def _stream_rsa(self, job: Job, run) -> None:
        """Progress chunks (no choices, an `rsa_progress` object) as rollouts and rounds finish, then the last
        round's responses as choices, then a chunk with the usage and `rsa_metadata`."""
        rid, model = new_id(), self.app.model_id
        self._start_events()
        beat = time.monotonic()
        for kind, value in self._events(job, ticks=True):
            if kind == "progress":
                self._write_event(job, {**chunk(rid, model, None), "rsa_progress": value})
            elif kind == "error":
                self._write_event(job, value.body())
                return
            elif kind == "result":
                whole = rsa_request.response(value, run, model)
                for choice in whole["choices"]:
                    delta = {k: v for k, v in choice["message"].items() if v is not None}
                    self._write_event(job, chunk(rid, model, delta, index=choice["index"]))
                    self._write_event(job, chunk(rid, model, {}, choice["finish_reason"], index=choice["index"]))
                extra = {k: whole[k] for k in ("usage", "rsa_metadata", "aggregation_prompt") if k in whole}
                self._write_event(job, {**chunk(rid, model, None), **extra})
                self._write_event(job, "[DONE]")
                return
            if time.monotonic() - beat >= self.app.heartbeat:
                self._write(job, b": keepalive\n\n")
                beat = time.monotonic()

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _stream_chat(self, job: Job, request: ChatRequest, n_prompt: int) -> None:
        rid, model, stream, last = new_id(), self.app.model_id, ChatStream(request.tools), None
        events = self._stream(job)
        self._write_event(job, chunk(rid, model, {"role": "assistant", "content": ""}))
        for kind, value in events:
            if kind == "error":
                self._write_event(job, value.body())
                return
            delta = stream.feed(value)
            last = value
            if delta:
                self._write_event(job, chunk(rid, model, delta))
        finish = stream.finish_reason(last.finish_reason if last else None)
        self._write_event(job, chunk(rid, model, stream.flush(), finish))
        if request.include_usage:
            self._write_event(job, {**chunk(rid, model, None), "usage": usage(n_prompt, stream.completion_tokens)})
        self._write_event(job, "[DONE]")


def serve(model: str | Callable[[], str], host: str = "127.0.0.1", port: int = 8080, dtype=None, **options) -> None:
    """Bind first (a taken port fails at once), load the model (a model that does not load starts nothing),
    then serve until SIGINT or SIGTERM. model: a path or hub id, or a function that gives one, called once the
    port is bound (the default model, which may be downloaded first)."""
    server = Server(host, port, **options)
    try:
        if callable(model):
            model = model()
        t0 = time.perf_counter()
        server.log(f"loading {model}…")
        server.load(model, dtype=dtype)
        server.log(f"loaded in {time.perf_counter() - t0:.1f} s; context {server.context} tokens")
        server.run()
    finally:
        server.httpd.server_close()
