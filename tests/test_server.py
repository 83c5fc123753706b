"""`zaya serve` driven by the official `openai` client: one real server process for the module, on a free local
port, serving a tiny checkpoint (`serve_scripted.py`: prompts with a `~script~` make the model write the script).

The short-lived `zaya serve` processes (port taken, a model that does not load, SIGINT) go through the CLI.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from fixtures import write_fixture_model

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 200_000
CONTEXT = 1024  # room for a tool schema, a call and its answer
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "metric": {"type": "boolean"}}, "required": ["city"]}}}]
CALL = ("<zyphra_tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</zyphra_tool_call>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, seconds: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def health(port: int):
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    except OSError:
        return None


class Served:
    """A server process, its port and its log."""

    def __init__(self, args: list, log: Path, port: int):
        self.port, self.log_path, self.log_file = port, log, open(log, "w")
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log_file, env=ENV, cwd=ROOT)
        wait_until(lambda: health(port) is not None or self.process.poll() is not None, what="the server")
        assert self.process.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text()

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, **kwargs)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.wait()

    def wait(self) -> int:
        code = self.process.wait(timeout=30)
        self.log_file.close()
        return code


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "zaya-tiny"
    write_fixture_model(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return path


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    port = free_port()
    served = Served([sys.executable, str(ROOT / "tests" / "serve_scripted.py"), str(folder), str(port), "1",
                     str(MAX_BODY)], tmp_path_factory.mktemp("log") / "server.log", port)
    yield served
    code = served.stop(signal.SIGTERM)
    assert code == 0 and "stopped" in served.log() and "terminate called" not in served.log(), served.log()


def script(text: str) -> list:
    return [{"role": "user", "content": f"~{text}~"}]


# --- plain requests ---------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(server, folder):
    models = server.client().models.list().data
    assert [m.id for m in models] == [folder.name]
    assert server.client().models.retrieve(folder.name).id == folder.name


def test_plain_completion_matches_the_python_api(server, folder):
    from zaya_mlx.generation import generate, load
    from zaya_mlx.tokenizer import apply_chat_template

    messages = [{"role": "user", "content": "hello the world"}]
    reply = server.client().chat.completions.create(model="Zyphra/ZAYA1-8B", messages=messages, max_tokens=6,
                                                    temperature=0)
    model, tokenizer = load(folder, dtype="float32")
    ids = apply_chat_template(tokenizer, messages)
    expected = generate(model, tokenizer, ids, max_tokens=6)
    assert reply.choices[0].message.content == expected.answer
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 6)

    # vLLM's repetition_penalty, and OpenAI's parameters at the values that ask for nothing (clients send them)
    reply = server.client().chat.completions.create(model="Zyphra/ZAYA1-8B", messages=messages, max_tokens=6,
                                                    temperature=0, presence_penalty=0, logprobs=False,
                                                    response_format={"type": "text"},
                                                    extra_body={"repetition_penalty": 3.0})
    penalised = generate(model, tokenizer, ids, max_tokens=6, repetition_penalty=3.0)
    assert penalised.text != expected.text  # the penalty changes this prompt's greedy answer
    assert reply.choices[0].message.content == penalised.answer


@pytest.mark.parametrize("option", [{"logit_bias": {"5": 100}}, {"presence_penalty": 0.5}, {"frequency_penalty": 1},
                                    {"logprobs": True}, {"top_logprobs": 2},
                                    {"response_format": {"type": "json_object"}}])
def test_parameters_not_implemented_are_refused_not_ignored(server, option):
    name = next(iter(option))
    with pytest.raises(openai.BadRequestError, match=f"{name} is not implemented by this server: leave it unset"):
        server.client().chat.completions.create(model="ZAYA1-8B", messages=script("x"), max_tokens=2, **option)


def test_a_developer_message_is_the_system_turn_and_an_unknown_role_is_refused(server, folder):
    """OpenAI's newer clients send the system prompt as role "developer"; ZAYA's template knows only "system" (any
    other role becomes a turn of that name, which the model never saw)."""
    from zaya_mlx.generation import generate, load
    from zaya_mlx.tokenizer import apply_chat_template

    system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello the world"}]
    developer = [{"role": "developer", "content": "Be terse."}, system[1]]
    reply = server.client().chat.completions.create(model="ZAYA1-8B", messages=developer, max_tokens=6, temperature=0)
    model, tokenizer = load(folder, dtype="float32")
    ids = apply_chat_template(tokenizer, system)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == generate(model, tokenizer, ids, max_tokens=6).answer
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.role must be one of system, developer, user, "
                                                     r"assistant, tool, got 'usr'"):
        server.client().chat.completions.create(model="ZAYA1-8B", max_tokens=2,
                                                messages=[system[0], {"role": "usr", "content": "hi"}])


def test_streamed_completion(server, folder):
    from transformers import AutoTokenizer

    stream = server.client().chat.completions.create(model=server_name(server), messages=script("Four."),
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Four."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    n_text = len(AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False))
    assert chunks[-1].usage.completion_tokens == n_text + 1  # and the end of turn


def server_name(server) -> str:
    return server.client().models.list().data[0].id


def test_reasoning_is_split_from_the_answer(server):
    messages = script("<think>2 and 2 make 4.</think>It is 4.")
    reply = server.client().chat.completions.create(model="ZAYA1-8B", messages=messages)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == ("2 and 2 make 4.", "It is 4.")
    chunks = list(server.client().chat.completions.create(model="ZAYA1-8B", messages=messages, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "2 and 2 make 4."
    assert "".join(d.content or "" for d in deltas) == "It is 4."


def test_enable_thinking_goes_to_the_chat_template(server, folder):
    from transformers import AutoTokenizer

    client, messages = server.client(), [{"role": "user", "content": "hi"}]
    on = client.chat.completions.create(model="ZAYA1-8B", messages=messages, max_tokens=1)
    off = client.chat.completions.create(model="ZAYA1-8B", messages=messages, max_tokens=1,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    closed_block = AutoTokenizer.from_pretrained(folder).encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert off.usage.prompt_tokens - on.usage.prompt_tokens == len(closed_block)


# --- tool calls -------------------------------------------------------------------------------------------------


def test_tool_call_round_trip(server, folder):
    from transformers import AutoTokenizer

    client = server.client()
    messages = script(f"Let me look.{CALL}")
    reply = client.chat.completions.create(model="ZAYA1-8B", messages=messages, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3, "metric": True}  # typed by the schema

    chunks = list(client.chat.completions.create(model="ZAYA1-8B", messages=messages, tools=TOOLS, stream=True))
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [
        (0, "get_weather", {"city": "Paris", "days": 3, "metric": True})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me look."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result go back; the model (scripted by the tool's result) answers from it.
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "~Sunny in Paris.~"}]
    answer = client.chat.completions.create(model="ZAYA1-8B", messages=history, tools=TOOLS)
    assert answer.choices[0].message.content == "Sunny in Paris."
    assert answer.choices[0].finish_reason == "stop"
    rendered = [*messages, {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3,
                                                                             "metric": True}}}]},
        {"role": "tool", "content": "~Sunny in Paris.~"}]
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(rendered, tools=TOOLS, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False)
    assert answer.usage.prompt_tokens == len(ids)


def test_unclosed_tool_call_stays_text(server):
    reply = server.client().chat.completions.create(model="ZAYA1-8B", messages=script(CALL[:40]), tools=TOOLS)
    assert reply.choices[0].message.content == CALL[:40] and not reply.choices[0].message.tool_calls


# --- faults -----------------------------------------------------------------------------------------------------


def test_client_named_folder_is_404_and_not_loaded(server, folder, tmp_path):
    other = tmp_path / "other-model"
    write_fixture_model(other, seed=1)
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model=str(other), messages=script("x"))
    assert str(folder) not in str(e.value) and "zaya-tiny" in str(e.value)


def test_prompt_over_the_context_is_400(server):
    with pytest.raises(openai.BadRequestError, match=f"over the context limit of {CONTEXT} tokens"):
        server.client().chat.completions.create(model="ZAYA1-8B", messages=[{"role": "user", "content": "hi " * 600}])


def test_max_tokens_is_capped_to_the_room_left(server):
    reply = server.client().chat.completions.create(model="ZAYA1-8B", max_tokens=10**9,
                                                    messages=[{"role": "user", "content": "hi " * 495}])
    assert reply.usage.total_tokens == CONTEXT and reply.choices[0].finish_reason == "length"


def test_malformed_bodies_are_400(server):
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        server.client().chat.completions.create(model="ZAYA1-8B", messages="hello")
    with pytest.raises(openai.BadRequestError, match="temperature must be"):
        server.client().chat.completions.create(model="ZAYA1-8B", messages=script("x"), temperature="hot")
    with pytest.raises(openai.BadRequestError, match="token id 1000000000 is outside the model's vocabulary"):
        server.client().completions.create(model="ZAYA1-8B", prompt=[1, 10**9])  # past the embedding: never read
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", "/v1/chat/completions", body=b'{"messages": [', headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 400 and "not valid JSON" in json.loads(response.read())["error"]["message"]


def test_oversized_body_is_413(server):
    with pytest.raises(openai.APIStatusError, match="over this server's limit") as e:
        server.client().chat.completions.create(model="ZAYA1-8B", messages=[{"role": "user", "content": "x" * 300_000}])
    assert e.value.status_code == 413
    assert health(server.port)["status"] == "ok"


def _cancelled_lines(server) -> list:
    return [line for line in server.log().splitlines() if "cancelled after" in line]


def test_disconnect_cancels_streamed_and_waiting_requests(server):
    before = len(_cancelled_lines(server))
    stream = server.client().chat.completions.create(model="ZAYA1-8B", max_tokens=10**9, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}])
    next(iter(stream))
    stream.close()
    wait_until(lambda: len(_cancelled_lines(server)) > before, 20, "the streamed request's cancellation")
    with server.client(timeout=0.5) as client, pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="ZAYA1-8B", max_tokens=10**9, messages=[{"role": "user", "content": "hi"}])
    wait_until(lambda: len(_cancelled_lines(server)) > before + 1, 20, "the waiting request's cancellation")
    for line in _cancelled_lines(server)[before:]:
        done, of = line.split("cancelled after ")[1].split(" tokens")[0].split(" of ")
        assert int(done) < int(of) and "client gone" in line


def test_full_queue_is_503(server):
    client = server.client()
    running = client.chat.completions.create(model="ZAYA1-8B", max_tokens=10**9, stream=True,
                                             messages=[{"role": "user", "content": "hi"}])
    next(iter(running))
    waiting = threading.Thread(target=lambda: client.chat.completions.create(model="ZAYA1-8B", messages=script("ok")))
    waiting.start()
    wait_until(lambda: health(server.port)["queued"] == 1, 20, "the second request to queue")
    with pytest.raises(openai.InternalServerError, match="busy") as e:
        client.chat.completions.create(model="ZAYA1-8B", messages=script("x"))
    assert e.value.status_code == 503
    running.close()
    waiting.join(timeout=30)
    assert not waiting.is_alive()


# --- the command ------------------------------------------------------------------------------------------------


def zaya_serve(*args) -> list:
    return [sys.executable, "-m", "zaya_mlx.cli", "serve", *map(str, args)]


def test_port_taken_is_one_line_and_exit_1(folder, run_zaya):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_zaya("serve", "--model", folder, "--port", port)
    assert code == 1 and out == ""
    assert err == f"error: port {port} on 127.0.0.1 is in use (another server?): stop it or pass --port\n"


@pytest.mark.parametrize("option,message", [
    (["--port", "65536"], "error: cannot listen on 127.0.0.1:65536: a port is a number from 0 to 65535\n"),
    (["--temp", "-1"], "error: temperature must be a number >= 0 (0 is greedy), got -1.0\n"),
    (["--top-p", "2"], "error: top-p must be in (0, 1], got 2.0\n")])
def test_bad_settings_are_one_line_before_the_default_model_is_fetched(option, message, run_zaya, monkeypatch):
    from zaya_mlx import cli

    fetched = []
    monkeypatch.setattr(cli, "default_model", lambda: fetched.append(1) or "Zyphra/ZAYA1-8B")
    code, out, err = run_zaya("serve", *option)
    assert (code, out, err) == (1, "", message)
    assert not fetched  # nothing downloaded for a server that could not start


def test_loading_makes_the_models_first_call_before_serving(folder, monkeypatch):
    """On a GPU the first call compiles the fused step's kernels and checks them: at load, not at the first request."""
    from zaya_mlx.decode.step import FusedDecoder
    from zaya_mlx.server import Server

    called = []
    enabled = FusedDecoder.enabled
    monkeypatch.setattr(FusedDecoder, "enabled", lambda self, model: called.append(model) or enabled(self, model))
    server = Server("127.0.0.1", free_port())
    try:
        server.load(str(folder))
    finally:
        server.httpd.server_close()
    assert called == [server.model]


