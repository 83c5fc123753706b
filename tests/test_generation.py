"""Generation against independent truth: greedy tokens are the argmax of full-sequence logits; batched decoding
gives each sequence what it gets alone; stops, limits, chunked prefill, tokenizer, prompt cache files."""

import copy
import json

import mlx.core as mx
import numpy as np
import pytest

from fixtures import write_fixture_model
from generation_fixtures import full_logits, loaded, scripted_sampler
from zaya_mlx import ZayaError
from zaya_mlx.generation import (batch_generate, cache_length, generate, load, prefill, stream_generate)
from zaya_mlx.prompt_cache import load_prompt_cache, save_prompt_cache
from zaya_mlx.sampling import make_sampler
from zaya_mlx.tokenizer import NoTokenizer, apply_chat_template, load_tokenizer, render_chat

IM_END = 106
PROMPT = [270, 78, 78, 81, 269, 277, 81, 84, 78, 70, 161, 202, 175]


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return loaded(tmp_path_factory.getbasetemp() / "generation")


def greedy_by_full_logits(model, prompt, generated):
    """The greedy token at every step, from one no-cache forward over prompt + generated."""
    logits = full_logits(model, list(prompt) + list(generated))
    return [int(np.argmax(logits[len(prompt) - 1 + t])) for t in range(len(generated))]


# --- tokenizer ----------------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_eos(gen):
    _, tokenizer, folder = gen
    assert IM_END in tokenizer.eos_token_ids
    for text in ["hello the world", "two  spaces\n\nand lines ", "ünïcödé ✓ 数学", "<think>a</think>b<|im_end|>",
                 " leading space"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        detok = tokenizer.detokenizer
        for t in ids:
            detok.add_token(t)
        detok.finalize()
        # mlx-lm's byte-level BPE detokenizer (the fixture's kind) drops one leading space of a generation;
        # ZAYA's own Gemma3 tokenizer gets the SPM detokenizer without that trim.
        assert detok.text == (text[1:] if text.startswith(" ") else text)
    assert tokenizer.encode("<think>", add_special_tokens=False) == [107]
    assert load_tokenizer(folder, eos_token_ids=[5]).eos_token_ids == {5, IM_END}


def test_chat_template_rendering(gen):
    _, tokenizer, _ = gen
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(tokenizer, messages) == expected
    assert render_chat(tokenizer, messages, enable_thinking=False) == expected + "<think>\n\n</think>\n\n"
    ids = apply_chat_template(tokenizer, messages)
    assert ids == tokenizer.encode(expected, add_special_tokens=False)
    assert ids[:1] == [105] and ids.count(105) == 5 and ids.count(IM_END) == 4


def test_checkpoint_without_tokenizer(tmp_path):
    write_fixture_model(tmp_path / "m", with_tokenizer=False)
    model, tokenizer = load(tmp_path / "m", dtype="float32")
    assert isinstance(tokenizer, NoTokenizer) and not tokenizer
    for call in (lambda: stream_generate(model, tokenizer, "hi"), lambda: apply_chat_template(tokenizer, []),
                 lambda: tokenizer.encode("hi")):
        with pytest.raises(ZayaError, match="has no tokenizer") as e:
            call()
        assert str(tmp_path / "m") in str(e.value) and "\n" not in str(e.value)
    assert len(batch_generate(model, [PROMPT], max_tokens=3)[0]) == 3  # token ids need no tokenizer


# --- single sequence ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill_step_size", [512, 3])
def test_greedy_is_argmax_of_full_logits(gen, prefill_step_size):
    model, tokenizer, _ = gen
    out = generate(model, tokenizer, PROMPT, max_tokens=24, prefill_step_size=prefill_step_size)
    assert len(set(out.tokens)) > 3  # the varied fixture really varies
    assert out.tokens == greedy_by_full_logits(model, PROMPT, out.tokens)


def test_greedy_sliding_window_past_the_window(tmp_path_factory):
    model, tokenizer, _ = loaded(tmp_path_factory.getbasetemp() / "generation", variant="sliding", seed=2)
    out = generate(model, tokenizer, PROMPT, max_tokens=12, prefill_step_size=4)  # window 5
    assert out.tokens == greedy_by_full_logits(model, PROMPT, out.tokens)


def test_stream_and_generate_agree_and_cache_holds_what_was_seen(gen):
    model, tokenizer, _ = gen
    cache = model.make_cache()
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=20, cache=cache))
    result = generate(model, tokenizer, PROMPT, max_tokens=20)
    tokens = [r.token for i, r in enumerate(responses) if i == 0 or r.generation_tokens != responses[i - 1].generation_tokens]
    assert tokens == result.tokens and len(tokens) == 20
    assert "".join(r.text for r in responses) == result.reasoning + result.answer
    assert responses[-1].finish_reason == result.finish_reason == "length"
    assert [r.generation_tokens for r in responses][-1] == 20 and responses[-1].prompt_tokens == len(PROMPT)
    assert cache_length(cache) == len(PROMPT) + 20
    # Continuing on that cache equals generating from the whole sequence.
    more = generate(model, tokenizer, [tokens[-1]], max_tokens=5, cache=cache)
    assert more.tokens == greedy_by_full_logits(model, PROMPT + tokens + [tokens[-1]], more.tokens)


