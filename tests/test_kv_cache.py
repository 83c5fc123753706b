"""The quantized KV cache: its quality against the model's own cache over a long generation, and which decode path
its steps take (the fused step on it against the plain ops: test_kernels.py)."""

import mlx.core as mx
import pytest

from fixtures import fixture_ids
from zaya_mlx import ZayaError
from zaya_mlx.benchmark import kv_divergence
from zaya_mlx.decode import DecodeOptions
from zaya_mlx.loading import load_model

# KL(p_bf16 || p_quantized) in nats a position, mean and largest, over a 40-token prompt and 200 greedy steps of
# the tiny checkpoint with 64-value heads: measured 9.4e-5 and 2.5e-3 at 8 bits, 2.7e-3 and 5.1e-2 at 4 bits
# (docs/kv-cache.md); the bounds leave ~3x room.
KL_BOUNDS = {8: (3e-4, 1e-2), 4: (1e-2, 2e-1)}


@pytest.fixture(scope="module")
def kv_model(tiny_checkpoint):
    return load_model(tiny_checkpoint("kvheads"))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_cache_keeps_the_next_token_distributions(kv_model, bits):
    prompt = mx.array(fixture_ids(seed=4, length=40), dtype=mx.int32)
    kls, agree = kv_divergence(kv_model, prompt, 200, bits)
    mean, worst = sum(kls) / len(kls), max(kls)
    assert len(kls) == 201 and min(kls) >= -1e-5  # a divergence, to float32's rounding
    assert mean < KL_BOUNDS[bits][0] and worst < KL_BOUNDS[bits][1], (mean, worst)
    assert agree >= 0.97  # the greedy choices, position by position


def test_the_divergence_is_measured_not_assumed(kv_model):
    """The same measure between two dtype caches is zero: what it reports comes from the quantization."""
    prompt = mx.array(fixture_ids(seed=4, length=8), dtype=mx.int32)
    ref, other = kv_model.make_cache(), kv_model.make_cache()
    a, b = kv_model(prompt, ref, last_only=True), kv_model(prompt, other, last_only=True)
    assert mx.array_equal(a, b).item()
    assert max(kv_divergence(kv_model, prompt, 3, 8)[0]) > 0


def test_one_token_steps_take_a_path_that_reads_their_cache(kv_model, monkeypatch):
    """A quantized cache's one-token steps run the fused step where the options choose it (its kernels read the
    packed keys and values), else the plain forward: the plain decode step (decode/plain.py) writes unquantized
    buffers. A bf16 cache's plain steps do take the plain decode step (so the count below can see it), and the
    quantized cache's plain-forward steps give the plain ops' logits (the fused step's: test_kernels.py)."""
    from zaya_mlx.decode import FusedDecoder

    calls = []
    for name in ("_fused", "_plain"):
        real = getattr(FusedDecoder, name)
        monkeypatch.setattr(FusedDecoder, name, lambda self, *a, _n=name, _r=real: (calls.append(_n), _r(self, *a))[1])
    prompt = mx.array(fixture_ids(seed=5, length=6), dtype=mx.int32)
    tok = mx.array([[7]], dtype=mx.int32)
    options = kv_model.decode_options
    logits = {}
    try:
        for fused, bits in ((False, None), (False, 8), (True, 8)):
            kv_model.decode_options = DecodeOptions(fused=fused, compile=False)
            cache = kv_model.make_cache(kv_bits=bits)
            kv_model(prompt, cache, last_only=True)
            calls.clear()
            logits[fused, bits] = kv_model(tok, cache)
            mx.eval(logits[fused, bits])
            assert calls == {(False, None): ["_plain"], (False, 8): [], (True, 8): ["_fused"]}[fused, bits]
            assert type(cache[0][0]).__name__ == ("KVCache" if bits is None else "QuantizedKVCache")
    finally:
        kv_model.decode_options = options
    err = mx.abs(logits[True, 8] - logits[False, 8]).max() / mx.abs(logits[False, 8]).max()
    assert err.item() < 5e-2  # bf16 activations: the fused step and quantized_matmul round the scores apart


def test_a_quantized_cache_needs_heads_it_can_group(tiny_checkpoint):
    model = load_model(tiny_checkpoint("base"))  # heads of 16 values
    with pytest.raises(ZayaError, match="multiple of 64"):
        model.make_cache(kv_bits=8)
    with pytest.raises(ZayaError, match="kv_bits 3"):
        model.make_cache(kv_bits=3)