def test_model_that_does_not_load_starts_no_server(folder, tmp_path, run_zaya):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    port = free_port()
    code, _, err = run_zaya("serve", "--model", broken, "--port", port)
    assert code == 1 and err.splitlines()[-1].startswith("error: ") and shard.name in err.splitlines()[-1]
    assert "serving" not in err
    with socket.socket() as again:  # the port was let go
        again.bind(("127.0.0.1", port))


def readme_client_code() -> str:
    """The README's first client example (its Serving section)."""
    section = (ROOT / "README.md").read_text().split("## Serving")[1]
    return section.split("```python\n")[1].split("```")[0]


def test_readme_client_code_and_sigint_end_the_command_cleanly(folder, tmp_path, capsys):
    port = free_port()
    served = Served(zaya_serve("--model", folder, "--port", port, "--max-tokens", 4), tmp_path / "log", port)
    try:
        code = readme_client_code()
        assert "http://127.0.0.1:8080/v1" in code
        exec(code.replace("http://127.0.0.1:8080/v1", f"http://127.0.0.1:{port}/v1"), {})
        reply = served.client().chat.completions.create(model=folder.name,
                                                        messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens == 4  # the server's --max-tokens
        assert capsys.readouterr().out.startswith("None ")  # the tiny model's answer has no reasoning
        running = served.client().chat.completions.create(model=folder.name, max_tokens=10**9, stream=True,
                                                          messages=[{"role": "user", "content": "hi"}])
        chunks = iter(running)
        next(chunks)
        served.process.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match="the server stopped before the answer was complete"):
            list(chunks)
    finally:
        if served.process.poll() is None:  # a failed check still stops the server
            served.process.send_signal(signal.SIGINT)
    assert served.wait() == 0
    assert served.log().splitlines()[-1] == "stopped" and "Traceback" not in served.log()
    assert health(port) is None


