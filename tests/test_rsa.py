"""Markovian RSA (zaya_mlx/rsa.py): answers and the vote, the memory plan, prompts, the engine's flow and its
bounded-context invariant, checked three ways:

- pure functions on crafted inputs (answer extraction, vote, memory arithmetic on the 8B's shapes);
- a scripted stand-in generator (the engine's `backend` hook) that writes known answers depending on its prompt,
  with the real tiny tokenizer: the aggregation flow and the vote against truth computed here;
- the tiny random fixture model end to end, and each batched rollout against a decode of its prompt alone
  (fresh cache, one sequence: shares no code with zaya_mlx.generation).
"""

import re
from collections import Counter

import mlx.core as mx
import pytest

from zaya_mlx import rsa
from zaya_mlx.config import ZayaConfig
from zaya_mlx.errors import ZayaError

IM_END = 106

# --- answers and the vote -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("<think>so 2+2=4</think>The answer is \\boxed{4}.", ("4", "boxed")),
    ("<think>x</think>\\boxed{\\frac{1}{2}} and later \\boxed{ \\frac{3}{4} }", ("\\frac{3}{4}", "boxed")),
    ("<think>try \\boxed{5}</think>Final: \\boxed{6}", ("6", "boxed")),  # the answer's box beats the reasoning's
    ("<think>so it is \\boxed{7} I think, but wait", ("7", "boxed")),  # cut off mid-reasoning, already boxed
    ("<think>hmm</think>  The answer is 12.  ", ("The answer is 12", "text")),
    ("<think>never closed, no box", (None, "missing")),
    ("<think>done</think>   ", (None, "missing")),
    ("<think>a</think>\\boxed 9 done", ("9", "boxed")),
    ("<think>a</think>$42$", ("42", "text")),
    ("<think>a</think>\\boxed{unbalanced", ("\\boxed{unbalanced", "text")),
    ("no think block at all: \\boxed{3}", ("3", "boxed")),
])
def test_extract_answer(text, expected):
    assert rsa.extract_answer(text) == expected


def test_extract_answer_when_the_prompt_opened_the_think_block():
    # Templates that put <think> in the prompt: the generated text starts inside the block.
    assert rsa.extract_answer("reasoning here</think>forty-two") == ("forty-two", "text")
    assert rsa.extract_answer("reasoning here, unfinished", starts_in_reasoning=True) == (None, "missing")
    assert rsa.extract_answer("r</think>42", starts_in_reasoning=True) == ("42", "text")


def test_vote_majority_normalization_and_missing():
    answer, votes, winner = rsa.vote(["7", None, " 5", "$7$", "7.", None, "5"])
    assert (answer, winner) == ("7", 0)
    assert votes == {"7": 3, " 5": 2}
    assert list(votes) == ["7", " 5"]


def test_vote_tie_goes_to_the_first_occurrence():
    assert rsa.vote([None, "b", "a", "a", "b"]) == ("b", {"b": 2, "a": 2}, 1)
    assert rsa.vote(["a", "b", "c"]) == ("a", {"a": 1, "b": 1, "c": 1}, 0)
    assert rsa.vote(["x y", "xy"])[1] == {"x y": 2}  # whitespace does not split a vote


def test_vote_with_no_answers():
    assert rsa.vote([None, None]) == (None, {}, -1)
    assert rsa.vote([]) == (None, {}, -1)


# --- memory plan --------------------------------------------------------------------------------------------------

GB = 10**9


def test_kv_and_state_bytes_on_the_8b_shapes():
    args = ZayaConfig()
    assert rsa.kv_bytes_per_token(args, 2) == 40 * 2 * 2 * 128 * 2 == 40960  # "40 KB a token in bf16"
    assert rsa.state_bytes_per_sequence(args, 2) == 40 * (2 * 1280 + 128) * 2


def test_laptop_preset_fits_a_16gb_mac_in_one_batch():
    p = rsa.PRESETS["laptop"]
    budget = int(0.9 * 0.67 * 16 * 2**30)  # 90% of Metal's recommended working set on a 16 GB Mac (~2/3 of RAM)
    plan = rsa.plan_memory(ZayaConfig(), n=p.n, c=p.c, tau=p.tau, beta=p.budget, prompt_tokens=400, head_tokens=300,
                           weights_bytes=5 * GB, budget_bytes=budget)
    assert plan.context_bound == 400 + p.c * p.tau + p.budget
    assert (plan.batch_size, plan.sub_batches) == (p.n, 1)
    assert plan.peak_bytes <= budget