def test_chat_takes_the_option_to_the_cache(tiny_checkpoint):
    """`zaya chat --kv-bits 8`, piped: it reaches the cache (a model whose heads cannot be grouped says so in one
    line), a model whose heads can be chats as without it, and a format that does not exist is one line before the
    model loads."""
    from test_chat_piped import run_chat

    args = ["--temp", "0", "--max-tokens", "12", "--think-budget", "off", "--kv-bits"]
    ok = run_chat(["--model", str(tiny_checkpoint("kvheads")), *args, "8"], "hello\n")
    assert ok.returncode == 0, ok.stderr
    for model, bits, says in (("base", "8", "multiple of 64"), ("kvheads", "3", "kv_bits 3")):
        bad = run_chat(["--model", str(tiny_checkpoint(model)), *args, bits], "hello\n", timeout=60)
        assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
        assert says in bad.stderr


# --- a left-padded batch of quantized rows (RSA's rollouts) -------------------------------------------------------


@pytest.fixture(scope="module")
def kv_model32(tiny_checkpoint):
    return load_model(tiny_checkpoint("kvheads"), dtype="float32")


@pytest.mark.parametrize("fused", [False, True])
def test_a_quantized_batch_gives_each_row_what_it_gives_alone(kv_model32, fused):
    """As mlx-lm's BatchGenerator runs rollouts: rows of different lengths, each prefilled alone into a one-row
    BatchQuantizedKVCache, merged (left padding), decoded together, one filtered out, a longer one joined (extend),
    then one taken out (extract). Every row's logits are those of its tokens decoded alone on mlx-lm's
    QuantizedKVCache, through the plain forward or the fused step (its references here), and the row taken out
    holds the lone cache's keys."""
    from mlx_lm.models.cache import CacheList

    from zaya_mlx.kv_cache import BatchQuantizedKVCache
    from zaya_mlx.sizes import kv_row_bytes

    model = kv_model32
    options = model.decode_options
    model.decode_options = DecodeOptions(fused=fused, compile=False)
    prompts = [fixture_ids(seed=s, length=n)[0] for s, n in ((1, 5), (2, 11), (3, 8), (4, 20))]
    alone = [model.make_cache(kv_bits=8) for _ in prompts]
    rows = [model.make_cache([0], kv_bits=8) for _ in prompts]

    def last(cache, ids):
        return model(mx.array(ids, dtype=mx.int32), cache, last_only=True)[:, -1]

    def step(batch, live, tokens):
        got = last(batch, [[t] for t in tokens])
        for i, (j, t) in enumerate(zip(live, tokens)):
            want = last(alone[j], [[t]])[0]
            assert mx.abs(got[i] - want).max().item() <= 1e-4 * mx.abs(want).max().item(), (j, fused)

    try:
        for j, p in enumerate(prompts):
            assert mx.array_equal(last(rows[j], [p]), last(alone[j], [p])).item()
        batch = [CacheList.merge([r[i] for r in rows[:3]]) for i in range(len(rows[0]))]
        kv = batch[0][0]
        assert isinstance(kv, BatchQuantizedKVCache) and kv.left_padding.tolist() == [6, 0, 3]
        positions, heads = kv.keys[0].shape[2], model.args.num_key_value_heads
        assert kv.nbytes == 2 * 3 * heads * positions * kv_row_bytes(64, 8, dtype_bytes=4)  # what the RSA plan counts
        live = [0, 1, 2]
        step(batch, live, [7, 9, 11])
        step(batch, live, [3, 5, 2])
        for c in batch:
            c.filter([0, 2])  # the longest row finishes: the others' common padding is dropped
        live = [0, 2]
        assert batch[0][0].left_padding.tolist() == [3, 0]
        step(batch, live, [4, 4])
        for c, new in zip(batch, rows[3]):
            c.extend(new)  # a longer prompt joins: the running rows gain left padding
        live = [0, 2, 3]
        assert batch[0][0].left_padding.tolist() == [12, 9, 0]
        step(batch, live, [8, 1, 6])
        step(batch, live, [2, 2, 9])
        held = batch[0][0].extract(1)
        lone = alone[2][0][0]
        assert type(held).__name__ == "QuantizedKVCache" and held.offset == lone.offset == 8 + 5
        for a, b in zip(held.keys + held.values, lone.keys + lone.values):
            assert a.shape == b[..., : lone.offset, :].shape
            assert mx.mean(a == b[..., : lone.offset, :]).item() > 0.99  # rounding may move an integer by one
    finally:
        model.decode_options = options


