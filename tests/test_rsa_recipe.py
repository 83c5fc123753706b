"""Zyphra's Markovian RSA recipe, piece by piece, against texts and rules written out here by hand from
Zyphra's code (Zyphra's vLLM fork, examples/markovian_rsa/rsa_proxy_server.py): the prompts character for
character, the tails, the parameters and presets, answer equivalence."""

import pytest

from zaya_mlx import rsa
from zaya_mlx.errors import ZayaError

# --- the prompts, character for character ---------------------------------------------------------------------

MULTI_INTRO = ("You are given a math problem and several candidate solutions. Some candidates may be incorrect or "
               "contain errors. Aggregate the useful ideas and produce a single, high-quality solution. Reason "
               "carefully; if candidates disagree, choose the correct path. If all are incorrect, then attempt a "
               "different strategy. Do not restate the problem or the candidate solutions.")
MULTI_END = "Now write a single improved solution. Provide clear reasoning and end with the final answer in \\boxed{}."
ONE_INTRO = ("You are given a math problem and a candidate solution. The candidate may be incomplete or contain "
             "errors. Refine this trajectory and produce an improved, higher-quality solution. If it is entirely "
             "wrong, attempt a new strategy. End with the final result in \\boxed{}.\n")
ONE_END = ("Now, based on the original problem and the reference response above, please provide your own "
           "comprehensive solution.")


def test_aggregation_prompt_for_several_candidates_is_zyphras_text():
    question = "  Find x if 2x = 6. "
    candidates = ["  so x = 3\n", "x is \\boxed{3}", "\tmaybe 4  "]
    lines = [MULTI_INTRO, "[[ Problem ]]:\n", "Find x if 2x = 6.\n",
             "[[ Candidate solutions (may contain mistakes) ]]:\n",
             "---- Solution 1 ----\nso x = 3\n", "---- Solution 2 ----\nx is \\boxed{3}\n",
             "---- Solution 3 ----\nmaybe 4\n", MULTI_END]
    assert rsa.aggregation_text(question, candidates) == "\n".join(lines)


def test_refinement_prompt_for_one_candidate_is_zyphras_text():
    lines = [ONE_INTRO, "[[ Problem ]]:\n", "Find x.\n", "[[ Candidate solutions (may contain mistakes) ]]\n",
             "---- Candidate ----\nx = 3\n", ONE_END]
    assert rsa.aggregation_text("Find x.", [" x = 3 "]) == "\n".join(lines)


def test_the_templates_name_their_source():
    from zaya_mlx.rsa.prompts import load_template

    for name in ("aggregate", "refine"):
        assert "examples/markovian_rsa/rsa_proxy_server.py" in load_template(name)


def test_question_is_the_first_user_message_cut_before_lets_think():
    assert rsa.question_of([{"role": "user", "content": "Solve it. Let's think step by step. Let's think"}]) == \
        "Solve it. "
    assert rsa.question_of([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Q?"}]) == "Q?"
    assert rsa.question_of([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                          "text": "b"}]}]) == "a\nb"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from zaya_mlx.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def test_word_prompts_are_the_chat_template_around_the_text_tokenized_whole(tok):
    from zaya_mlx.tokenizer import apply_chat_template

    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 2+3?"}]
    b = rsa.PromptBuilder(tok, messages, 2)
    assert b.round0 == apply_chat_template(tok, messages)  # round 0: the whole conversation
    text = rsa.aggregation_text("What is 2+3?", ["five", "it is 5"])
    ids = b.build_words(["five", "it is 5"])
    assert ids == apply_chat_template(tok, [{"role": "user", "content": text}])  # one user message, no system
    assert ids[: len(b.head)] == b.head


