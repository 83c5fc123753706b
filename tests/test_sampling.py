"""Sampling: our wiring of mlx-lm's filters (temperature first, as vLLM and transformers do), checked against
distributions computed by hand, plus seeds, argument errors and the repetition penalty in generation."""

import math

import mlx.core as mx
import numpy as np
import pytest

from generation_fixtures import full_logits, loaded
from zaya_mlx import ZayaError
from zaya_mlx.generation import generate
from zaya_mlx.sampling import check_sampling, filtered_logprobs, make_sampler

P = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
LOGP = mx.array(np.log(P)[None].astype(np.float32))


def dist(**kw):
    return np.exp(np.array(filtered_logprobs(LOGP, **kw))[0])


def normed(x):
    x = np.asarray(x, dtype=np.float64)
    return x / x.sum()


def test_temperature_alone_is_a_power_of_the_distribution():
    np.testing.assert_allclose(dist(temperature=1.0), P, atol=1e-6)
    np.testing.assert_allclose(dist(temperature=0.5), normed(P**2), atol=1e-6)
    np.testing.assert_allclose(dist(temperature=2.0), normed(P**0.5), atol=1e-6)


def test_top_p_keeps_the_smallest_head_reaching_p():
    # 0.5 and 0.2 are kept (mass above them 0 and 0.5 < 0.6); 0.15 has 0.7 above it, so it goes.
    np.testing.assert_allclose(dist(temperature=1.0, top_p=0.6), normed([0.5, 0.2, 0, 0, 0]), atol=1e-6)


def test_top_p_filters_the_tempered_distribution():
    # At T=0.5 the probabilities are p^2/0.325 = [.769, .123, .069, .031, .008]: top-p 0.8 keeps two tokens.
    # (Filtering first at T=1, as plain mlx-lm does, would keep three: 0.5 + 0.2 < 0.8.)
    np.testing.assert_allclose(dist(temperature=0.5, top_p=0.8), normed([0.25, 0.04, 0, 0, 0]), atol=1e-6)


def test_top_k_and_min_p():
    np.testing.assert_allclose(dist(temperature=2.0, top_k=2), normed([0.5**0.5, 0.2**0.5, 0, 0, 0]), atol=1e-6)
    # min-p 0.35 at T=1: the bar is 0.175, so 0.5 and 0.2 stay.
    np.testing.assert_allclose(dist(temperature=1.0, min_p=0.35), normed([0.5, 0.2, 0, 0, 0]), atol=1e-6)
    # At T=2 the probabilities are sqrt(p) normalised; the bar is 0.35 * sqrt(0.5) = 0.247 (unnormalised),
    # so sqrt(0.1) = 0.316 stays and sqrt(0.05) = 0.224 goes.
    np.testing.assert_allclose(dist(temperature=2.0, min_p=0.35), normed(np.sqrt([0.5, 0.2, 0.15, 0.1, 0])),
                               atol=1e-6)
    # All three: top-k 4 drops 0.05, top-p 0.9 at T=1 then drops 0.1 (0.85 above it), min-p 0.35 drops 0.15.
    np.testing.assert_allclose(dist(temperature=1.0, top_k=4, top_p=0.9, min_p=0.35), normed([0.5, 0.2, 0, 0, 0]),
                               atol=1e-6)
    # top-k at or over the vocabulary is no filter at all.
    np.testing.assert_allclose(dist(temperature=1.0, top_k=5), P, atol=1e-6)


def test_samples_follow_the_filtered_distribution():
    n = 20000
    sampler = make_sampler(temperature=0.5, top_p=0.8, seed=0)
    draws = np.array(sampler(mx.broadcast_to(LOGP, (n, 5))))
    counts = np.bincount(draws, minlength=5)
    expected = normed([0.25, 0.04, 0, 0, 0])
    assert counts[2:].sum() == 0
    sigma = math.sqrt(n * expected[0] * (1 - expected[0]))
    assert abs(counts[0] - n * expected[0]) < 5 * sigma


def test_greedy_and_seeds():
    logits = mx.array(np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32))
    assert make_sampler(0.0)(logits).tolist() == np.argmax(np.array(logits), axis=-1).tolist()
    a, b, c = make_sampler(1.0, seed=7), make_sampler(1.0, seed=7), make_sampler(1.0, seed=8)
    ra = [a(logits).tolist() for _ in range(5)]
    assert ra == [b(logits).tolist() for _ in range(5)]
    assert ra != [c(logits).tolist() for _ in range(5)]


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")), dict(top_k=-1),
                                dict(min_p=2.0), dict(repetition_penalty=0.0),
                                dict(repetition_penalty=float("nan"))])
def test_bad_settings_are_one_line_errors(kw):
    with pytest.raises(ZayaError) as e:
        check_sampling(**{"temperature": 1.0, **kw})
    assert "\n" not in str(e.value)


def test_repetition_penalty_in_generation(tmp_path_factory):
    """Each greedy step equals the argmax of the full-sequence logits with the penalty applied by hand:
    over the last 20 tokens of context, positive logits divided by the penalty, negative ones multiplied."""
    model, tokenizer, _ = loaded(tmp_path_factory.getbasetemp() / "generation")
    prompt = [270, 78, 78, 81, 269, 277, 81, 84, 78, 70, 161, 202, 175]
    penalty = 3.0
    out = generate(model, tokenizer, prompt, max_tokens=12, repetition_penalty=penalty).tokens
    plain = generate(model, tokenizer, prompt, max_tokens=12).tokens
    assert out != plain  # the penalty matters on this model
    seq = prompt + out
    logits = full_logits(model, seq)
    for t in range(len(out)):
        pos = len(prompt) + t - 1
        row = logits[pos].copy()
        context = sorted(set(seq[: pos + 1][-20:]))
        row[context] = np.where(row[context] < 0, row[context] * penalty, row[context] / penalty)
        assert out[t] == int(np.argmax(row)), t