def test_help_shows_curl_and_openai_examples(run_zaya):
    code, out, _ = run_zaya("serve", "--help")
    assert code == 0 and "curl http://127.0.0.1:8080/v1/chat/completions" in out and "from openai import" in out


# --- RSA requests (Zyphra's parameter names, aliases and response) ------------------------------------------------

# Zyphra's proxy's aliases: rsa_short_resp_len, rsa_tail_window_len, final_aggregation_prompts (= rsa_final_n).
RSA = {"rsa_n": 2, "rsa_k": 2, "rsa_t": 1, "rsa_short_resp_len": 8, "rsa_tail_window_len": 16,
       "final_aggregation_prompts": 2, "return_aggregation_prompt": True}
QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def test_rsa_request_with_zyphra_parameters(server):
    reply = server.client().chat.completions.create(model="Zyphra/ZAYA1-8B", messages=QUESTION, max_tokens=6,
                                                    temperature=0, seed=3, extra_body=RSA)
    metadata = reply.rsa_metadata
    assert {k: metadata[k] for k in ("rsa_iterations", "rsa_k", "rsa_n", "tail_window_len", "short_resp_len",
                                     "rsa_summarize", "rsa_tail_window", "use_pacore")} == {
        "rsa_iterations": 1, "rsa_k": 2, "rsa_n": 2, "tail_window_len": 16, "short_resp_len": 8,
        "rsa_summarize": False, "rsa_tail_window": True, "use_pacore": False}
    # Rollouts of the random tiny model run to their limit: 8 tokens in round 0, max_tokens in the last round.
    assert metadata["rsa_token_count_history"] == [8.0, 6.0] and metadata["rsa_seed"] == 3
    assert len(reply.choices) == 2 and reply.usage.completion_tokens == 2 * 8 + 2 * 6
    assert [c.finish_reason for c in reply.choices] == ["length", "length"]
    (prompt,) = reply.aggregation_prompt
    # Zyphra's aggregation prompt for K = 2 (their proxy's create_aggregation_prompt).
    assert prompt["content"].startswith("You are given a math problem and several candidate solutions.")
    assert "[[ Problem ]]:\n\nWhat is 2+2?\n" in prompt["content"] and "---- Solution 2 ----" in prompt["content"]


