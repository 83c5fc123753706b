"""The Markovian RSA engine (zaya_mlx/rsa/engine.py), checked two ways:

- a scripted backend with the engine's two-method protocol, on the real tiny tokenizer: it writes a known
  answer depending on its prompt, a length depending on its seed, and records the order of everything, so the
  flow of rounds, the draws, the budgets and samplings, and the slot schedule are checked against truth
  computed here;
- the tiny random fixture model end to end (with its context raised so Zyphra's prompts fit), each rollout
  against a decode of its prompt alone, and the CLI and chat front ends.
"""

import re
import threading
from collections import Counter

import mlx.core as mx
import pytest

from zaya_mlx import rsa
from zaya_mlx.errors import ZayaError

IM_END = 106
BOX = re.compile(r"\\boxed\{(\d+)\}")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from zaya_mlx.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


class Scripted:
    """Writes `<think>` + "hmm " x (seed % 7 + 1) + `</think>The answer is \\boxed{X}.` + <|im_end|>, one token a
    step for every running rollout. X: with no boxed answer in the prompt (round 0), 5 + seed % 3; else the most
    common number boxed in the prompt (ties: the smallest). `log` records ("start", key, step) and ("finish",
    key, step); `starts` each start's arguments."""

    def __init__(self, tok, full=False):
        self.tok, self.full = tok, full
        self.running, self.log, self.starts, self.steps = {}, [], {}, 0

    def answer_for(self, prompt, seed):
        boxed = [int(x) for x in BOX.findall(self.tok.decode(prompt))]
        if not boxed:
            return 5 + seed % 3
        counts = Counter(boxed)
        return min(counts, key=lambda a: (-counts[a], a))

    def start(self, key, prompt, *, max_tokens, sampling, seed, prefix):
        assert key not in self.running
        body = self.tok.encode("<think>" + "hmm " * (seed % 7 + 1) + "</think>The answer is "
                               f"\\boxed{{{self.answer_for(prompt, seed)}}}.", add_special_tokens=False)
        out = (body * (max_tokens // len(body) + 1))[:max_tokens] if self.full else (body + [IM_END])[:max_tokens]
        self.running[key] = out
        self.starts[key] = {"prompt": list(prompt), "max_tokens": max_tokens, "sampling": sampling, "seed": seed,
                            "prefix": list(prefix), "running_beside": len(self.running) - 1}
        self.log.append(("start", key, self.steps))

    def step(self):
        self.steps += 1
        out = []
        for key in list(self.running):
            tokens = self.running[key]
            t = tokens.pop(0)
            reason = "stop" if t == IM_END else ("length" if not tokens else None)
            out.append((key, t, reason))
            if reason:
                del self.running[key]
                self.log.append(("finish", key, self.steps))
        return out

    def counters(self):
        return {}

    def close(self):
        pass


PROBLEM = "Compute the thing."


def scripted_run(tok, backend=None, *, seed=0, schedule="stream", max_batch=None, cancel=None, **params):
    params = {"rsa_n": 6, "rsa_k": 3, "rsa_t": 2, "tail_window_len": 40, "short_resp_len": 60, "max_tokens": 80,
              **params}
    backend = backend or Scripted(tok)
    events = []
    result = rsa.run(PROBLEM, rsa.RSAParams(**params), tokenizer=tok, backend=backend, seed=seed,
                     stop_ids=[IM_END], on_event=events.append, schedule=schedule, max_batch=max_batch, cancel=cancel)
    return result, events, backend


def test_rounds_aggregate_the_drawn_candidates_and_answer_with_the_last_round(tok):
    result, events, backend = scripted_run(tok)
    p = result.params
    assert [len(r.rollouts) for r in result.rounds] == [6, 6, 1]  # rsa_final_n = 1 in the last round
    assert [r.answer for r in result.rounds[0].rollouts] == [str(5 + ro.seed % 3) for ro in result.rounds[0].rollouts]
    builder = rsa.PromptBuilder(tok, [{"role": "user", "content": PROBLEM}], 3)
    for rd in result.rounds[1:]:
        assert [ro.parents for ro in rd.rollouts] == rsa.draw_candidates(p, 0, rd.index)
        for ro in rd.rollouts:
            parents = [result.rounds[rd.index - 1].rollouts[j] for j in ro.parents]
            # The served candidate: the answer section, its last 40 words.
            shown = [rsa.word_tail(par.text.split("</think>")[1], 40) for par in parents]
            assert shown == [par.candidate for par in parents] == [f"The answer is \\boxed{{{par.answer}}}."
                                                                     for par in parents]
            assert backend.starts[rd.index, ro.index]["prompt"] == builder.build_words(shown)
            votes = Counter(int(par.answer) for par in parents)
            assert ro.answer == str(min(votes, key=lambda a: (-votes[a], a)))
    final = result.rounds[-1].rollouts[0]
    assert result.text == final.text and result.texts == [final.text] and result.answer == final.answer
    assert result.vote is None  # Zyphra's answer is the final response, not a vote
    shown = [result.rounds[1].rollouts[j].candidate for j in final.parents]
    assert result.aggregation_prompt == [{"role": "user", "content": rsa.aggregation_text(PROBLEM, shown)}]
    assert result.metadata == {
        "rsa_iterations": 2, "rsa_k": 3, "rsa_n": 6, "rsa_summarize": False, "rsa_tail_window": True,
        "tail_window_len": 40, "short_resp_len": 60, "use_pacore": False, "rsa_max_concurrency": 6,
        "rsa_debug": False,
        "rsa_token_count_history": [sum(len(r.tokens) for r in rd.rollouts) / len(rd.rollouts)
                                    for rd in result.rounds]}
    assert result.usage["completion_tokens"] == sum(len(r.tokens) for rd in result.rounds for r in rd.rollouts)


def test_only_the_final_round_uses_the_final_sampling_budget_and_count(tok):
    result, _, backend = scripted_run(tok, rsa_t=3, rsa_final_n=2, temperature=1.0, top_p=0.9, final_temperature=0.6,
                                      final_top_p=0.95, final_top_k=40)
    per_round = {}
    for (r, i), s in backend.starts.items():
        per_round.setdefault(r, set()).add((s["max_tokens"], tuple(sorted(s["sampling"].items()))))
    early = (60, (("min_p", 0.0), ("temperature", 1.0), ("top_k", 0), ("top_p", 0.9)))
    assert per_round[0] == per_round[1] == per_round[2] == {early}
    assert per_round[3] == {(80, (("min_p", 0.0), ("temperature", 0.6), ("top_k", 40), ("top_p", 0.95)))}
    assert sorted(k for k in backend.starts if k[0] == 3) == [(3, 0), (3, 1)]
    assert len(result.texts) == 2


def test_t0_is_one_plain_completion_of_the_request(tok):
    result, _, backend = scripted_run(tok, rsa_t=0, rsa_n=8, temperature=0.7, final_temperature=0.1)
    assert list(backend.starts) == [(0, 0)]
    start = backend.starts[0, 0]
    assert start["max_tokens"] == 80 and start["sampling"]["temperature"] == 0.7
    from zaya_mlx.tokenizer import apply_chat_template

    assert start["prompt"] == apply_chat_template(tok, [{"role": "user", "content": PROBLEM}])
    assert len(result.rounds) == 1 and result.text == result.rounds[0].rollouts[0].text


def test_k1_keeps_each_lineage(tok):
    result, _, backend = scripted_run(tok, rsa_k=1, rsa_n=4, rsa_t=3, rsa_final_n=0)
    builder = rsa.PromptBuilder(tok, [{"role": "user", "content": PROBLEM}], 1)
    for rd in result.rounds[1:]:
        for ro in rd.rollouts:
            assert ro.parents == [ro.index]
            parent = result.rounds[rd.index - 1].rollouts[ro.index]
            assert backend.starts[rd.index, ro.index]["prompt"] == builder.build_words([parent.candidate])
            assert "---- Candidate ----" in tok.decode(backend.starts[rd.index, ro.index]["prompt"])


def test_token_tails_are_the_last_ids_of_the_section(tok):
    result, _, backend = scripted_run(tok, tail_unit="tokens", tail_window_len=7)
    builder = rsa.PromptBuilder(tok, [{"role": "user", "content": PROBLEM}], 3)
    answer_ids = lambda ro: tok.encode(ro.text.split("</think>")[1], add_special_tokens=False)  # noqa: E731
    for rd in result.rounds[:-1]:
        for ro in rd.rollouts:
            body = ro.tokens[:-1] if ro.tokens[-1] == IM_END else ro.tokens
            assert ro.tail_ids == body[-7:] and tok.decode(ro.tail_ids) in ro.text.split("</think>")[1]
            assert answer_ids(ro)[-7:] == ro.tail_ids  # the answer section's ids, never re-tokenised
    ro = result.rounds[1].rollouts[0]
    tails = [result.rounds[0].rollouts[j].tail_ids for j in ro.parents]
    assert backend.starts[1, 0]["prompt"] == builder.build_tokens(tails)


def test_final_vote_over_several_final_answers(tok):
    result, _, _ = scripted_run(tok, rsa_final_n=0, final_vote=True)
    answers = [r.answer for r in result.finals]
    truth = Counter(answers)
    best = max(truth.values())
    assert result.vote.counts[result.answer] == best == truth[result.answer]
    assert answers.index(result.answer) == min(answers.index(a) for a in truth if truth[a] == best)


# --- the schedule -------------------------------------------------------------------------------------------------


def test_schedules_give_the_same_result_and_streaming_overlaps_rounds(tok):
    runs = {s: scripted_run(tok, schedule=s, max_batch=4, rsa_n=8, rsa_k=2, rsa_t=3, seed=3) for s in rsa.SCHEDULES}
    tokens = {s: [[ro.tokens for ro in rd.rollouts] for rd in r[0].rounds] for s, r in runs.items()}
    assert tokens["stream"] == tokens["rounds"] == tokens["batches"]
    assert len({runs[s][0].text for s in runs}) == 1

    log = runs["stream"][2].log
    finish_step = {key: step for kind, key, step in log if kind == "finish"}
    start_step = {key: step for kind, key, step in log if kind == "start"}
    # A slot is refilled while other rollouts still decode: a start while others run.
    assert any(s["running_beside"] > 0 and key[0] == 0 and start_step[key] > 0
               for key, s in runs["stream"][2].starts.items())
    # A round r + 1 rollout starts before round r has ended, and only after its own candidates finished.
    draws = {r: rsa.draw_candidates(runs["stream"][0].params, 3, r) for r in (1, 2, 3)}
    early = [key for key in start_step if key[0] > 0
             and start_step[key] < max(finish_step[k] for k in finish_step if k[0] == key[0] - 1)]
    assert early
    for r, i in start_step:
        if r > 0:
            assert all(finish_step[r - 1, j] <= start_step[r, i] for j in draws[r][i])
    # Never more rollouts at once than slots; "batches" starts only into an empty batch.
    for s, (_, _, backend) in runs.items():
        assert max(x["running_beside"] for x in backend.starts.values()) <= 3
    batches = runs["batches"][2]
    steps_with_starts = Counter(step for kind, key, step in batches.log if kind == "start")
    finishes_by_step = Counter(step for kind, key, step in batches.log if kind == "finish")
    for step in steps_with_starts:
        if step:  # every batch after the first starts on the step the previous batch's last rollout finished
            live = sum(1 for kind, key, st in batches.log if kind == "start" and st < step) - \
                sum(1 for kind, key, st in batches.log if kind == "finish" and st <= step)
            assert live == 0 and finishes_by_step[step] > 0
    # The stream schedule idles less: fewer decode steps for the same tokens.
    assert runs["stream"][2].steps < runs["batches"][2].steps


def test_cancel_stops_between_steps(tok):
    stop = threading.Event()
    backend = Scripted(tok)
    original = backend.step

    def step():
        if backend.steps == 3:
            stop.set()
        return original()

    backend.step = step
    with pytest.raises(rsa.Cancelled):
        scripted_run(tok, backend, cancel=stop)
    assert backend.steps == 4


def test_the_bound_is_checked(tok):
    result, _, backend = scripted_run(tok, backend=Scripted(tok, full=True), tail_unit="tokens", tail_window_len=20)
    plan = result.plan
    assert plan.aggregate_tokens == rsa.PromptBuilder(tok, [{"role": "user", "content": PROBLEM}], 3).fixed_tokens \
        + 3 * 20
    for (r, i), s in backend.starts.items():
        assert len(s["prompt"]) + s["max_tokens"] <= plan.context_bound
        if r > 0:
            assert len(s["prompt"]) == plan.aggregate_tokens  # every tail full: the bound is reached, never passed


def test_a_word_tail_over_its_token_bound_keeps_its_last_tokens(tok):
    class Unbroken(Scripted):  # one "word" of many tokens: no whitespace at all
        def start(self, key, prompt, *, max_tokens, sampling, seed, prefix):
            super().start(key, prompt, max_tokens=max_tokens, sampling=sampling, seed=seed, prefix=prefix)
            self.running[key] = (tok.encode("</think>" + "ab" * 40, add_special_tokens=False) + [IM_END])[:max_tokens]

    result, _, _ = scripted_run(tok, backend=Unbroken(tok), tail_window_len=5, short_resp_len=200, rsa_t=1)
    ro = result.rounds[0].rollouts[0]
    assert ro.tail_cut and len(tok.encode(ro.candidate, add_special_tokens=False)) <= 10
    assert ("ab" * 40).endswith(ro.candidate)
    unbounded, _, _ = scripted_run(tok, backend=Unbroken(tok), tail_window_len=5, short_resp_len=200, rsa_t=1,
                                   bounded_context=False)
    assert unbounded.rounds[0].rollouts[0].candidate == "ab" * 40  # Zyphra's tail, uncut


def test_refusals_come_before_anything_runs(tok):
    with pytest.raises(ZayaError, match="--max-batch"):
        scripted_run(tok, max_batch=0)
    with pytest.raises(ZayaError, match="--max-batch must be a whole number >= 1, got -3"):
        scripted_run(tok, max_batch=-3)
    with pytest.raises(ZayaError, match="empty"):
        rsa.run("  ", rsa.RSAParams(), tokenizer=tok, backend=Scripted(tok))
    with pytest.raises(ZayaError, match="unknown RSA schedule"):
        scripted_run(tok, schedule="eager")


# --- the tiny fixture model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with the 8B's 131K context, so that Zyphra's prompt (~500 ids in the tiny tokenizer)
    and budgets fit."""
    from fixtures import copy_with_context

    return copy_with_context(tiny_model_dir, tmp_path_factory.mktemp("zaya-long") / "m", 131072)


@pytest.fixture(scope="module")
def sensitive(long_model_dir):
    """The tiny model with its input scale damped 50x: as written it mostly copies its last input token under
    greedy decoding; damped, different prompts decode differently, so the comparisons below mean something."""
    from zaya_mlx.generation import load

    model, tok = load(long_model_dir, dtype="float32")
    model.model.input_hidden_states_scale = model.model.input_hidden_states_scale * 0.02
    return model, tok


def decode_alone(model, prompt, steps, sampler, stop, kv_bits=None):
    """The rollout alone: its whole prompt into a fresh cache in one forward, then one token a step (no batching,
    no shared prefix, no cache copies: none of the engine's or mlx-lm's batching); kv_bits: on mlx-lm's
    QuantizedKVCache."""
    cache = model.make_cache(kv_bits=kv_bits)
    logits = model(mx.array([prompt], dtype=mx.int32), cache=cache)[0, -1]
    out = []
    for _ in range(steps):
        t = int(sampler((logits - mx.logsumexp(logits))[None])[0].item())
        out.append(t)
        if t in stop:
            break
        logits = model(mx.array([[t]], dtype=mx.int32), cache=cache)[0, -1]
    return out


TINY = dict(rsa_n=4, rsa_k=2, rsa_t=2, tail_window_len=6, short_resp_len=10, max_tokens=12, rsa_final_n=2)


def prompts_of(result, tok):
    """Each rollout's prompt, rebuilt from the run's candidates."""
    prompts = {}
    builder = rsa.PromptBuilder(tok, [{"role": "user", "content": "What is 2+3?"}], 2)
    for rd in result.rounds:
        for ro in rd.rollouts:
            if rd.index == 0:
                prompts[ro.round, ro.index] = builder.round0
            else:
                prompts[ro.round, ro.index] = builder.build_words(
                    [result.rounds[rd.index - 1].rollouts[j].candidate for j in ro.parents])
    return prompts


def check_rollouts_alone(model, tok, result, kv_bits=None):
    from zaya_mlx.sampling import make_sampler

    params, prompts = result.params, prompts_of(result, tok)
    assert len({tuple(ro.tokens) for ro in result.rounds[0].rollouts}) > 1
    stop = set(tok.eos_token_ids)
    for rd in result.rounds:
        for ro in rd.rollouts:
            s = params.sampling_in(rd.index)
            sampler = make_sampler(s["temperature"], s["top_p"], s["top_k"], s["min_p"], ro.seed)
            assert ro.seed == rsa.derived_seed(result.seed, ro.round, ro.index)
            assert ro.tokens == decode_alone(model, prompts[ro.round, ro.index], params.max_tokens_in(rd.index),
                                             sampler, stop, kv_bits)


def test_every_rollout_is_what_its_prompt_and_seed_give_alone(sensitive):
    model, tok = sensitive
    params = rsa.RSAParams(**TINY, temperature=30.0, final_temperature=0.0)
    events = []
    result = rsa.run("What is 2+3?", params, model=model, tokenizer=tok, seed=1, max_batch=3, on_event=events.append)
    assert result.plan.slots == 3
    check_rollouts_alone(model, tok, result)
    kinds = Counter(e.kind for e in events)
    assert kinds["rollout_finished"] == 10 and kinds["round_finished"] == 3 and kinds["finished"] == 1
    assert kinds["token"] == result.usage["completion_tokens"]


@pytest.fixture(scope="module")
def sensitive_kv(tiny_checkpoint, tmp_path_factory):
    """`sensitive` with heads of 64 values, which a quantized KV cache can group."""
    from fixtures import copy_with_context

    from zaya_mlx.generation import load

    folder = copy_with_context(tiny_checkpoint("kvheads"), tmp_path_factory.mktemp("zaya-kv") / "m", 131072)
    model, tok = load(folder, dtype="float32")
    model.model.input_hidden_states_scale = model.model.input_hidden_states_scale * 0.02
    return model, tok, folder


def test_quantized_rollouts_are_what_their_prompt_and_seed_give_alone_on_a_quantized_cache(sensitive_kv):
    """--kv-bits 4: the batched rollouts (shared prefixes, left padding, rows leaving and joining) write the tokens
    each writes alone on mlx-lm's single-stream QuantizedKVCache, and not those of the bf16 cache."""
    model, tok, _ = sensitive_kv
    params = rsa.RSAParams(**TINY, temperature=30.0, final_temperature=0.0, kv_bits=4)
    result = rsa.run("What is 2+3?", params, model=model, tokenizer=tok, seed=1, max_batch=3)
    assert result.plan.kv_bits == 4 and result.plan.slots == 3
    check_rollouts_alone(model, tok, result, kv_bits=4)
    plain = rsa.run("What is 2+3?", params.replace(kv_bits=None), model=model, tokenizer=tok, seed=1, max_batch=3)
    assert rounds_of(plain) != rounds_of(result)


def test_a_quantized_run_resumes_to_the_uninterrupted_result(sensitive_kv, tmp_path):
    """An interrupted --kv-bits 8 run resumes from its folder, which holds the KV format with the parameters."""
    model, tok, _ = sensitive_kv
    params = rsa.RSAParams(**TINY, temperature=30.0, final_temperature=0.0, kv_bits=8)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    whole = rsa.run(messages, params, model=model, tokenizer=tok, seed=2, max_batch=3)
    identity = {"path": "kv", "hash": "0", "dtype": "float32"}
    folder = rsa.RunFolder.create(tmp_path / "run", params=params, seed=2, messages=messages, model=identity)
    with pytest.raises(KeyboardInterrupt):
        rsa.run(messages, params, model=model, tokenizer=tok, seed=2, max_batch=3, journal=folder,
                on_event=interrupted_after(5))
    reopened = rsa.RunFolder.open(folder.path)
    assert reopened.params.kv_bits == 8
    with pytest.raises(ZayaError, match="has kv_bits=8, not None"):
        reopened.check(params=params.replace(kv_bits=None))
    resumed = rsa.run(messages, reopened.params, model=model, tokenizer=tok, seed=2, max_batch=3, journal=reopened)
    assert rounds_of(resumed) == rounds_of(whole) and resumed.texts == whole.texts


def test_cli_takes_kv_bits_and_a_resume_keeps_it(sensitive_kv, run_zaya, tmp_path):
    import json

    _, _, folder = sensitive_kv
    args = ["What is 2+3?", "--model", folder, "--dtype", "float32", "--preset", "quick", "--n", "2", "--k", "2",
            "--t", "1", "--short-resp-len", "4", "--max-tokens", "4", "--tail-window-len", "4", "--kv-bits", "8"]
    code, stdout, stderr = run_zaya("rsa", *args, "--run", tmp_path / "run")
    assert code == 0, stderr
    assert re.search(r"KV [\d.]+ [KMG]?B/token \(8-bit\)", stdout), stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["params"]["kv_bits"] == 8
    code, _, stderr = run_zaya("rsa", "--resume", tmp_path / "run", "--kv-bits", "4")
    assert code == 1 and "has kv_bits=8, not 4" in stderr


def test_cli_zyphra_preset_starts_and_prints_its_plan(long_model_dir, tmp_path, run_zaya):
    import json

    out = tmp_path / "r.json"
    code, stdout, stderr = run_zaya("rsa", "What is 2+3?", "--model", long_model_dir, "--dtype", "float32",
                                    "--preset", "zyphra", "--n", "3", "--t", "1", "--short-resp-len", "8",
                                    "--max-tokens", "10", "--tail-window-len", "6", "--json", out,
                                    "--run", tmp_path / "run")
    assert code == 0, stderr
    assert "plan: 4 rollouts, 34 new tokens at most, 3 slots" in stdout
    assert "round 1/1" in stdout and "2 rounds · 4 rollouts" in stdout
    saved = json.loads(out.read_text())
    assert saved["metadata"]["rsa_k"] == 4 and saved["params"]["final_top_k"] == 40 and len(saved["rounds"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--n", "1000000"], "lower --n"),
    (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
    (["--max-batch", "-3"], "--max-batch must be at least 1, got -3"),
    (["--json", "/tmp"], "--json /tmp: is a folder"),
    (["--json", "/etc/passwd/r.json"], "--json /etc/passwd/r.json: its folder does not exist"),
    (["--run", "/etc/passwd/run"], "--run /etc/passwd/run: cannot make the folder: Not a directory"),
    (["--k", "0"], "--k (rsa_k) must be a whole number >= 1"),
    (["--kv-bits", "3"], "--kv-bits (kv_bits) must be 8 or 4"),
    (["--kv-bits", "8"], "a quantized KV cache needs heads of a multiple of 64 values; this model's have 16"),
])
def test_cli_refusals_are_one_line_before_the_run(long_model_dir, run_zaya, tmp_path, args, message):
    small = [] if args[0] == "--n" else ["--preset", "quick", "--short-resp-len", "8", "--max-tokens", "10"]
    code, stdout, stderr = run_zaya("rsa", "What is 2+3?", "--model", long_model_dir, "--dtype", "float32", *small,
                                    "--run", tmp_path / "run", *args)
    assert code == 1 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "round" not in stdout and "rollout" not in stdout  # nothing started
    assert not (tmp_path / "run").exists()  # not even the run folder


def test_cli_names_the_prompt_when_it_alone_is_over_the_context(tiny_model_dir, run_zaya, tmp_path):
    run = ["--run", tmp_path / "run"]
    code, _, stderr = run_zaya("rsa", "word " * 600, "--model", tiny_model_dir, "--dtype", "float32", *run)
    assert code == 1 and "the prompt is" in stderr and "over the model's context of 512 tokens" in stderr
    code, _, stderr = run_zaya("rsa", "hi", "--model", tiny_model_dir, "--dtype", "float32", "--t", "1", *run)
    assert code == 1 and "lower --max-tokens" in stderr  # the prompt fits; the budgets do not


def test_rsa_mode_in_the_chat_ui(sensitive):
    import io

    from rich.console import Console

    from zaya_mlx.chat_session import ChatSession
    from zaya_mlx.tui import ChatUI

    model, tok = sensitive
    buf = io.StringIO()
    ui = ChatUI(ChatSession(model, tok), console=Console(file=buf, width=120, highlight=False))
    ui.handle("/rsa")
    assert "RSA off · preset laptop" in buf.getvalue()
    ui.handle("/rsa quick n=3 k=2 t=1 tail_window_len=6 short_resp_len=8 max_tokens=10 temp=30 on")
    assert "RSA on · preset quick: n=3 k=2 t=1" in buf.getvalue()
    ui.handle("What is 2+3?")
    out = buf.getvalue()
    assert "round 1/1" in out and "2 rounds · 4 rollouts" in out
    assert [m["role"] for m in ui.session.messages] == ["user", "assistant"]
    ui.handle("/rsa k=0")
    ui.handle("/rsa bogus")
    ui.handle("/rsa max_batch=-3")
    ui.handle("/rsa n=abc")
    ui.handle("/rsa temp=warm")
    out = buf.getvalue()
    assert "--k (rsa_k) must be a whole number >= 1" in out and "unknown argument 'bogus'" in out
    assert "max_batch must be at least 1, got -3" in out
    assert "/rsa: rsa_n needs a whole number, got 'abc'" in out and "/rsa: temperature needs a number, got 'warm'" in out
    ui.handle("/rsa zyphra off")
    assert ui.prompt_handler == ui.stream_turn and "RSA off · preset zyphra: n=32 k=4 t=8" in buf.getvalue()


def test_rsa_mode_in_the_chat_ui_takes_the_chats_kv_format(sensitive_kv):
    """`zaya chat --kv-bits 8` then `/rsa on`: the rollouts decode on an 8-bit cache, unless `/rsa kv_bits=4`."""
    import io

    from rich.console import Console

    from zaya_mlx.chat_session import ChatSession
    from zaya_mlx.tui import ChatUI

    model, tok, _ = sensitive_kv
    buf = io.StringIO()
    ui = ChatUI(ChatSession(model, tok, kv_bits=8), console=Console(file=buf, width=400, highlight=False))
    ui.handle("/rsa quick n=2 k=2 t=1 tail_window_len=4 short_resp_len=4 max_tokens=4 on")
    ui.handle("What is 2+3?")
    assert re.search(r"KV [\d.]+ [KMG]?B/token \(8-bit\)", buf.getvalue())
    ui.handle("/rsa kv_bits=4")
    ui.handle("What is 2+3?")
    assert re.search(r"KV [\d.]+ [KMG]?B/token \(4-bit\)", buf.getvalue())


# --- run folders: interrupt, resume, refuse -----------------------------------------------------------------------


class Interrupt(Exception):
    pass


def interrupted_after(finished: int, kind=KeyboardInterrupt):
    """An on_event that raises `kind` at the `finished`-th finished rollout (after the run folder recorded it)."""
    seen = []

    def on_event(e):
        if e.kind == "rollout_finished":
            seen.append(e)
            if len(seen) == finished:
                raise kind()

    return on_event


def rounds_of(result):
    return [[(ro.tokens, ro.parents, ro.candidate, ro.finish_reason) for ro in rd.rollouts] for rd in result.rounds]


def test_an_interrupted_scripted_run_resumes_to_the_uninterrupted_result(tok, tmp_path):
    params = rsa.RSAParams(rsa_n=6, rsa_k=3, rsa_t=2, tail_window_len=40, short_resp_len=60, max_tokens=80,
                           rsa_final_n=2)
    messages = [{"role": "user", "content": PROBLEM}]
    whole = rsa.run(messages, params, tokenizer=tok, backend=Scripted(tok), seed=4, stop_ids=[IM_END], max_batch=4)
    model = {"path": "scripted", "hash": "0", "dtype": None}
    folder = rsa.RunFolder.create(tmp_path / "run", params=params, seed=4, messages=messages, model=model)
    with pytest.raises(KeyboardInterrupt):  # mid round 0 (4 of its 6 rollouts finished)
        rsa.run(messages, params, tokenizer=tok, backend=Scripted(tok), seed=4, stop_ids=[IM_END], max_batch=4,
                journal=folder, on_event=interrupted_after(4))
    with open(folder.path / "rollouts.jsonl", "a") as f:
        f.write('{"round": 0, "index": 5, "tok')  # a torn last line, as a crash mid-write leaves it
    reopened = rsa.RunFolder.open(folder.path)
    reopened.check(params=params, seed=4, messages=messages, model=model)
    kept = reopened.finished()
    assert len(kept) == 4 and {r.round for r in kept} == {0}  # the torn line is dropped
    backend = Scripted(tok)
    events = []
    resumed = rsa.run(messages, params, tokenizer=tok, backend=backend, seed=4, stop_ids=[IM_END], max_batch=4,
                      journal=reopened, on_event=events.append)
    assert [e.data["rollouts"] for e in events if e.kind == "resumed"] == [4]
    assert len(backend.starts) == 6 + 6 + 2 - 4  # finished rollouts are not decoded again
    assert rounds_of(resumed) == rounds_of(whole) and resumed.texts == whole.texts
    assert (folder.path / "result.json").exists()


def test_a_run_folder_refuses_another_parameter_set_seed_problem_or_model(tok, tmp_path):
    params = rsa.RSAParams(rsa_n=4, rsa_k=2, rsa_t=1)
    messages = [{"role": "user", "content": PROBLEM}]
    model = {"path": "/a", "hash": "abc", "dtype": "float32"}
    folder = rsa.RunFolder.create(tmp_path / "run", params=params, seed=1, messages=messages, model=model)
    with pytest.raises(ZayaError, match=r"has rsa_k=2, not 3"):
        folder.check(params=params.replace(rsa_k=3))
    with pytest.raises(ZayaError, match="has seed 1, not 2"):
        folder.check(seed=2)
    with pytest.raises(ZayaError, match="another problem"):
        folder.check(messages=[{"role": "user", "content": "other"}])
    with pytest.raises(ZayaError, match=r"made with the model at /a \(hash abc\), not /b \(hash def\)"):
        folder.check(model={"path": "/b", "hash": "def", "dtype": "float32"})
    with pytest.raises(ZayaError, match="is not empty"):
        rsa.RunFolder.create(tmp_path / "run", params=params, seed=1, messages=messages, model=model)
    with pytest.raises(ZayaError, match="no RSA run there"):
        rsa.RunFolder.open(tmp_path)
    with folder:  # a folder being run is refused to a second run
        with pytest.raises(ZayaError, match="is being run by another process"):
            with rsa.RunFolder.open(tmp_path / "run"):
                pass
    with rsa.RunFolder.open(tmp_path / "run"):  # and free again afterwards
        pass


@pytest.mark.parametrize("damage,message", [
    ({"run": []}, r"run.json is not an RSA run of this version \('list'\)"),
    ({"run": {"format": rsa.runfolder.FORMAT}}, r"run.json is damaged \(params, seed, messages, model, draws"),
    ({"seed": "x"}, r"run.json is damaged \(seed: missing or of another type\)"),
    ({"line": {"tokens": -3}}, r"line 2 is damaged \(tokens is -3, not list\[int\]\)"),
    ({"line": {"tail_ids": ["x"]}}, r"line 2 is damaged \(tail_ids is \['x'\], not Optional\[list\[int\]\]\)"),
    ({"line": {"index": -1}}, r"line 2 is damaged \(round and index are counts from 0\)"),
    ({"line": {"text": 5}}, r"line 2 is damaged \(text is 5, not str\)"),
    ({"line": {"index": 3}}, r"line 2 is damaged \(round 0 rollout 3 is not in this run, of 2 rounds\)"),
    ({"line": {"round": 2}}, r"line 2 is damaged \(round 2 rollout \d+ is not in this run, of 2 rounds\)"),
])
def test_a_damaged_run_folder_is_refused_in_one_line(tok, tmp_path, damage, message):
    """run.json and rollouts.jsonl are read back as written, every field of its type: an edited or damaged folder
    is named and refused before its values reach the model (a token tail's ids would index its embedding)."""
    import json

    params = rsa.RSAParams(rsa_n=3, rsa_k=2, rsa_t=1, tail_window_len=40, short_resp_len=60, max_tokens=80)
    messages = [{"role": "user", "content": PROBLEM}]
    model = {"path": "scripted", "hash": "0", "dtype": None}
    folder = rsa.RunFolder.create(tmp_path / "run", params=params, seed=4, messages=messages, model=model)
    with pytest.raises(KeyboardInterrupt):
        rsa.run(messages, params, tokenizer=tok, backend=Scripted(tok), seed=4, stop_ids=[IM_END], max_batch=3,
                journal=folder, on_event=interrupted_after(2))
    run, lines = tmp_path / "run" / "run.json", (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()
    if "run" in damage:
        run.write_text(json.dumps(damage["run"]))
    elif "line" in damage:
        lines[1] = json.dumps({**json.loads(lines[1]), **damage["line"]})
        (tmp_path / "run" / "rollouts.jsonl").write_text("".join(line + "\n" for line in lines))
    else:
        run.write_text(json.dumps({**json.loads(run.read_text()), **damage}))
    with pytest.raises(ZayaError, match=message) as refused:
        rsa.RunFolder.open(tmp_path / "run").finished()
    assert "\n" not in str(refused.value)


def test_a_token_id_outside_the_vocabulary_never_reaches_the_model(sensitive):
    model, _ = sensitive
    backend = rsa.ModelBackend(model, slots=1, stop_ids=())
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    with pytest.raises(ZayaError, match=f"token id {model.args.vocab_size} is outside the model's vocabulary"):
        backend.start("k", [1, model.args.vocab_size], max_tokens=2, sampling=sampling, seed=0)
    backend.close()


@pytest.mark.parametrize("stop,exit_code,says", [
    (KeyboardInterrupt, 130, "interrupted: "),
    # the back end refusing an op mid-run, as MLX-CUDA's quantized_matmul did
    (lambda: RuntimeError("[quantized_matmul] No implementation for problem shape: 4x4x64x12\nmore"), 1,
     "error: [quantized_matmul] No implementation for problem shape: 4x4x64x12; ")])
def test_an_interrupted_cli_run_on_the_tiny_model_resumes_to_the_uninterrupted_result(long_model_dir, tmp_path,
                                                                                        run_zaya, monkeypatch, stop,
                                                                                        exit_code, says):
    """Stopped mid round 1 by Ctrl-C, or by the back end failing: one line says how many rollouts are saved and how
    to resume, and the resumed run gives the uninterrupted run's rollouts."""
    import json
    import shutil

    from zaya_mlx import rsa_view

    args = ["What is 2+3?", "--model", long_model_dir, "--dtype", "float32", "--preset", "quick", "--n", "4",
            "--k", "2", "--t", "2", "--short-resp-len", "10", "--max-tokens", "12", "--tail-window-len", "6",
            "--temp", "30", "--seed", "3", "--max-batch", "3"]
    code, _, stderr = run_zaya("rsa", *args, "--run", tmp_path / "whole")
    assert code == 0, stderr
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())

    original = rsa_view.RSAView.__call__
    monkeypatch.setattr(rsa_view.RSAView, "__call__", lambda self, e: (original(self, e), interrupt(e)))
    finished = []

    def interrupt(e):
        if e.kind == "rollout_finished":
            finished.append(e)
            if len(finished) == 6:  # mid round 1
                raise stop()

    got, stdout, stderr = run_zaya("rsa", *args, "--run", tmp_path / "cut")
    assert got == exit_code and stderr.startswith(says + "6 of 9 rollouts are saved") and stderr.count("\n") == 1
    assert "time: at most" in stdout and "(3 slots, measured" in stdout  # the first run's rate, from its folder
    assert f"zaya rsa --resume {tmp_path / 'cut'}" in stderr
    monkeypatch.setattr(rsa_view.RSAView, "__call__", original)

    code, stdout, stderr = run_zaya("rsa", "--resume", tmp_path / "cut", "--n", "5")
    assert code == 1 and "has rsa_n=4, not 5" in stderr
    other = tmp_path / "other-model"
    shutil.copytree(long_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (other / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_zaya("rsa", "--resume", tmp_path / "cut", "--model", other)
    assert code == 1 and "was made with the model at" in stderr

    code, stdout, stderr = run_zaya("rsa", "--resume", tmp_path / "cut")
    assert code == 0, stderr
    assert "resumed: 6 finished rollouts" in stdout and "decoded now)" in stdout
    resumed = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert resumed["texts"] == whole["texts"]
    assert [[ro["tokens"] for ro in rd["rollouts"]] for rd in resumed["rounds"]] == \
        [[ro["tokens"] for ro in rd["rollouts"]] for rd in whole["rounds"]]


# --- the view -----------------------------------------------------------------------------------------------------


def test_the_view_in_a_pipe_prints_rollouts_rounds_and_progress_lines(tok):
    import io

    from rich.console import Console

    from zaya_mlx.rsa_view import RSAView

    buf = io.StringIO()
    params = rsa.RSAParams(rsa_n=3, rsa_k=2, rsa_t=1, tail_window_len=10, short_resp_len=60, max_tokens=80)
    view = RSAView(Console(file=buf, width=200), params, pipe_every=0.0)
    with view:
        rsa.run(PROBLEM, params, tokenizer=tok, backend=Scripted(tok), stop_ids=[IM_END], on_event=view)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("plan: 4 rollouts, ")
    assert sum(line.startswith("round 0 rollout ") for line in lines) == 3
    assert sum(line.startswith("round 1 rollout 1: ") for line in lines) == 1
    assert [line.split(":")[0] for line in lines if "tokens (mean" in line] == ["round 0/1", "round 1/1"]
    assert any(line.startswith("round 1/1 · 4/4 done, 0 running, 0 pending") for line in lines)


def test_time_left_is_a_range_from_the_mean_length_to_full_budgets():
    from zaya_mlx.rsa_view import RunProgress

    p = rsa.RSAParams(rsa_n=4, rsa_k=2, rsa_t=2, short_resp_len=100, max_tokens=300, rsa_final_n=1)
    s = RunProgress(p)  # 9 rollouts: 4 + 4 of 100 tokens, 1 of 300
    s.done, s.finished_tokens = 3, 60  # three finished, 20 tokens each
    s.running = {(0, 3): 10, (1, 0): 5}
    # worst: the running ones to their budgets (90 + 95), 3 pending of round 1 (300) and the final (300).
    # likely: the running ones to the mean of 20 (10 + 15), and 4 pending at 20 (80).
    assert s.left() == (105, 785)


def test_cli_presets_shows_each_plan_without_running(long_model_dir, run_zaya, tmp_path):
    code, stdout, stderr = run_zaya("rsa", "What is 2+3?", "--model", long_model_dir, "--dtype", "float32",
                                    "--presets", "--run", tmp_path / "run")
    assert code == 0, stderr
    for name in rsa.PRESETS:
        assert f"{name}: {rsa.PRESETS[name].description}" in stdout
    assert stdout.count("\n  plan: ") == 3 and stdout.count("\n  time: no rate measured") == 3
    assert not (tmp_path / "run").exists() and "round" not in stdout  # nothing ran


def test_the_status_line_shows_rates_and_peak_once_measured():
    """The engine reports rates and peak memory at most once a second: before that the line leaves them out rather
    than print 'decode 0, prefill 0 · peak 0.00 GB'; then the peak in format_bytes' units."""
    import io

    from rich.console import Console

    from zaya_mlx.rsa import RSAEvent
    from zaya_mlx.rsa_view import RSAView

    view = RSAView(Console(file=io.StringIO()), rsa.RSAParams(rsa_n=2, rsa_k=2, rsa_t=1, short_resp_len=10,
                                                             max_tokens=10), pipe_every=1e9)
    line = view.line()
    assert "decode" not in line and "peak" not in line, line
    view(RSAEvent("progress", data={"prefill_tps": 1500.0, "decode_tps": 250.4, "peak_bytes": 3_250_000}))
    assert "tok/s (decode 250, prefill 1,500) · " in view.line() and view.line().endswith(" · peak 3.25 MB")