def test_report_preset_splits_into_sub_batches_under_a_small_budget():
    p = rsa.PRESETS["report"]
    kw = dict(n=p.n, c=p.c, tau=p.tau, beta=p.budget, prompt_tokens=500, head_tokens=300, weights_bytes=17 * GB)
    big = rsa.plan_memory(ZayaConfig(), budget_bytes=500 * GB, **kw)
    assert (big.batch_size, big.sub_batches) == (16, 1)
    plan = rsa.plan_memory(ZayaConfig(), budget_bytes=40 * GB, **kw)
    assert plan.sub_batches > 1 and plan.batch_size * plan.sub_batches >= 16
    assert plan.peak_bytes <= 40 * GB
    # One sequence: twice its KV at the 57,844-token bound (40 KB a token, rounded up to mlx-lm's 256-token steps).
    assert plan.sequence_bytes == 2 * 256 * -(-(500 + 4 * 4096 + 40960) // 256) * 40960 + plan.state_bytes_per_sequence
    assert rsa.plan_memory(ZayaConfig(), budget_bytes=500 * GB, max_batch=5, **kw).sub_batches == 4


def test_plan_errors_name_the_parameter_to_lower():
    args = ZayaConfig()
    with pytest.raises(ZayaError, match="--budget"):  # beta dominates
        rsa.plan_memory(args, n=4, c=2, tau=1024, beta=60000, prompt_tokens=300, weights_bytes=5 * GB,
                        budget_bytes=6 * GB)
    with pytest.raises(ZayaError, match="--tau or --c"):  # the tails dominate
        rsa.plan_memory(args, n=4, c=8, tau=8000, beta=4000, prompt_tokens=300, weights_bytes=5 * GB,
                        budget_bytes=6 * GB)
    with pytest.raises(ZayaError, match="quantized"):
        rsa.plan_memory(args, n=4, c=2, tau=16, beta=16, prompt_tokens=30, weights_bytes=17 * GB, budget_bytes=8 * GB)
    with pytest.raises(ZayaError, match="over the model's context"):
        rsa.plan_memory(args, n=1, c=4, tau=4096, beta=131072, prompt_tokens=300, budget_bytes=10**15)


def test_default_budget_is_a_share_of_this_machine():
    total, source = rsa.machine_memory()
    budget, how = rsa.default_memory_budget()
    assert 0 < budget < total and source in how


# --- templates and prompts ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from zaya_mlx.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def find(seq, sub, start=0):
    """Index of `sub` in `seq` at or after `start`, -1 if absent."""
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def test_templates_are_packaged_data_and_say_where_they_come_from():
    assert {"tails", "brief"} <= set(rsa.list_templates())
    source = rsa.load_template("tails")
    assert "2509.26626" in source and "NOT Zyphra" in source
    with pytest.raises(ZayaError, match="unknown RSA template"):
        rsa.load_template("nope")


@pytest.mark.parametrize("c", [1, 3])
def test_aggregation_prompt_is_the_chat_template_around_the_template_with_tails_spliced_as_ids(tok, c):
    from zaya_mlx.tokenizer import apply_chat_template

    problem = "How many primes are below 20?"
    b = rsa.PromptBuilder(tok, problem, c, tau=64, template="tails")
    assert b.round0 == apply_chat_template(tok, [{"role": "user", "content": problem}])
    texts = [f"and so the count is {i + 7}" for i in range(c)]
    tails = [tok.encode(t, add_special_tokens=False) for t in texts]
    ids, spans = b.build(tails)
    content = rsa._render_template(rsa.load_template("tails"), problem=problem, tails=texts, tau=64)
    assert ids == apply_chat_template(tok, [{"role": "user", "content": content}])
    assert [ids[s:e] for s, e in spans] == tails
    assert ids[: len(b.head)] == b.head and problem in tok.decode(b.head)
    assert len(ids) == b.fixed_tokens + sum(map(len, tails))


def test_a_template_must_place_every_tail(tok, tmp_path):
    bad = tmp_path / "one.jinja"
    bad.write_text("{{ problem }} {{ tails[0] }}")
    with pytest.raises(ZayaError, match="each tail exactly once"):
        rsa.PromptBuilder(tok, "p", 2, 8, template=str(bad))


# --- a scripted stand-in generator --------------------------------------------------------------------------------

BOX = re.compile(r"\\boxed\{(\d+)\}")


class Scripted:
    """Writes `<think>` + filler + `</think>The answer is \\boxed{X}.` + <|im_end|>, as a batched decode would
    (tokens interleaved across prompts). X: round 0 (no boxed answer in the prompt) -> `first(k)` for the k-th
    round-0 prompt it sees; an aggregation prompt -> the most common answer boxed in it (ties: the smallest).
    With `full=True` it never stops (always uses the whole budget). Records every call."""

    def __init__(self, tok, first=lambda k: 7 if k % 3 else 5, full=False, filler=12, extra=0):
        self.tok, self.first, self.full, self.filler, self.extra = tok, first, full, filler, extra
        self.calls, self.round0_seen = [], 0

    def answer_for(self, prompt):
        boxed = [int(x) for x in BOX.findall(self.tok.decode(prompt))]
        if not boxed:
            self.round0_seen += 1
            return self.first(self.round0_seen - 1)
        counts = Counter(boxed)
        return min(counts, key=lambda a: (-counts[a], a))

    def generate(self, prompts, *, max_tokens, prefix_len, on_token):
        self.calls.append({"prompts": [list(p) for p in prompts], "max_tokens": max_tokens, "prefix_len": prefix_len})
        outs = []
        for p in prompts:
            body = self.tok.encode("<think>" + "hmm " * self.filler + "</think>The answer is "
                                   f"\\boxed{{{self.answer_for(p)}}}.", add_special_tokens=False)
            if self.full:
                out = (body * (max_tokens // len(body) + 1))[:max_tokens]
            else:
                out = (body + [IM_END])[:max_tokens]
            outs.append(out + [IM_END] * self.extra)
        for step in range(max(map(len, outs))):
            for i, out in enumerate(outs):
                if step < len(out) and on_token:
                    on_token(i, out[step])
        return outs


def scripted_run(tok, backend, **kw):
    kw = {"n": 6, "c": 3, "tau": 40, "budget": 60, "rounds": 2, "seed": 0, **kw}
    events = []
    result = rsa.run(None, tok, "Compute the thing.", backend=backend, stop_ids=[IM_END], on_event=events.append, **kw)
    return result, events


def test_aggregation_flow_and_vote_against_known_truth(tok):
    backend = Scripted(tok)
    result, _ = scripted_run(tok, backend)
    r0 = result.rounds[0]
    assert r0.answers == [str(7 if k % 3 else 5) for k in range(6)]
    for prev, cur in zip(result.rounds, result.rounds[1:]):
        for ro in cur.rollouts:
            parent_answers = Counter(int(prev.rollouts[j].answer) for j in ro.parents)
            expected = min(parent_answers, key=lambda a: (-parent_answers[a], a))
            assert ro.answer == str(expected) and ro.answer_kind == "boxed"
    last = result.rounds[-1].answers
    truth = Counter(last)
    order = sorted(truth, key=lambda a: (-truth[a], last.index(a)))  # most votes, ties by first occurrence
    assert result.votes == {a: truth[a] for a in order} and list(result.votes) == order
    assert result.answer == order[0]
    assert result.rounds[-1].rollouts[result.winner].answer == result.answer
    assert result.winner_text.endswith("\\boxed{%s}." % result.answer)


def test_each_aggregation_prompt_holds_c_distinct_tails_of_the_previous_round(tok):
    backend = Scripted(tok, first=lambda k: k)  # every round-0 answer differs, so every tail differs
    n, c, tau = 6, 3, 25
    result, events = scripted_run(tok, backend, n=n, c=c, tau=tau, rounds=3)
    started = [e for e in events if e.kind == "round_started"]
    b = rsa.PromptBuilder(tok, "Compute the thing.", c, tau)
    for t in range(1, 4):
        prev = result.rounds[t - 1].rollouts
        prompts = started[t].data["prompts"]
        for i, prompt in enumerate(prompts):
            parents = result.rounds[t].rollouts[i].parents
            assert len(set(parents)) == c and all(0 <= j < n for j in parents)
            assert prompt[: len(b.head)] == b.head
            pos = len(b.head)
            for k, j in enumerate(parents):  # the tails, in order, where the template puts them
                tail = prev[j].tail
                assert find(prompt, tail, pos) == pos
                pos += len(tail) + len(b.pieces[k + 1])
            assert pos == len(prompt)
        assert backend.calls[t]["prefix_len"] == len(b.head)  # the shared head is prefilled once per round


def test_tails_are_exactly_the_last_tau_generated_ids(tok):
    backend = Scripted(tok, extra=0)
    for tau in (1, 7, 30, 1000):
        result, events = scripted_run(tok, backend, tau=tau, rounds=1)
        taken = {(e.round, e.rollout): e.data["tail"] for e in events if e.kind == "tail_taken"}
        for rnd in result.rounds:
            for ro in rnd.rollouts:
                assert ro.tokens[-1] == IM_END  # the stop id ends the rollout but is not part of its tail
                assert ro.tail == ro.tokens[:-1][-tau:] == taken[rnd.index, ro.index]


def test_round_zero_shares_one_prompt_and_prefills_all_but_its_last_id(tok):
    backend = Scripted(tok)
    result, _ = scripted_run(tok, backend, rounds=0)
    call = backend.calls[0]
    assert len({tuple(p) for p in call["prompts"]}) == 1 and call["prefix_len"] == len(call["prompts"][0]) - 1
    assert len(result.rounds) == 1  # T = 0: parallel sampling + vote
    assert result.answer == "7" and result.votes == {"7": 4, "5": 2}


@pytest.mark.parametrize("c, tau, beta", [(3, 20, 60), (1, 30, 50), (2, 80, 40)])  # RSA, C = 1, tau >= beta
def test_bounded_context_invariant_over_many_rounds(tok, c, tau, beta):
    backend = Scripted(tok, full=True)
    result, events = scripted_run(tok, backend, n=5, c=c, tau=tau, budget=beta, rounds=10)
    b = rsa.PromptBuilder(tok, "Compute the thing.", c, tau)
    bound = max(len(b.round0), b.fixed_tokens + c * min(tau, beta)) + beta
    assert result.plan.context_bound == bound
    lengths = set()
    for call in backend.calls:
        assert call["max_tokens"] == beta
    for e in (e for e in events if e.kind == "round_started"):
        for i, p in enumerate(e.data["prompts"]):
            out = result.rounds[e.round].rollouts[i].tokens
            assert len(out) == beta and len(p) + len(out) <= bound
            if e.round > 0:
                lengths.add(len(p))
    assert lengths == {b.fixed_tokens + c * min(tau, beta)}  # Markovian: the context never grows with the rounds


def test_the_engine_asserts_the_bound_itself(tok):
    class Overrun(Scripted):  # returns more tokens than it was allowed
        def generate(self, prompts, *, max_tokens, prefix_len, on_token):
            return [o + [5] * 3 for o in super().generate(prompts, max_tokens=max_tokens, prefix_len=prefix_len,
                                                          on_token=on_token)]

    with pytest.raises(rsa.ContextBoundError):
        scripted_run(tok, Overrun(tok, full=True), rounds=1)


def test_tail_choice_is_seeded(tok):
    parents = lambda seed: [ro.parents for r in scripted_run(tok, Scripted(tok), seed=seed, rounds=3)[0].rounds
                            for ro in r.rollouts]
    assert parents(3) == parents(3)
    assert parents(3) != parents(4)


def test_sub_batches_cover_the_population_in_order(tok):
    backend = Scripted(tok)
    result, events = scripted_run(tok, backend, n=5, rounds=1, max_batch=2)
    assert [len(call["prompts"]) for call in backend.calls] == [2, 2, 1, 2, 2, 1]
    assert result.plan.sub_batches == 3
    assert [r.answers for r in result.rounds] == [r.answers for r in scripted_run(tok, Scripted(tok), n=5, rounds=1)[0].rounds]


def test_parameter_errors(tok):
    with pytest.raises(ZayaError, match="--c"):
        scripted_run(tok, Scripted(tok), n=2, c=3)
    with pytest.raises(ZayaError, match="--tau"):
        scripted_run(tok, Scripted(tok), tau=0)
    with pytest.raises(ZayaError, match="unknown RSA preset"):
        scripted_run(tok, Scripted(tok), preset="desktop")
    with pytest.raises(ZayaError, match="empty"):
        rsa.run(None, tok, "  ", backend=Scripted(tok))


def test_presets_fill_what_is_not_given(tok):
    result, _ = scripted_run(tok, Scripted(tok), n=None, c=None, tau=None, budget=None, rounds=None, preset="laptop")
    p = rsa.PRESETS["laptop"]
    assert {k: result.params[k] for k in ("n", "c", "tau", "budget", "rounds")} == \
        {"n": p.n, "c": p.c, "tau": p.tau, "budget": p.budget, "rounds": p.rounds}
    assert len(result.rounds) == p.rounds + 1 and all(len(r.rollouts) == p.n for r in result.rounds)
    assert rsa.PRESETS["report"] == rsa.Preset(n=16, c=4, tau=4096, budget=40960, rounds=10,
                                               description=rsa.PRESETS["report"].description)


# --- the tiny fixture model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from zaya_mlx.generation import load

    return load(tiny_model_dir, dtype="float32")


TINY_RUN = dict(problem="What is 2+3?", n=4, c=2, tau=8, budget=16, template="brief")


def tiny_run(tiny, **kw):
    model, tok = tiny
    kw = {**TINY_RUN, **kw}
    events = []
    result = rsa.run(model, tok, kw.pop("problem"), on_event=events.append, **kw)
    return result, events


def test_end_to_end_on_the_tiny_model(tiny):
    # The tiny random model's distribution is very peaked; a high temperature makes the rollouts differ.
    result, events = tiny_run(tiny, rounds=3, seed=1, temperature=30.0)
    kinds = [e.kind for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "vote" and set(kinds) == set(rsa.EVENT_KINDS)
    assert kinds.count("round_started") == kinds.count("round_finished") == 4
    for kind in ("rollout_finished", "tail_taken", "answer_extracted"):
        assert kinds.count(kind) == 4 * 4
    tokens = Counter((e.round, e.rollout) for e in events if e.kind == "token")
    stop = set(tiny[1].eos_token_ids)
    for r in result.rounds:
        for ro in r.rollouts:
            assert tokens[r.index, ro.index] == len(ro.tokens) <= 16
            body = ro.tokens[:-1] if ro.tokens[-1] in stop else ro.tokens
            assert ro.tail == body[-8:]
    assert result.tokens_generated == sum(tokens.values())
    assert len({tuple(ro.tokens) for ro in result.rounds[0].rollouts}) > 1
    assert result.plan.context_bound <= tiny[0].args.max_position_embeddings and result.plan.sub_batches == 1
    answers = result.rounds[-1].answers
    assert (result.answer, result.votes, result.winner) == rsa.vote(answers)
    assert len(result.timings["rounds_s"]) == 4 and result.timings["total_s"] > 0


def test_seeded_runs_are_reproducible(tiny):
    tokens = lambda seed: [ro.tokens for r in tiny_run(tiny, rounds=2, seed=seed, temperature=30.0)[0].rounds
                           for ro in r.rollouts]
    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)


def decode_alone(model, prompt, steps, pick, stop):
    """The rollout alone: its whole prompt into a fresh cache in one forward, then one token a step (no batching,
    no shared prefix, no cache copies or merges: none of zaya_mlx.generation)."""
    cache = model.make_cache()
    logits = model(mx.array([prompt], dtype=mx.int32), cache=cache)[0, -1]
    out = []
    for _ in range(steps):
        t = int(pick((logits - mx.logsumexp(logits))[None])[0].item())
        out.append(t)
        if t in stop:
            break
        logits = model(mx.array([[t]], dtype=mx.int32), cache=cache)[0, -1]
    return out


@pytest.fixture(scope="module")
def sensitive(tiny_model_dir):
    """The tiny model with its input scale damped 50x. As written, the fixture model mostly copies its last input
    token under greedy decoding whatever came before; damped, attention and experts dominate the residual stream
    and different prompts decode differently, so the comparison below means something."""
    from zaya_mlx.generation import load

    model, tok = load(tiny_model_dir, dtype="float32")
    model.model.input_hidden_states_scale = model.model.input_hidden_states_scale * 0.02
    return model, tok


def test_batched_rounds_give_each_rollout_the_greedy_tokens_it_gets_alone(sensitive):
    model, tok = sensitive
    from zaya_mlx.sampling import make_sampler

    hot = make_sampler(30.0, seed=2)  # round 0 sampled (so the tails differ), the later rounds greedy
    state = {"round": 0}
    sampler = lambda lp: hot(lp) if state["round"] == 0 else mx.argmax(lp, axis=-1)  # noqa: E731
    events = []

    def on_event(e):
        events.append(e)
        if e.kind == "round_started":
            state["round"] = e.round

    result = rsa.run(model, tok, TINY_RUN["problem"], n=5, c=2, tau=8, budget=12, rounds=2, seed=0,
                     template="brief", sampler=sampler, max_batch=3, on_event=on_event)
    assert result.plan.sub_batches == 2  # two sub-batches of a round, each one batched decode
    stop = set(tok.eos_token_ids)
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    prompts = {e.round: e.data["prompts"] for e in events if e.kind == "round_started"}
    later = [ro.tokens for t in (1, 2) for ro in result.rounds[t].rollouts]
    assert len(set(map(tuple, later))) > 3  # the rollouts really differ
    for t in (1, 2):
        for ro, prompt in zip(result.rounds[t].rollouts, prompts[t]):
            assert ro.tokens == decode_alone(model, prompt, 12, greedy, stop)


# --- the CLI and /rsa in the chat UI ------------------------------------------------------------------------------


def test_cli_rsa_on_the_tiny_model(tiny_model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from zaya_mlx.cli import app

    out = tmp_path / "result.json"
    args = ["rsa", "What is 2+3?", "--model", str(tiny_model_dir), "--dtype", "float32", "--n", "3", "--c", "2",
            "--tau", "8", "--budget", "12", "--rounds", "1", "--template", "brief", "--temp", "30", "--json", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "round 1/1" in res.output and "rounds · 3 rollouts" in res.output
    saved = json.loads(out.read_text())
    assert len(saved["rounds"]) == 2 and saved["params"]["n"] == 3 and saved["plan"]["context_bound"] > 0
    bad = CliRunner().invoke(app, args[:6] + ["--c", "5"])
    assert isinstance(bad.exception, ZayaError) and "--c" in str(bad.exception)


def test_rsa_mode_in_the_chat_ui(tiny):
    import io

    from rich.console import Console

    from zaya_mlx.chat_session import ChatSession
    from zaya_mlx.tui import ChatUI

    model, tok = tiny
    buf = io.StringIO()
    ui = ChatUI(ChatSession(model, tok), console=Console(file=buf, width=120, highlight=False))
    ui.handle("/rsa")
    assert "RSA off · preset laptop" in buf.getvalue()
    ui.handle("/rsa n=3 c=2 tau=8 beta=12 rounds=1 template=brief temp=30 on")
    assert "RSA on" in buf.getvalue() and "n=3 c=2 tau=8 budget=12 rounds=1" in buf.getvalue()
    ui.handle("What is 2+3?")
    out = buf.getvalue()
    assert "round 1/1" in out and "2 rounds · 3 rollouts" in out
    assert [m["role"] for m in ui.session.messages] == ["user", "assistant"]
    ui.handle("/rsa c=9")  # accepted now, refused by the engine at the next prompt (c > n)
    ui.handle("again")
    assert "error: RSA --c (9) cannot exceed --n (3)" in buf.getvalue()
    ui.handle("/rsa bogus")
    ui.handle("/rsa tau=0")
    assert "unknown argument 'bogus'" in buf.getvalue() and "tau must be at least 1" in buf.getvalue()
    ui.handle("/rsa report off")
    assert ui.prompt_handler == ui.stream_turn and "RSA off · preset report: n=16 c=4" in buf.getvalue()