def test_streamed_text_is_the_decoded_text(gen):
    model, tokenizer, _ = gen
    text = "<think>Σ of ✓ is 数学\n</think>\n\nThe answer: ünï 42."
    script = tokenizer.encode(text, add_special_tokens=False)
    assert len(script) > len(text) // 2  # multi-byte characters span several tokens
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=len(script),
                                     sampler=scripted_sampler(script)))
    assert "".join(r.text for r in responses) == "Σ of ✓ is 数学\n\n\nThe answer: ünï 42."
    r = generate(model, tokenizer, PROMPT, max_tokens=len(script), sampler=scripted_sampler(script))
    assert (r.text, r.reasoning, r.answer) == (text, "Σ of ✓ is 数学\n", "\n\nThe answer: ünï 42.")
    assert r.tokens == script


def test_text_prompt_and_eos_stop(gen):
    model, tokenizer, _ = gen
    a = generate(model, tokenizer, "hello the world", max_tokens=6)
    b = generate(model, tokenizer, tokenizer.encode("hello the world"), max_tokens=6)
    assert a.tokens == b.tokens
    words = tokenizer.encode("the end", add_special_tokens=False)
    r = generate(model, tokenizer, PROMPT, max_tokens=30, sampler=scripted_sampler(words + [IM_END, 5, 6]))
    assert r.tokens == words + [IM_END] and r.finish_reason == "stop"
    assert r.text == r.answer == "the end"


def test_stop_strings_are_not_emitted(gen):
    model, tokenizer, _ = gen
    script = tokenizer.encode("say STOP now STOP", add_special_tokens=False)
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=40, stop=["STOP", "xyz"],
                                     sampler=scripted_sampler(script)))
    assert "".join(r.text for r in responses) == "say "
    assert responses[-1].finish_reason == "stop_string"
    assert not any("S" in r.text for r in responses)  # not even a prefix of the stop string leaks
    r = generate(model, tokenizer, PROMPT, max_tokens=len(script), stop=["STO"], sampler=scripted_sampler(script))
    assert r.text == "say " and r.finish_reason == "stop_string"
    # A held-back prefix that never completes is released at the end.
    r = generate(model, tokenizer, PROMPT, max_tokens=2, stop=["sandwich"],
                 sampler=scripted_sampler(tokenizer.encode("sa", add_special_tokens=False)))
    assert r.text.startswith("sa") and r.finish_reason == "length"


def spying(model):
    """(a stand-in for model that records its forward calls, the list of them)."""
    calls = []

    class Spy:
        args = model.args
        layers = model.layers

        def __call__(self, *a, **k):
            calls.append(1)
            return model(*a, **k)

        def make_cache(self, *a, **k):
            return model.make_cache(*a, **k)

    return Spy, calls


def test_context_limit_is_checked_before_any_compute(gen):
    model, tokenizer, _ = gen
    Spy, calls = spying(model)
    with pytest.raises(ZayaError, match="context limit of 512") as e:
        stream_generate(Spy(), tokenizer, PROMPT, max_tokens=500)
    assert "\n" not in str(e.value) and not calls
    with pytest.raises(ZayaError, match="context limit of 20"):
        generate(Spy(), tokenizer, PROMPT, max_tokens=10, max_context=20)
    with pytest.raises(ZayaError):
        batch_generate(Spy(), [PROMPT], max_tokens=510)
    assert not calls
    assert len(generate(Spy(), tokenizer, PROMPT, max_tokens=7, max_context=20).tokens) == 7