def test_token_prompts_splice_the_ids(tok):
    b = rsa.PromptBuilder(tok, [{"role": "user", "content": "Q?"}], 2)
    tails = [tok.encode("abc def", add_special_tokens=False), [5, 6, 7]]
    ids = b.build_tokens(tails)
    assert ids == b.pieces[0] + tails[0] + b.pieces[1] + tails[1] + b.pieces[2]
    assert len(ids) == b.fixed_tokens + 3 + len(tails[0])


# --- tails --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>plan</think>\n\nThe answer is 5.", "plan", "\n\nThe answer is 5."),
    ("plan</think>answer", "plan", "answer"),          # the prompt opened the block
    ("<think>never closed", "never closed", None),
    ("no tags at all", "no tags at all", None),         # the parser calls it all reasoning
    ("<think>r</think>", "r", None),                    # an empty answer is no content
])
def test_served_split_is_the_qwen3_parsers(text, reasoning, content):
    assert rsa.served_split(text) == (reasoning, content)


def test_candidate_text_served_vs_reasoning():
    text = "<think>step one\nstep two</think>\n\nSo \\boxed{5}."
    assert rsa.candidate_text(text, "served") == "\n\nSo \\boxed{5}."
    assert rsa.word_tail(rsa.candidate_text(text, "reasoning"), 100) == "step one step two"
    assert rsa.word_tail(rsa.candidate_text("<think>only reasoning, cut off", "served"), 3) == "reasoning, cut off"
    assert rsa.candidate_text("<think>r</think>\n", "served") == "\n"  # non-empty content wins, as in Zyphra's proxy
    assert rsa.word_tail("\n", 10) == ""


def test_word_tail_is_zyphras_cut():
    assert rsa.word_tail("  a  b\n\nc\td  ", 3) == "b c d"
    assert rsa.word_tail("a\n\nb", 10) == "a b"  # whitespace collapses even when nothing is cut
    assert rsa.word_tail("x y</think>z", 1) == "y"  # the text before </think>
    assert rsa.word_tail("", 5) == ""


def test_token_tail_picks_the_section_by_the_tag_ids():
    S, E = 900, 901
    visible = lambda ids: any(t != 0 for t in ids)  # noqa: E731  (0: whitespace)
    ids = [S, 1, 2, 3, E, 0, 7, 8]
    assert rsa.token_tail(ids, 2, "served", think_start_id=S, think_end_id=E, has_content=visible) == [7, 8]
    assert rsa.token_tail(ids, 2, "reasoning", think_start_id=S, think_end_id=E, has_content=visible) == [2, 3]
    assert rsa.token_tail([S, 1, 2, E, 0], 5, "served", think_start_id=S, think_end_id=E,
                          has_content=visible) == [1, 2]
    assert rsa.token_tail([1, 2, 3, 4], 3, "served", think_start_id=S, think_end_id=E, has_content=visible) == [2, 3, 4]


# --- parameters and presets ---------------------------------------------------------------------------------------


def test_defaults_and_the_zyphra_preset_are_zyphras_recipe():
    p = rsa.RSAParams.preset("zyphra")
    assert p == rsa.RSAParams()
    assert (p.rsa_n, p.rsa_k, p.rsa_t, p.tail_window_len, p.short_resp_len, p.max_tokens, p.rsa_final_n) == \
        (32, 4, 8, 4096, 32768, 61440, 1)
    assert (p.final_temperature, p.final_top_p, p.final_top_k, p.temperature) == (0.6, 0.95, 40, 1.0)
    assert p.worst_case_tokens() == 8 * 32 * 32768 + 61440  # ~8.4 million tokens