def test_on_mlx_cuda_a_quantized_cache_is_read_without_quantized_matmul(kv_model32, monkeypatch):
    """MLX-CUDA's mx.quantized_matmul has no kernel for attention's shapes (it raises "No implementation for problem
    shape" for a prompt's queries against a head's keys, or a step's 4 queries a head). Where the back end is CUDA,
    attention over a quantized cache expands the keys and values instead: a left-padded batch's prompt, then steps,
    through the plain forward, with quantized_matmul raising as there, give the logits of mlx-lm's quantized
    attention (float32)."""
    import zaya_mlx.kv_cache as kv_cache

    model = kv_model32
    options = model.decode_options
    model.decode_options = DecodeOptions(fused=False, compile=False)
    ids = mx.array([fixture_ids(seed=5, length=14)[0], fixture_ids(seed=6, length=14)[0]], dtype=mx.int32)
    steps = [[[3], [8]], [[5], [1]], [[9], [9]]]

    def run():
        cache = model.make_cache([0, 4], kv_bits=8)
        logits = [model(ids, cache)[:, -1]]
        logits += [model(mx.array(t, dtype=mx.int32), cache)[:, -1] for t in steps]
        return mx.stack(logits)

    def no_kernel(*args, **kwargs):
        raise RuntimeError("[quantized_matmul] No implementation for problem shape")

    try:
        want = run()
        monkeypatch.setattr(kv_cache, "backend", lambda: "cuda")
        monkeypatch.setattr(mx, "quantized_matmul", no_kernel)
        got = run()
    finally:
        model.decode_options = options
    assert mx.abs(got - want).max().item() <= 1e-4 * mx.abs(want).max().item()


def test_a_quantized_batch_keeps_the_next_token_distributions(kv_model):
    """The 8-bit bounds above hold for a left-padded batch against the same batch on the model's own cache (the
    largest KL of its rows at each position): the measured prompt and steps, beside the prompt less its first 11
    tokens, which padding (other ids, which the mask must hide) replaces. Measured: mean 2.6e-4, largest 7.7e-3."""
    ids, other = fixture_ids(seed=4, length=40)[0], fixture_ids(seed=9, length=40)[0]
    pads = [0, 11]
    prompt = mx.array([other[:p] + ids[p:] for p in pads], dtype=mx.int32)
    kls, agree = kv_divergence(kv_model, prompt, 200, 8, left_padding=pads)
    assert min(kls) >= -1e-5 and max(kls) > 0
    assert sum(kls) / len(kls) < KL_BOUNDS[8][0] and max(kls) < KL_BOUNDS[8][1], kls
    assert agree >= 0.97


def test_mlx_lms_batch_generator_decodes_quantized_rows_as_each_alone(tiny_checkpoint, monkeypatch):
    """mlx-lm's BatchGenerator on one-row quantized caches (as `zaya rsa --kv-bits` gives it): prompts of different
    lengths prefilled together (right-padded, then rolled to left padding), decoded together and finishing at
    different steps, write greedily what each writes alone on mlx-lm's QuantizedKVCache. The model's input scale
    is damped so that its greedy choices follow the context (as written it mostly repeats its last token)."""
    from mlx_lm.generate import BatchGenerator

    from zaya_mlx.kv_cache import BatchQuantizedKVCache

    model = load_model(tiny_checkpoint("kvheads"), dtype="float32")
    model.model.input_hidden_states_scale = model.model.input_hidden_states_scale * 0.02
    rolled = []
    finalize = BatchQuantizedKVCache.finalize
    monkeypatch.setattr(BatchQuantizedKVCache, "finalize",
                        lambda self: (rolled.append(self._right_padding is not None), finalize(self))[1])
    prompts = [fixture_ids(seed=s, length=n)[0] for s, n in ((1, 5), (2, 11), (3, 8))]
    limits = [6, 9, 4]
    gen = BatchGenerator(model, completion_batch_size=3, prefill_batch_size=3, prefill_step_size=4)
    uids = gen.insert(prompts, max_tokens=limits, caches=[model.make_cache([0], kv_bits=8) for _ in prompts])
    got = {uid: [] for uid in uids}
    while len(sum(got.values(), [])) < sum(limits):
        for r in gen.next_generated():
            got[r.uid].append(r.token)
    gen.close()
    assert any(rolled)
    for uid, prompt, limit in zip(uids, prompts, limits):
        cache = model.make_cache(kv_bits=8)
        logits, alone = model(mx.array([prompt], dtype=mx.int32), cache, last_only=True), []
        for _ in range(limit):
            alone.append(int(mx.argmax(logits[0, -1]).item()))
            logits = model(mx.array([alone[-1:]], dtype=mx.int32), cache)
        assert got[uid] == alone
    assert len({tuple(t) for t in got.values()}) == 3