@pytest.mark.parametrize("prompt,kwargs,message", [
    (None, {}, r"a prompt is text or token ids \(whole numbers\), got None"),
    (["a"], {}, r"a prompt is text or token ids \(whole numbers\), got \['a'\]"),
    ([1, 384], {}, r"token id 384 is outside the model's vocabulary \[0, 384\)"),  # an id past the embedding
    ([-1], {}, "token id -1 is outside"),
    (mx.array([1.5]), {}, "a prompt is text or token ids"),
    ([1, 2], {"max_tokens": "5"}, "max_tokens must be a whole number >= 1, got '5'"),
    ([1, 2], {"temperature": "hot"}, "temperature must be a number, got 'hot'"),
])
def test_bad_prompts_and_settings_are_errors_before_any_compute(gen, prompt, kwargs, message):
    model, tokenizer, _ = gen
    assert model.args.vocab_size == 384
    Spy, calls = spying(model)
    with pytest.raises(ZayaError, match=message):
        generate(Spy(), tokenizer, prompt, **{"max_tokens": 2, **kwargs})
    with pytest.raises(ZayaError, match="outside the model's vocabulary|takes token ids"):
        batch_generate(Spy(), [[1, 2], [5, 384]] if prompt is None else ["hi"], max_tokens=2)
    assert not calls


def test_prefill_is_chunked(gen):
    model, tokenizer, _ = gen
    lengths = []

    class Spy:
        args = model.args
        layers = model.layers

        def __call__(self, tokens, cache=None):
            lengths.append(tokens.shape[1])
            return model(tokens, cache=cache)

        def make_cache(self, *a, **k):
            return model.make_cache(*a, **k)

    prompt = (PROMPT * 3)[:37]
    out = generate(Spy(), tokenizer, prompt, max_tokens=3, prefill_step_size=8)
    assert lengths[:6] == [8, 8, 8, 8, 4, 1] and max(lengths) == 8
    assert out.tokens == generate(model, tokenizer, prompt, max_tokens=3).tokens