def test_rounds_use_short_budget_and_own_sampling_and_the_last_the_final_ones():
    p = rsa.RSAParams(rsa_n=5, rsa_t=2, rsa_final_n=3, short_resp_len=10, max_tokens=20, temperature=1.0, top_p=0.9,
                      top_k=0, final_temperature=0.6, final_top_p=0.95, final_top_k=40)
    assert [p.rollouts_in(r) for r in range(3)] == [5, 5, 3]
    assert [p.max_tokens_in(r) for r in range(3)] == [10, 10, 20]
    assert p.sampling_in(0) == p.sampling_in(1) == {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "min_p": 0.0}
    assert p.sampling_in(2) == {"temperature": 0.6, "top_p": 0.95, "top_k": 40, "min_p": 0.0}
    assert rsa.RSAParams(rsa_n=5, rsa_final_n=0).final_count == 5  # 0 means N
    assert rsa.RSAParams(rsa_n=5, rsa_final_n=9).final_count == 5  # never more than N
    assert rsa.RSAParams(rsa_n=3, rsa_k=7).candidates == 3  # random.sample of min(K, N)
    plain = rsa.RSAParams(rsa_t=0, rsa_n=8, max_tokens=20, short_resp_len=10)  # T = 0: one plain completion
    assert (plain.rollouts_in(0), plain.max_tokens_in(0), plain.sampling_in(0)["temperature"]) == (1, 20, 1.0)


def test_presets_resolve_in_one_place_with_overrides():
    p = rsa.RSAParams.preset("quick", rsa_n=6, temperature=None)
    assert p.rsa_n == 6 and p.temperature == rsa.PRESETS["quick"].params.temperature
    with pytest.raises(ZayaError, match="unknown RSA preset"):
        rsa.RSAParams.preset("desktop")
    with pytest.raises(ZayaError, match="unknown RSA parameter 'n'"):
        rsa.RSAParams.preset("quick", n=3)
    with pytest.raises(ZayaError, match=r"--n \(rsa_n\) must be a whole number >= 1"):
        rsa.RSAParams.preset("quick", rsa_n=0)
    with pytest.raises(ZayaError, match="--tail-unit"):
        rsa.RSAParams.preset("quick", tail_unit="bytes")
    for bad in (float("nan"), float("inf"), -0.5):  # a NaN or infinite temperature would sample garbage silently
        with pytest.raises(ZayaError, match=r"--temp \(temperature\) must be a finite number >= 0"):
            rsa.RSAParams.preset("quick", temperature=bad)
        with pytest.raises(ZayaError, match=r"--final-temp \(final_temperature\) must be a finite"):
            rsa.RSAParams.preset("quick", final_temperature=bad)


def test_the_candidate_draws_follow_the_rules():
    p = rsa.RSAParams(rsa_n=6, rsa_k=3, rsa_t=3, rsa_final_n=2)
    for r in (1, 2, 3):
        draws = rsa.draw_candidates(p, 7, r)
        assert len(draws) == p.rollouts_in(r)
        assert all(len(set(d)) == 3 and all(0 <= j < 6 for j in d) for d in draws)
    assert rsa.draw_candidates(p, 7, 1) == rsa.draw_candidates(p, 7, 1) != rsa.draw_candidates(p, 8, 1)
    lineage = rsa.RSAParams(rsa_n=4, rsa_k=1, rsa_t=2, rsa_final_n=0)
    assert rsa.draw_candidates(lineage, 0, 1) == [[0], [1], [2], [3]]  # K = 1: candidate i mod N


# --- answers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ("\\frac12", "\\dfrac{1}{2}"), ("1/2", "0.5"), ("\\frac{1}{2}", ".5"), ("\\tfrac{3}{4}", "0.75"),
    ("x=3", "3"), ("x = 3", "3.0"), ("$3$", "3"), ("\\left(1,2\\right)", "(1, 2)"), ("10\\%", "10"),
    ("1,000", "1000"), ("-\\frac{2}{4}", "-0.5"), ("\\text{Yes}", "Yes"), ("90^\\circ", "90"),
    ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt{3}}{2}"), ("a_1 = 7", "7"),
])
def test_mathematically_equal_answers_are_one(a, b):
    assert rsa.equivalent(a, b)