def test_rsa_answer_comes_after_whitespace_heartbeats(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"messages": QUESTION, "max_tokens": 6, "temperature": 0, "seed": 3, **RSA, "rsa_short_resp_len": 40}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read()
    head = raw[: raw.index(b"{")]
    assert response.status == 200 and head.strip() == b"" and head.count(b"\n") >= 2, raw[:200]
    assert json.loads(raw)["rsa_metadata"]["rsa_token_count_history"] == [40.0, 6.0]


def test_streamed_rsa_reports_rounds_then_answers(server):
    client = server.client()
    whole = client.chat.completions.create(model="ZAYA1-8B", messages=QUESTION, max_tokens=6, temperature=0, seed=3,
                                           extra_body=RSA)
    chunks = list(client.chat.completions.create(model="ZAYA1-8B", messages=QUESTION, max_tokens=6, temperature=0,
                                                 seed=3, extra_body=RSA, stream=True))
    progress = [c.rsa_progress for c in chunks if getattr(c, "rsa_progress", None)]
    finished = [(p["round"], p["rollout"]) for p in progress if p["kind"] == "rollout_finished"]
    assert sorted(finished) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [p["round"] for p in progress if p["kind"] == "round_finished"] == [0, 1]
    for i, choice in enumerate(whole.choices):
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == \
            (choice.message.reasoning_content or "")
        assert "".join(d.content or "" for d in deltas) == (choice.message.content or "")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].rsa_metadata["rsa_token_count_history"] == [8.0, 6.0]