def test_seeded_sampling_is_reproducible(gen):
    model, tokenizer, _ = gen
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    a, b = generate(model, tokenizer, PROMPT, **kw), generate(model, tokenizer, PROMPT, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != generate(model, tokenizer, PROMPT, **{**kw, "seed": 4}).tokens


# --- batches ------------------------------------------------------------------------------------------------------


def test_batched_equals_alone_per_sequence(gen):
    model, tokenizer, _ = gen
    prompts = [PROMPT, PROMPT[:3], PROMPT + [5, 6, 7, 8, 9, 10, 11], [9, 8, 7, 6, 5], [42]]
    limits = [16, 6, 12, 9, 14]
    seen = []
    out = batch_generate(model, prompts, max_tokens=limits, prefill_step_size=4,
                         on_token=lambda i, t: seen.append((i, t)))
    assert [len(o) for o in out] == limits
    for p, o in zip(prompts, out):
        assert o == greedy_by_full_logits(model, p, o)
    for i in range(len(prompts)):
        assert [t for j, t in seen if j == i] == out[i]


def test_batched_with_shared_prefix_and_stop_ids(gen):
    model, tokenizer, _ = gen
    head = PROMPT[:6]
    prefix = model.make_cache()
    prefill(model, head, prefix)
    before = [np.array(layer[0].keys[..., :6, :]) for layer in prefix]
    prompts = [head + [9, 9, 9], head + [10], head + [11, 12, 13, 14, 15, 16, 17]]
    out = batch_generate(model, prompts, max_tokens=10, prefix_cache=prefix, prefix_len=6)
    for p, o in zip(prompts, out):
        assert o == greedy_by_full_logits(model, p, o)
    assert cache_length(prefix) == 6
    for layer, keys in zip(prefix, before):
        np.testing.assert_array_equal(np.array(layer[0].keys[..., :6, :]), keys)
    # A stop id ends its sequence (and is kept); the others run on.
    stop = out[1][3]
    stopped = batch_generate(model, prompts, max_tokens=10, prefix_cache=prefix, prefix_len=6, stop_ids=[stop])
    for o, s in zip(out, stopped):
        cut = o.index(stop) + 1 if stop in o else len(o)
        assert s == o[:cut]
    with pytest.raises(ZayaError):
        batch_generate(model, [head], max_tokens=3, prefix_cache=prefix, prefix_len=6)


def test_batched_seeded_sampler_is_reproducible(gen):
    model, _, _ = gen
    prompts = [PROMPT, PROMPT[:5], [7, 8, 9]]
    a = batch_generate(model, prompts, max_tokens=[8, 5, 7], sampler=make_sampler(1.0, seed=11))
    b = batch_generate(model, prompts, max_tokens=[8, 5, 7], sampler=make_sampler(1.0, seed=11))
    assert a == b and [len(x) for x in a] == [8, 5, 7]


# --- prompt cache files -------------------------------------------------------------------------------------------


def test_prompt_cache_file_round_trip(gen, tmp_path, tmp_path_factory):
    model, tokenizer, _ = gen
    cache = model.make_cache()
    prefill(model, PROMPT[:-1], cache)
    path = save_prompt_cache(tmp_path / "p", cache, PROMPT[:-1], model, model_id="tiny")
    assert path.name == "p.safetensors" and not list(tmp_path.glob(".*tmp*"))
    loaded_cache, tokens, meta = load_prompt_cache(path, model)
    assert tokens == PROMPT[:-1] and meta["model_id"] == "tiny"
    a = generate(model, tokenizer, PROMPT[-1:], max_tokens=8, cache=loaded_cache).tokens
    b = generate(model, tokenizer, PROMPT[-1:], max_tokens=8, cache=copy.deepcopy(cache)).tokens
    assert a == b == generate(model, tokenizer, PROMPT, max_tokens=8).tokens
    with pytest.raises(ZayaError, match="holds"):
        save_prompt_cache(tmp_path / "q", cache, PROMPT, model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ZayaError):
        load_prompt_cache(tmp_path / "junk.safetensors")
    with pytest.raises(ZayaError, match="no prompt cache"):
        load_prompt_cache(tmp_path / "missing.safetensors")
    other, _, _ = loaded(tmp_path_factory.getbasetemp() / "generation", variant="mqa")
    with pytest.raises(ZayaError, match="KV heads"):
        load_prompt_cache(path, other)
    meta_only = json.loads(meta["tokens"])
    assert meta_only == PROMPT[:-1]


@pytest.fixture
def saved_cache(gen, tmp_path):
    """(path, model) of a prompt cache of PROMPT[:-1] saved from the base model."""
    model = gen[0]
    cache = model.make_cache()
    prefill(model, PROMPT[:-1], cache)
    return save_prompt_cache(tmp_path / "p", cache, PROMPT[:-1], model, model_id="tiny"), model


def test_prompt_cache_from_another_model_of_the_same_shapes(saved_cache, tmp_path_factory):
    """The same shapes, other weights (another seed): refused, where it was reused silently."""
    path, _ = saved_cache
    other, _, _ = loaded(tmp_path_factory.getbasetemp() / "generation", seed=1)
    with pytest.raises(ZayaError, match="saved from another model \\(tiny\\)"):
        load_prompt_cache(path, other)


@pytest.mark.parametrize("key, value", [("tokens", "[1, 2"), ("tokens", '"12"'), ("tokens", "[1, -2]"),
                                        ("num_extra", "x"), ("num_extra", "-1"), ("num_extra", "99"),
                                        ("tokens", None)])
def test_prompt_cache_with_bad_metadata(key, value, saved_cache):
    """Metadata that is not what save wrote: one line naming the entry (not a JSONDecodeError or ValueError)."""
    import mlx.core as mx

    path, model = saved_cache
    arrays, meta = mx.load(str(path), return_metadata=True)  # mlx-lm keeps ours under "0."
    if value is None:
        del meta[f"0.{key}"]
    else:
        meta[f"0.{key}"] = value
    mx.save_safetensors(str(path), arrays, meta)
    with pytest.raises(ZayaError) as info:
        load_prompt_cache(path, model)
    assert f"'{key}'" in str(info.value) and "\n" not in str(info.value)