@pytest.mark.parametrize("a, b", [("1/2", "1/3"), ("3", "-3"), ("x=3", "y=4"), ("(1,2)", "(2,1)"), ("0.5", "5"),
                                  ("\\sqrt{2}", "\\sqrt{3}"), ("x^2", "x^3")])
def test_different_answers_stay_apart(a, b):
    assert not rsa.equivalent(a, b)


def test_vote_counts_equivalent_answers_together_and_breaks_ties_by_first():
    v = rsa.vote(["\\frac12", None, "7", "0.5", "x=7", "1/2"])
    assert (v.answer, v.winner, v.missing) == ("\\frac12", 0, 1)
    assert v.counts == {"\\frac12": 3, "7": 2}
    assert rsa.vote(["b", "a", "a", "b"]).answer == "b"
    assert rsa.vote([None]).counts == {} and rsa.vote([None]).winner == -1


@pytest.mark.parametrize("text, expected", [
    ("<think>so 2+2=4</think>The answer is \\boxed{4}.", ("4", "boxed")),
    ("<think>try \\boxed{5}</think>Final: \\boxed{6}", ("6", "boxed")),
    ("<think>so it is \\boxed{7} I think, but wait", ("7", "boxed")),
    ("<think>hmm</think>  The answer is 12.  ", ("The answer is 12", "text")),
    ("<think>never closed, no box", (None, "missing")),
    ("<think>a</think>\\boxed{\\frac{1}{2}}", ("\\frac{1}{2}", "boxed")),
])
def test_extract_answer(text, expected):
    assert rsa.extract_answer(text) == expected


# --- the memory plan on the 8B's shapes ---------------------------------------------------------------------------

GB = 10**9