def test_rsa_refusals_are_400(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="rsa_summarize is not supported"):
        client.chat.completions.create(model="ZAYA1-8B", messages=QUESTION, extra_body={**RSA, "rsa_summarize": True})
    with pytest.raises(openai.BadRequestError, match=f"over the model's context of {CONTEXT:,}; lower max_tokens, "
                       "tail_window_len or rsa_k$"):
        client.chat.completions.create(model="ZAYA1-8B", messages=QUESTION, max_tokens=2000, extra_body=RSA)
    with pytest.raises(openai.BadRequestError, match="rsa_n must be a whole number"):
        client.chat.completions.create(model="ZAYA1-8B", messages=QUESTION, extra_body={**RSA, "rsa_n": "many"})
    with pytest.raises(openai.BadRequestError, match="repetition_penalty is not implemented for RSA requests"):
        client.chat.completions.create(model="ZAYA1-8B", messages=QUESTION,
                                       extra_body={**RSA, "repetition_penalty": 1.2})


def test_disconnect_cancels_an_rsa_run(server):
    stream = server.client().chat.completions.create(model="ZAYA1-8B", messages=QUESTION, max_tokens=200,
                                                     stream=True, extra_body={**RSA, "rsa_short_resp_len": 200})
    next(iter(stream))
    stream.close()
    wait_until(lambda: "RSA run cancelled (client gone)" in server.log(), 30, "the RSA run's cancellation")


def test_n_is_rsa_n_in_rsa_requests_only(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="ZAYA1-8B", messages=QUESTION, n=2)
    reply = client.chat.completions.create(model="ZAYA1-8B", messages=QUESTION, n=2, max_tokens=2, temperature=0,
                                           extra_body={"rsa_k": 2, "rsa_t": 1, "rsa_short_resp_len": 4,
                                                       "rsa_tail_window_len": 8})
    assert reply.rsa_metadata["rsa_n"] == 2 and reply.rsa_metadata["rsa_token_count_history"] == [4.0, 2.0]


# --- text completions ---------------------------------------------------------------------------------------------


def test_text_completion_keeps_the_model_text_as_written(server, folder):
    from zaya_mlx.generation import generate, load

    client = server.client()
    reply = client.completions.create(model="ZAYA1-8B", prompt="hello the world", max_tokens=6, temperature=0)
    model, tokenizer = load(folder, dtype="float32")
    assert reply.choices[0].text == generate(model, tokenizer, "hello the world", max_tokens=6).text
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (6, "length")
    # The scripted model writes a think block: a text completion keeps its tags.
    prompt = "~<think>2 and 2.</think>4~<|im_start|>assistant\n"
    assert client.completions.create(model="ZAYA1-8B", prompt=prompt).choices[0].text == "<think>2 and 2.</think>4"
    pieces = [c.choices[0].text for c in client.completions.create(model="ZAYA1-8B", prompt=prompt, stream=True)]
    assert "".join(pieces) == "<think>2 and 2.</think>4"
