"""Parity of the MLX port with transformers' ZayaForCausalLM on tiny random checkpoints.

The reference is rebuilt from the written safetensors with `load_state_dict` (conftest), and compared on the
same token ids. fp32 logits must agree within 1e-4 of the largest reference logit, however the tokens are fed:
whole, in chunks, one at a time, batched, or left-padded in a batch. The first tests check the fixtures
themselves, so a parity pass means something (weights off their trivial init, routing that really spreads).
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

import zaya_mlx
from fixtures import (
    PAD_ID,
    SPECIAL_TOKENS,
    TIED,
    VARIANTS,
    assert_bf16_close,
    fixture_ids,
    legacy_config,
    legacy_name_map,
    make_reference,
    read_safetensors_folder,
    reference_logits,
    reference_state_dict,
    route_counts,
)

LAYOUTS = ("transformers", "legacy")
SEQ_LEN = 20  # > sliding_window (5) and > every conv history, so windows and conv state matter
RTOL = 1e-4  # of the largest |logit| of the reference being compared


def seq(batch=1, seed=1, length=SEQ_LEN):
    """Fixture token ids (no pad id)."""
    return fixture_ids(seed=seed, length=length, batch=batch)


def assert_close(got, want, what):
    """max |got - want| <= RTOL * max |want|; the message says how far off it is."""
    got = np.asarray(got, dtype=np.float32)
    want = want.numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert np.isfinite(got).all(), f"{what}: non-finite logits"
    assert err <= RTOL * scale, f"{what}: max |diff| {err:.3g} = {err / scale:.2e} of max |logit| {scale:.3g}"


def to_np(logits):
    """MLX logits -> numpy fp32 (also checks the API's fp32 promise)."""
    assert logits.dtype == mx.float32, f"logits dtype {logits.dtype}, expected float32"
    return np.array(logits)


@pytest.fixture(scope="module")
def mlx_model(tiny_checkpoint):
    """Factory (variant, layout, dtype) -> zaya_mlx model loaded from the fixture folder, once per module."""
    loaded = {}

    def get(variant, layout="transformers", dtype="float32"):
        key = (variant, layout, dtype)
        if key not in loaded:
            folder = tiny_checkpoint(variant, layout, "bfloat16" if dtype is None else dtype)
            loaded[key] = zaya_mlx.load_model(str(folder), dtype=dtype)
        return loaded[key]

    return get


# --- the fixtures themselves -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_weights_are_off_their_trivial_init(variant):
    """Every tensor is random: a port that ignores a norm, scale, bias or temperature cannot pass parity."""
    for name, value in reference_state_dict(make_reference(variant)).items():
        flat = value.flatten().float()
        if flat.numel() == 1:
            assert float(flat[0]) not in (0.0, 1.0), name
        else:
            assert float(flat.std()) > 0, f"{name} is constant"
        if name.endswith("balancing_biases"):
            assert (flat[:-1] != 0).all(), f"{name}: every expert has its own bias"


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_routing_uses_several_experts_and_skip(variant, tiny_reference):
    """On the parity ids every layer routes to >= 2 experts, and the skip class is chosen (by most tokens when
    skip-heavy, never by all)."""
    ids = seq(1) + seq(3, seed=2)
    counts = route_counts(tiny_reference(variant), ids)
    experts, skip = counts[:, :-1], counts[:, -1]
    total = counts.sum(dim=1)
    assert ((experts > 0).sum(dim=1) >= 2).all(), counts.tolist()
    assert int(skip.sum()) > 0, counts.tolist()
    assert (skip < total).all(), counts.tolist()
    if variant == "skipheavy":
        assert (skip > total // 2).all(), counts.tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fixture_transformers_checkpoint_round_trips(dtype, tiny_checkpoint, tiny_reference):
    """The written transformers checkpoint holds exactly the reference's tensors (bf16 casts, biases fp32)."""
    folder = tiny_checkpoint("base", "transformers", dtype)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "zaya" and config["architectures"] == ["ZayaForCausalLM"]
    stored = read_safetensors_folder(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored) and len(set(index["weight_map"].values())) == 2
    source = reference_state_dict(make_reference("base"))
    assert set(stored) == set(source) and not set(TIED) & set(stored)
    for name, value in source.items():
        want_dtype = torch.float32 if name.endswith("balancing_biases") else getattr(torch, dtype)
        assert stored[name].dtype == want_dtype, name
        assert torch.equal(stored[name], value.to(want_dtype)), name
    ids = seq(2)
    assert torch.equal(reference_logits(tiny_reference("base"), ids), reference_logits(make_reference("base"), ids))


@pytest.mark.parametrize("variant", ["sliding", "mqa"])
def test_fixture_legacy_checkpoint_holds_every_tensor_once(variant, tiny_checkpoint):
    """The legacy writer maps every transformers tensor to one distinct legacy name (experts split per expert),
    and its config describes the same model."""
    model = make_reference(variant)
    cfg = model.config
    names = legacy_name_map(cfg)
    source = reference_state_dict(model)
    experts = {k for k in source if ".mlp.experts." in k}
    assert set(names) == set(source) - experts
    assert len(set(names.values())) == len(names)
    stored = read_safetensors_folder(tiny_checkpoint(variant, "legacy"))
    assert len(stored) == len(names) + 2 * cfg.num_experts * cfg.num_hidden_layers
    for src, dst in names.items():
        assert torch.equal(stored[dst], source[src]), (src, dst)
    for k in range(cfg.num_hidden_layers):
        for e in range(cfg.num_experts):
            p = f"model.layers.{2 * k + 1}.zaya_block.experts.local_experts.{e}."
            assert torch.equal(stored[p + "linear_fc1.weight"], source[f"model.layers.{k}.mlp.experts.gate_up_proj"][e])
            assert torch.equal(stored[p + "linear_fc2.weight"], source[f"model.layers.{k}.mlp.experts.down_proj"][e])
    legacy = legacy_config(cfg)
    assert legacy["num_hidden_layers"] == 2 * cfg.num_hidden_layers
    if variant == "mqa":
        assert legacy["num_attention_heads"] != legacy["cca_num_q_heads"]  # the loader must pick cca_num_q_heads
    if variant == "sliding":
        assert legacy["swa_layers"] == [4, 0, 0, 0, 4, 0] and "sliding_window" not in legacy  # window 5 - 1


def test_fixture_tokenizer_loads_and_round_trips(tiny_tokenizer_dir):
    """transformers and mlx-lm both load the tiny tokenizer; any text round-trips; specials are single ids."""
    from mlx_lm.tokenizer_utils import load as mlx_lm_load_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    text = "Hi, the thing is\n\n  <think>ünïcødé 😀</think> <zyphra_tool_call>{}</zyphra_tool_call><|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 384
    for i, t in SPECIAL_TOKENS.items():
        assert tok.encode(t) == [i], t
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (106, 2, 0)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_think = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == prompt + "<think>\n\n</think>\n\n"

    wrapper = mlx_lm_load_tokenizer(tiny_tokenizer_dir)
    assert 106 in wrapper.eos_token_ids
    detok = wrapper.detokenizer
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == text


# --- fp32 parity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_prefill(variant, layout, mlx_model, tiny_reference):
    """One forward over the whole sequence, without and with a cache."""
    ids = seq(1)
    want = reference_logits(tiny_reference(variant), ids)
    model = mlx_model(variant, layout)
    assert_close(to_np(model(mx.array(ids, dtype=mx.int32))), want, f"{variant}/{layout} prefill, no cache")
    cached = model(mx.array(ids, dtype=mx.int32), model.make_cache())
    assert_close(to_np(cached), want, f"{variant}/{layout} prefill into a fresh cache")


@pytest.mark.parametrize("chunks", [(1, 3, 5, 2, 9), (7, 13)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill(variant, layout, chunks, mlx_model, tiny_reference):
    """Prefill in uneven chunks through one cache: conv history, delayed value, KV and windows carry over."""
    assert sum(chunks) == SEQ_LEN
    ids = seq(1)
    want = reference_logits(tiny_reference(variant), ids)
    model = mlx_model(variant, layout)
    cache = model.make_cache()
    start = 0
    for n in chunks:
        got = to_np(model(mx.array([ids[0][start : start + n]], dtype=mx.int32), cache))
        assert_close(got, want[:, start : start + n], f"{variant}/{layout} chunk {chunks} at {start}:{start + n}")
        start += n


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_token_by_token_decode(variant, layout, mlx_model, tiny_reference):
    """After a short prefill, each one-token step matches the full-sequence logits at that position."""
    ids = seq(1)
    want = reference_logits(tiny_reference(variant), ids)
    model = mlx_model(variant, layout)
    cache = model.make_cache()
    prefill = 4
    assert_close(to_np(model(mx.array([ids[0][:prefill]], dtype=mx.int32), cache)), want[:, :prefill],
                 f"{variant}/{layout} prefill {prefill}")
    for t in range(prefill, SEQ_LEN):
        got = to_np(model(mx.array([[ids[0][t]]], dtype=mx.int32), cache))
        assert_close(got, want[:, t : t + 1], f"{variant}/{layout} decode step at position {t}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_equal_lengths(variant, mlx_model, tiny_reference):
    """A batch of 3 different sequences, prefill then one-token steps, matches the reference batch."""
    ids = seq(3, seed=2)
    want = reference_logits(tiny_reference(variant), ids)
    model = mlx_model(variant)
    cache = model.make_cache()
    prefill = 12
    tokens = mx.array([row[:prefill] for row in ids], dtype=mx.int32)
    assert_close(to_np(model(tokens, cache)), want[:, :prefill], f"{variant} batch prefill")
    for t in range(prefill, SEQ_LEN):
        got = to_np(model(mx.array([[row[t]] for row in ids], dtype=mx.int32), cache))
        assert_close(got, want[:, t : t + 1], f"{variant} batch decode at position {t}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch(variant, mlx_model, tiny_reference):
    """Prompts of different lengths, left-padded with the pad id: each row's logits at its real positions, in the
    padded prefill and in the one-token steps after it, equal that sequence run alone."""
    lengths, steps = (16, 9, 3), 4
    rows = seq(3, seed=3, length=max(lengths) + steps)
    seqs = [row[: n + steps] for row, n in zip(rows, lengths)]  # each prompt followed by its own `steps` tokens
    width = max(lengths)
    pads = [width - n for n in lengths]
    prompt = mx.array([[PAD_ID] * p + s[:n] for p, s, n in zip(pads, seqs, lengths)], dtype=mx.int32)
    ref = tiny_reference(variant)
    wants = [reference_logits(ref, [s]) for s in seqs]

    model = mlx_model(variant)
    cache = model.make_cache(batch_left_padding=pads)
    got = to_np(model(prompt, cache))
    for b, (p, n) in enumerate(zip(pads, lengths)):
        assert_close(got[b : b + 1, p:], wants[b][:, :n], f"{variant} left-padded row {b} (pad {p}) prefill")
    for i in range(steps):
        step = mx.array([[s[n + i]] for s, n in zip(seqs, lengths)], dtype=mx.int32)
        got = to_np(model(step, cache))
        for b, n in enumerate(lengths):
            assert_close(got[b : b + 1], wants[b][:, n + i : n + i + 1],
                         f"{variant} left-padded row {b} decode at position {n + i}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_count_does_not_matter(layout, tiny_checkpoint, tiny_reference):
    """A legacy checkpoint in shards with an index (and a transformers one in a single file) load the same."""
    shards = 2 if layout == "legacy" else 1
    folder = tiny_checkpoint("sliding", layout, "float32", shards=shards)
    ids = seq(1)
    got = to_np(zaya_mlx.load_model(str(folder), dtype="float32")(mx.array(ids, dtype=mx.int32)))
    assert_close(got, reference_logits(tiny_reference("sliding"), ids), f"sliding/{layout} in {shards} file(s)")


# --- bf16 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_matches_fp32_argmax_with_bounded_error(variant, mlx_model, tiny_reference):
    """The default dtype (bf16) from a bf16 checkpoint of the same weights: the fp32 argmax wherever the fp32
    top-2 margin is clear, and errors within the measured bf16 bounds above."""
    ids = seq(3, seed=2)
    want = reference_logits(tiny_reference(variant), ids).numpy()
    model = mlx_model(variant, "transformers", None)
    got = model(mx.array(ids, dtype=mx.int32))
    assert got.dtype == mx.float32
    assert_bf16_close(np.array(got), want, f"{variant} bf16")