def test_the_plan_sizes_every_slot_for_the_longest_round():
    from zaya_mlx.config import ZayaConfig

    args = ZayaConfig()
    kv = 40 * 2 * 2 * 128 * 2  # layers x (K, V) x KV heads x head_dim x bf16 bytes: 40 KB a token
    assert rsa.kv_bytes_per_token(args, 2) == kv == 40960
    p = rsa.RSAParams.preset("zyphra")
    fixed = 300  # an aggregation prompt's ids besides its candidates
    aggregate = fixed + 4 * (2 * 4096 + 8)  # K candidates at two tokens a word, plus the in-context margin
    plan = rsa.plan_memory(args, p, prompt_tokens=200, aggregate_tokens=aggregate, head_tokens=250,
                           weights_bytes=17 * GB, budget_bytes=500 * GB)
    assert plan.context_bound == aggregate + 61440  # the final round's max_tokens on the longest prompt
    # mlx-lm's buffer (256-token steps) and the fused decode step's copy (4096-token steps past 4096), together
    positions = 256 * -(-plan.context_bound // 256) + 4096 * -(-plan.context_bound // 4096)
    assert plan.sequence_bytes == positions * kv + rsa.state_bytes_per_sequence(args)
    assert plan.slots == 32 and plan.rollouts == 8 * 32 + 1 and plan.worst_case_tokens == 8 * 32 * 32768 + 61440
    small = rsa.plan_memory(args, p, prompt_tokens=200, aggregate_tokens=aggregate, head_tokens=250,
                            weights_bytes=17 * GB, budget_bytes=60 * GB)
    assert 1 <= small.slots < 32 and small.peak_bytes <= 60 * GB
    with pytest.raises(ZayaError, match="lower --max-tokens"):  # over the 131K context
        rsa.plan_memory(args, p.replace(max_tokens=120000), prompt_tokens=200, aggregate_tokens=aggregate,
                        budget_bytes=500 * GB)
    with pytest.raises(ZayaError, match="the prompt is 140,000 tokens"):
        rsa.plan_memory(args, p, prompt_tokens=140000, aggregate_tokens=aggregate, budget_bytes=500 * GB)
    with pytest.raises(ZayaError, match="quantized"):
        rsa.plan_memory(args, p, prompt_tokens=200, aggregate_tokens=aggregate, weights_bytes=17 * GB,
                        budget_bytes=10 * GB)


def test_the_plan_counts_a_quantized_cache_and_names_it_when_a_slot_does_not_fit():
    from zaya_mlx.config import ZayaConfig

    args = ZayaConfig()
    # a row of 128 values: 128 (8-bit) or 64 (4-bit) bytes of integers, plus a bf16 scale and bias per 64 values
    kv = {None: 40960, 8: 40 * 2 * 2 * (128 + 2 * 2 * 2), 4: 40 * 2 * 2 * (64 + 2 * 2 * 2)}
    assert kv[8] == 21760 and kv[4] == 11520
    p = rsa.RSAParams.preset("zyphra")
    aggregate = 300 + 4 * (2 * 4096 + 8)
    plans = {bits: rsa.plan_memory(args, p.replace(kv_bits=bits), prompt_tokens=200, aggregate_tokens=aggregate,
                                   head_tokens=250, weights_bytes=17 * GB, budget_bytes=500 * GB, max_batch=1)
             for bits in kv}
    state = rsa.state_bytes_per_sequence(args)
    for bits, plan in plans.items():
        assert plan.kv_bytes_per_token == kv[bits] and plan.kv_bits == bits
        positions = 256 * -(-plan.context_bound // 256) + 4096 * -(-plan.context_bound // 4096)
        assert plan.sequence_bytes == positions * kv[bits] + state
        assert plan.prefix_bytes == 2 * (256 * kv[bits] + state)  # the 250-token head in one 256-token step
    assert "KV 21.76 KB/token (8-bit)" in plans[8].summary()  # 40 layers x 2 x 2 heads x (128 + 8) bytes
    budget = plans[8].peak_bytes  # one slot with an 8-bit cache, exactly
    with pytest.raises(ZayaError, match=r"lower --max-tokens, --tail-window-len or --k, --kv-bits 8 \(53% of the KV "
                                        r"bytes\), or raise --memory"):
        rsa.plan_memory(args, p, prompt_tokens=200, aggregate_tokens=aggregate, head_tokens=250,
                        weights_bytes=17 * GB, budget_bytes=budget)
    fits = rsa.plan_memory(args, p.replace(kv_bits=8), prompt_tokens=200, aggregate_tokens=aggregate,
                           head_tokens=250, weights_bytes=17 * GB, budget_bytes=budget)
    assert fits.slots == 1 and fits.peak_bytes == budget
    some = {bits: rsa.plan_memory(args, p.replace(kv_bits=bits), prompt_tokens=200, aggregate_tokens=aggregate,
                                  head_tokens=250, weights_bytes=17 * GB, budget_bytes=80 * GB) for bits in kv}
    assert 1 <= some[None].slots < some[8].slots < some[4].slots < 32
    assert some[None].summary().endswith(f"; --kv-bits 8 fits {some[8].slots} slots")
    assert some[8].summary().endswith(f"; --kv-bits 4 fits {some[4].slots} slots")
    assert not some[4].notes and not plans[None].notes  # nothing smaller; every slot wanted (max_batch 1) fits
    with pytest.raises(ZayaError, match=r"--kv-bits 4 \(53% of the KV bytes\)"):
        rsa.plan_memory(args, p.replace(kv_bits=8), prompt_tokens=200, aggregate_tokens=aggregate, head_tokens=250,
                        weights_bytes=17 * GB, budget_bytes=budget - 1)
    with pytest.raises(ZayaError, match=r"--k, or raise --memory"):  # 4 bits: nothing smaller to name
        rsa.plan_memory(args, p.replace(kv_bits=4), prompt_tokens=200, aggregate_tokens=aggregate, head_tokens=250,
                        weights_bytes=17 * GB, budget_bytes=plans[4].peak_bytes - 1)
    with pytest.raises(ZayaError, match=r"--kv-bits \(kv_bits\) must be 8 or 4"):
        p.replace(kv_bits=3)

