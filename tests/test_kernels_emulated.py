"""The kernel bodies, run on the CPU through tests/kernel_emulator.py, against their plain-MLX references.

The GPU tests in test_kernels.py check the compiled kernels where a Metal or CUDA back end exists; these check the
same bodies, through the same launchers, on any machine with g++ (small shapes: every GPU thread is an OS
thread here). The references are themselves checked against transformers or numpy in test_kernels.py.
"""

import shutil

import mlx.core as mx
import numpy as np
import pytest

import kernel_emulator
from kernel_emulator import emulated
from test_kernels import (BF16_LOGITS, _cca_attention_case, _cca_attention_reference, _expert_inputs, _expert_numpy,
                          _router_weights, linear, rnd)
from zaya_mlx.decode import DecodeOptions
from zaya_mlx.kernels import attention, cca, experts, head, norms, router

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulated kernels")


@pytest.fixture(autouse=True)
def _one_threadgroup_a_head_block(monkeypatch):
    """o_proj's rows in one threadgroup a head block, unless a test sets the shares: an emulated threadgroup is
    hundreds of OS threads, and test_attention_body_with_o_proj covers the shares."""
    monkeypatch.setattr(attention, "O_PROJ_THREADGROUPS", 1)


def launches(monkeypatch) -> list:
    """The emulated kernel launches from here on, as (body, template as a dict)."""
    seen = []
    real = kernel_emulator.EmulatedKernel.__call__

    def record(self, **k):
        seen.append((self.body, dict(k["template"])))
        return real(self, **k)

    monkeypatch.setattr(kernel_emulator.EmulatedKernel, "__call__", record)
    return seen


def attention_launches(seen) -> list:
    """The CCA step's and attention's launches among those seen, as (body, HB, HAS_CCA)."""
    return [(body, t.get("HB"), t.get("HAS_CCA")) for body, t in seen
            if body in ("cca_decode.h", "decode_attention.h", "attention_combine.h")]


def layer_launches(apart: bool, split: bool) -> list:
    """A layer's launches from in_proj's output to o_proj's, as attention_launches gives them, a query head a
    threadgroup: the one launch with the step inside, or (apart) the CCA kernel and then attention; then the combine
    where split."""
    one = [("decode_attention.h", 1, True)] if not apart else [("cca_decode.h", None, None),
                                                               ("decode_attention.h", 1, False)]
    return one + ([("attention_combine.h", None, None)] if split else [])


def max_rel(a, b) -> float:
    """max |a - b| / max |b| (test_kernels.rel is the L2 ratio)."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / (mx.abs(b).max() + 1e-30)).item()


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("N", [2, 1])
def test_router_body(N, dtype):
    mx.random.seed(N)
    R, E1 = 96, 7
    r, weights = rnd(N, R, dtype=dtype), _router_weights(R, E1, dtype)
    c_ref, w_ref = router.router_mlp_reference(r, weights)
    with emulated():
        c, w = router.router_mlp_kernel(r, weights, back="cuda")
    same = np.array(c) == np.array(c_ref)
    assert same.all() or dtype == mx.bfloat16  # bf16 logits may round a near-tie differently
    w, w_ref = np.array(w)[same], np.array(w_ref)[same]
    assert np.abs(w - w_ref).max() / np.abs(w_ref).max() < (3e-2 if dtype == mx.bfloat16 else 1e-6)


@pytest.mark.parametrize("R", [256, 320])
def test_router_body_wide(R):
    """Widths whose rows take 2 or 3 chunks a lane (float32), so a SIMD group reduces 8 or 4 rows at once."""
    mx.random.seed(R)
    r, weights = rnd(1, R), _router_weights(R, 17, mx.float32)
    c_ref, w_ref = router.router_mlp_reference(r, weights)
    with emulated():
        c, w = router.router_mlp_kernel(r, weights, back="cuda")
    assert np.array_equal(np.array(c), np.array(c_ref))
    assert np.abs(np.array(w) - np.array(w_ref)).max() / np.abs(np.array(w_ref)).max() < 1e-5  # sums in another order


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("R,prev", [(0, False), (40, False), (40, True)])
def test_residual_norm_body(R, prev, dtype):
    """prev: the previous layer's router state carried into the projection (a state left out fails this test)."""
    mx.random.seed(R)
    N, H = 2, 200
    o, h = rnd(N, H, dtype=dtype), rnd(N, H, scale=4.0)
    p = [(mx.random.uniform(shape=(H,)) + 0.5).astype(dtype) for _ in range(5)]
    proj = linear(R, H, dtype) if R else None
    state = (rnd(N, R, dtype=dtype), (mx.random.uniform(shape=(R,)) + 0.5).astype(dtype)) if prev else None
    ref = norms.residual_norm_reference(o, h, *p[:4], p[4], 1e-5, proj, prev_state=state, zeros=prev)
    with emulated():
        out = norms.residual_norm_kernel(o, h, *p[:4], p[4], 1e-5, proj, prev_state=state, zeros=prev, back="cuda")
    tol = 1e-2 if dtype == mx.bfloat16 else 1e-5
    assert max_rel(out[0], ref[0]) < 1e-6 and max_rel(out[1], ref[1]) < tol
    assert (max_rel(out[2], ref[2]) < tol) if R else out[2] is None
    assert len(out) == len(ref) == (4 if prev else 3)
    if prev:  # the zero row the expert kernel adds into: every element written (outputs start as NaN here)
        assert out[3].shape == h.shape and out[3].dtype == mx.float32 and (np.array(out[3]) == 0).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("opts", [dict(group_size=32, bits=4, mode="mxfp4"), dict(group_size=64, bits=4),
                                  dict(group_size=32, bits=8)])
def test_residual_norm_body_with_a_quantized_projection(opts, bias):
    """72 rows at 4 a SIMD group: two threadgroups of 32 rows and a part-filled third.
    float32 activations: MLX's quantized matmul in bfloat16 rounds too coarsely to be the reference."""
    mx.random.seed(7)
    N, H, P = 2, 256, 72
    o, h = rnd(N, H), rnd(N, H, scale=4.0)
    p = [mx.random.uniform(shape=(H,)) + 0.5 for _ in range(5)]
    proj = linear(P, H, mx.float32, opts, bias)
    assert norms.kernel_supported(o, h, proj)
    ref = norms.residual_norm_reference(o, h, *p[:4], p[4], 1e-5, proj)
    with emulated():
        out = norms.residual_norm_kernel(o, h, *p[:4], p[4], 1e-5, proj, back="cuda")
    assert max_rel(out[0], ref[0]) < 1e-6 and max_rel(out[1], ref[1]) < 1e-5 and max_rel(out[2], ref[2]) < 1e-5


def test_residual_norm_body_writes_into_given_arrays():
    """The fused step's residual norms write the residual stream, the router state and the zero row into arrays it
    keeps (fewer outputs to encode a step): three threadgroups of projection rows, each array filled with NaN first
    so that an element left unwritten shows; the arrays come back as the outputs, x as a new one."""
    mx.random.seed(11)
    N, H, P = 2, 256, 72
    o, h = rnd(N, H), rnd(N, H, scale=4.0)
    p = [mx.random.uniform(shape=(H,)) + 0.5 for _ in range(5)]
    proj = linear(P, H, mx.float32, dict(group_size=32, bits=4, mode="mxfp4"), True)
    state = (rnd(N, P), mx.random.uniform(shape=(P,)) + 0.5)
    into = (mx.full((N, H), np.nan), mx.full((N, P), np.nan), mx.full((N, H), np.nan))
    mx.eval(into)
    ref = norms.residual_norm_reference(o, h, *p[:4], p[4], 1e-5, proj, prev_state=state, zeros=True)
    with emulated():
        out = norms.residual_norm_kernel(o, h, *p[:4], p[4], 1e-5, proj, prev_state=state, zeros=True, into=into,
                                         back="cuda")
        assert out[0] is into[0] and out[2] is into[1] and out[3] is into[2]
        assert max_rel(into[0], ref[0]) < 1e-6 and max_rel(out[1], ref[1]) < 1e-5 and max_rel(into[1], ref[2]) < 1e-5
        assert (np.array(into[2]) == 0).all()
        with pytest.raises(ValueError, match="own inputs"):
            norms.residual_norm_kernel(o, h, *p[:4], p[4], 1e-5, proj, into=(h, None, None), back="cuda")


FORMATS = [
    ("dense", None),
    ("affine", dict(group_size=64, bits=4)),
    ("affine", dict(group_size=32, bits=8)),
    ("mxfp4", dict(group_size=32, bits=4, mode="mxfp4")),
]


@pytest.mark.parametrize("fmt,opts", FORMATS)
def test_expert_body(fmt, opts):
    """Two tokens, one on the skip choice; odd widths (not multiples of a threadgroup's rows). Checked against
    float64 numpy on the dequantized weights: MLX's CPU quantized matmul in bf16 is itself ~4% off there."""
    N, H, I, E = 2, 320, 192, 3
    x, expert, weight, gu, dn, dense = _expert_inputs(N, H, I, E, fmt, opts, mx.bfloat16, mx.bfloat16, seed=3,
                                                      expert=[2, E])
    assert experts.kernel_supported(x, gu, dn)
    with emulated():
        out = np.array(experts.expert_gather_kernel(x, expert, weight, gu, dn, back="cuda").astype(mx.float32))
    y = _expert_numpy(x, expert, weight, dense)
    assert np.abs(out[0] - y[0]).max() / np.abs(y[0]).max() < 2e-2
    assert (out[1] == 0).all()


@pytest.mark.parametrize("fmt,opts", FORMATS)
def test_grouped_expert_body(fmt, opts):
    """The grouped form (a threadgroup an expert, its tokens a tile at a time: here 2) at batch 1, 8, 16 and 32, skips
    among them, against float64 numpy on the dequantized weights; and at batch 8 with five tokens on one expert
    (three tiles, the last part-filled), each token's sum is the one-token form's, bit for bit (the same arithmetic,
    in the same order)."""
    H, I, E = 256, max(32, (opts or {}).get("group_size", 0)), 3  # few channel blocks: a threadgroup is 512 threads
    assert experts.tile_tokens(H) == experts.MAX_TILE == 2
    for N in (1, 8, 16, 32):
        x, expert, weight, gu, dn, dense = _expert_inputs(N, H, I, E, fmt, opts, mx.bfloat16, mx.bfloat16, seed=N)
        assert experts.grouped_kernel_supported(x, gu, dn)
        with emulated():
            out = np.array(experts.expert_gather_kernel(x, expert, weight, gu, dn, grouped=True, back="cuda"))
        y = _expert_numpy(x, expert, weight, dense)
        assert np.abs(out - y).max() / np.abs(y).max() < 2e-2, N
        assert (out[np.array(expert) == E] == 0).all()
    x, expert, weight, gu, dn, _ = _expert_inputs(8, H, I, E, fmt, opts, mx.bfloat16, mx.bfloat16, seed=9,
                                                  expert=[1, 1, 0, 1, 2, 3, 1, 1])
    with emulated():
        one = experts.expert_gather_kernel(x, expert, weight, gu, dn, back="cuda")
        grouped = experts.expert_gather_kernel(x, expert, weight, gu, dn, grouped=True, back="cuda")
    assert np.array_equal(np.array(grouped), np.array(one))


def test_grouped_expert_body_adds_into_a_given_row():
    """In place, as the fused step calls it: the sums added into the zero row's values, every token's row touched
    once (a row added twice, or another token's, would differ)."""
    N, H, I, E = 9, 256, 32, 2
    x, expert, weight, gu, dn, dense = _expert_inputs(N, H, I, E, "mxfp4", FORMATS[3][1], mx.bfloat16, mx.bfloat16,
                                                      seed=5, expert=[1, 0, 1, 1, 2, 1, 1, 0, 1])
    into = rnd(N, H)
    before = np.array(into)
    with emulated():
        summed, after = experts.expert_gather_kernel(x, expert, weight, gu, dn, into=into, grouped=True, back="cuda")
    assert summed is into and after.shape == (1,)
    y, out = _expert_numpy(x, expert, weight, dense), np.array(summed) - before
    assert np.abs(out - y).max() / np.abs(y).max() < 2e-2 and (out[4] == 0).all()


@pytest.mark.parametrize("fmt,opts", [FORMATS[0], FORMATS[3]])
def test_routed_expert_body(fmt, opts):
    """The router inside the expert kernel, adding into a given row in place: each token's expert as the reference
    router chooses it (float32 router weights: no near-ties), some on the skip choice. A threadgroup that routes
    wrongly adds the wrong expert's rows."""
    N, H, I, E, R = 5, 256, 64, 3, 256
    x, _, _, gu, dn, dense = _expert_inputs(N, H, I, E, fmt, opts, mx.bfloat16, mx.bfloat16, seed=3)
    r, weights = rnd(N, R), _router_weights(R, E + 1, mx.float32)
    choice, weight = router.router_mlp_reference(r, weights)
    assert E in np.array(choice).tolist() and len(set(np.array(choice).tolist())) > 2  # skips and two experts
    assert experts.routed_kernel_supported(x, r, weights, gu, dn)
    into = rnd(N, H)  # the kernel adds into it in place: a row it overwrote, or left alone, would differ
    before = np.array(into)
    with emulated():
        summed, after = experts.expert_gather_kernel(x, None, None, gu, dn, routing=(r, weights), into=into,
                                                     back="cuda")
    assert summed is into and after.shape == (1,)
    out = np.array(summed) - before
    y = _expert_numpy(x, choice, weight.astype(mx.bfloat16), dense)
    for n, e in enumerate(np.array(choice).tolist()):
        if e == E:
            assert (out[n] == 0).all()
        else:
            assert np.abs(out[n] - y[n]).max() / np.abs(y[n]).max() < 2e-2


def _head_layer(fmt, opts, V, H, tied):
    """A tied embedding or an untied head with a bias, as the model holds them, dense or quantized."""
    import mlx.nn as nn

    layer = nn.Embedding(V, H) if tied else nn.Linear(H, V, bias=True)
    layer.set_dtype(mx.bfloat16)
    return layer.to_quantized(**opts) if fmt != "dense" else layer


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("fmt,opts", FORMATS)
def test_lm_head_body(fmt, opts, tied):
    """The head through the expert matvec body, 1 and 3 rows, against float64 numpy on the dequantized matrix;
    more than MAX_ROWS rows go to MLX's matmul."""
    mx.random.seed(4)
    V, H = 200, 320
    layer = _head_layer(fmt, opts, V, H, tied)
    w = layer.weight if fmt == "dense" else experts.as_stack(layer).dequantize()
    dense_w = np.array(w.astype(mx.float32), np.float64)
    bias = np.array(layer.bias.astype(mx.float32), np.float64) if not tied else 0.0
    for n in (1, 3):
        h = rnd(n, 1, H, dtype=mx.bfloat16)
        assert head.kernel_supported(h, layer)
        with emulated():
            out = np.array(head.lm_head(h, layer, impl="kernel").astype(mx.float32), np.float64)
        want = np.array(h.astype(mx.float32), np.float64) @ dense_w.T + bias
        assert out.shape == (n, 1, V)
        assert np.abs(out - want).max() / np.abs(want).max() < 2e-2
    assert not head.kernel_supported(rnd(head.MAX_ROWS + 1, 1, H, dtype=mx.bfloat16), layer)


@pytest.mark.parametrize("shape,dtype", [((8, 2, 64, 2, 2, 32, 2), mx.float32), ((6, 3, 32, 3, 2, 16, 1), mx.float32),
                                         ((4, 2, 32, 2, 3, 0, 2), mx.bfloat16)])
@pytest.mark.parametrize("q_in_place", [False, True])
def test_cca_body(shape, dtype, q_in_place):
    """q and the states against the reference; the key and value written into the cache buffers in place at
    position filled - 1, every other position as it was; with q_in_place, q written into a given array (filled
    with NaN first, so that an element left unwritten shows), as the fused step has it."""
    nh, nkv, d, t0, t1, rd, B = shape
    mx.random.seed(sum(shape))
    C = (nh + nkv) * d
    cap, filled = 12, 10
    a = dict(qkv=rnd(B, C + nkv * d), conv_state=rnd(B, t0 - 1 + t1 - 1, C), v_prev=rnd(B, nkv * d // 2),
             dw_w=rnd(C, t0, 1, scale=0.5), dw_b=rnd(C, scale=0.1), gw_w=rnd(C, t1, d, scale=0.1),
             gw_b=rnd(C, scale=0.1), temp=mx.random.uniform(shape=(nkv,)) + 0.5)
    a = {k: v.astype(dtype) for k, v in a.items()}
    keys, values = rnd(B, nkv, cap, d).astype(dtype), rnd(B, nkv, cap, d).astype(dtype)
    kw = dict(n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=rd, rope_base=1e4)
    offset = mx.array([5 + 100 * b for b in range(B)], dtype=mx.int32)
    q, k, v, state, vprev = cca.cca_decode_step_reference(**a, offset=offset, **kw)
    ref_keys, ref_values = cca.write_kv_reference(keys, values, k, v, filled)
    mx.eval(q, state, vprev, ref_keys, ref_values)  # before the kernel writes into keys and values
    q_into = mx.full(q.shape, np.nan, dtype) if q_in_place else None
    with emulated():
        out = cca._cca_kernel(**a, offset=offset, keys=keys, values=values, filled=mx.array([filled], mx.int32),
                              norm_eps=None, back="cuda", q_into=q_into, **kw)
        if q_in_place:
            with pytest.raises(ValueError, match="one of its inputs"):
                cca._cca_kernel(**a, offset=offset, keys=keys, values=values, filled=filled, norm_eps=None,
                                back="cuda", q_into=keys, **kw)
    assert out[1] is keys and out[2] is values
    assert (out[0] is q_into) == q_in_place
    tol = 1e-2 if dtype == mx.bfloat16 else 1e-5
    for name, o, r in zip(("q", "keys", "values", "conv_state", "v_prev"), out, (q, ref_keys, ref_values, state, vprev)):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        assert max_rel(o, r) < tol, (name, max_rel(o, r))
    assert mx.array_equal(keys[:, :, : filled - 1], ref_keys[:, :, : filled - 1])
    assert mx.array_equal(keys[:, :, filled:], ref_keys[:, :, filled:])
    assert mx.array_equal(values, ref_values)


@pytest.mark.parametrize("lanes", [32, 16])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("pads,window,single_pass,fused", [(None, None, 64, False), ([0, 3], 6, 64, False),
                                                           ([0, 9], None, 4, False), ([0, 9], None, 4, True)])
def test_attention_body(pads, window, single_pass, fused, heads, lanes, monkeypatch):
    """Grouped heads, left padding, a sliding window, and (single_pass = 4) the split into chunks + combine, or
    (fused) the chunks merged by the last one's threadgroup in the same launch; a query head a threadgroup, or
    (heads = 2) both of a KV head's; a key a SIMD group, or (lanes 16) two at once."""
    monkeypatch.setattr(attention, "SINGLE_PASS_MAX", single_pass)
    monkeypatch.setattr(attention, "CHUNK", 4)
    monkeypatch.setattr(attention, "HEADS_PER_THREADGROUP", heads)
    monkeypatch.setattr(attention, "LANES_PER_KEY", lanes)
    monkeypatch.setattr(attention, "FUSED_COMBINE", fused)
    seen = launches(monkeypatch)
    mx.random.seed(7)
    B, NH, NKV, D, cap, length = 2, 4, 2, 32, 20, 13
    q, keys, values = rnd(B, NH, 1, D), rnd(B, NKV, cap, D), rnd(B, NKV, cap, D)
    lp = mx.array(pads, dtype=mx.int32) if pads is not None else None
    ref = attention.decode_attention_reference(q, keys, values, length, scale=D**-0.5, left_padding=lp, window=window)
    with emulated():  # the length as the fused step passes it: an array the kernel reads
        out = attention.decode_attention_kernel(q, keys, values, mx.array([length], mx.int32), scale=D**-0.5,
                                                left_padding=lp, window=window, back="cuda")
    assert out.shape == ref.shape and max_rel(out, ref) < 1e-5
    assert ("attention_combine.h" in [body for body, _ in seen]) == (single_pass < 20 and not fused)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("shape,pads,window,single_pass,lanes,fused",
                         [((2, 4, 2, 64, 2, 2, 32), None, None, 64, 32, False),
                          ((2, 4, 2, 64, 3, 2, 16), [0, 3], 6, 64, 16, False),
                          ((2, 4, 1, 64, 2, 2, 0), [0, 9], None, 4, 32, False),
                          ((2, 4, 1, 64, 2, 2, 0), [0, 9], None, 4, 16, False),
                          ((2, 4, 1, 64, 2, 2, 0), [0, 9], None, 4, 32, True)])
def test_cca_step_inside_attention_body(shape, pads, window, single_pass, lanes, fused, dtype, monkeypatch):
    """decode_attention.h with the CCA step inside (HAS_CCA) against the step's reference, its cache write and
    attention's reference with o_proj: the output, the new states, and the key and value written at position
    filled - 1 alone; with left padding, a sliding window, and (single_pass 4) the split into chunks + combine;
    lanes 16: a SIMD group's two key slots take the new key from threadgroup memory as a whole group does; fused: the
    chunks merged and o_proj applied by the last chunk's threadgroup, no combine launch."""
    monkeypatch.setattr(attention, "SINGLE_PASS_MAX", single_pass)
    monkeypatch.setattr(attention, "CHUNK", 4)
    monkeypatch.setattr(attention, "LANES_PER_KEY", lanes)
    monkeypatch.setattr(attention, "FUSED_COMBINE", fused)
    cap, filled = 20, 13
    a, kw, o_proj = _cca_attention_case(*shape, dtype, cap, filled, seed=sum(shape),
                                        o_proj=linear(40, shape[1] * shape[3], dtype))
    lp = mx.array(pads, dtype=mx.int32) if pads is not None else None
    want = _cca_attention_reference(a, kw, filled, lp, window, o_proj)
    mx.eval(want)  # before the kernel writes into the cache's buffers
    assert attention.cca_kernel_supported(a["qkv"], a["conv_state"], a["gw_w"], a["keys"], o_proj=o_proj,
                                          **{k: v for k, v in kw.items() if k != "scale"})
    seen = launches(monkeypatch)
    with emulated():
        got = attention.cca_decode_attention(**a, filled=mx.array([filled], mx.int32), left_padding=lp,
                                             window=window, o_proj=o_proj, impl="kernel", **kw)
    assert attention_launches(seen) == layer_launches(False, cap > single_pass and not fused)
    assert got[1] is a["keys"] and got[2] is a["values"]  # written in place
    out = got[0].sum(axis=1, keepdims=True)  # the heads' (or chunks' combined) shares of o_proj
    tol = 2e-2 if dtype == mx.bfloat16 else 1e-5
    assert out.shape == want[0].shape and max_rel(out, want[0]) < tol
    for name, g, w in zip(("keys", "values", "conv_state", "v_prev"), got[1:], want[1:]):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert max_rel(g, w) < (1e-2 if dtype == mx.bfloat16 else 1e-5), name
    for g, w in zip(got[1:3], want[1:3]):  # every other position as it was
        assert mx.array_equal(g[:, :, : filled - 1], w[:, :, : filled - 1]) and mx.array_equal(g[:, :, filled:],
                                                                                            w[:, :, filled:])
    assert mx.array_equal(got[2], want[2])  # the value is copied, not computed


@pytest.mark.parametrize("lanes,D", [(32, 64), (16, 64), (16, 128), (16, 256)])
@pytest.mark.parametrize("bits,group,single_pass", [(8, 32, 64), (4, 32, 64), (8, 64, 4)])
def test_attention_body_reads_a_quantized_cache(bits, group, single_pass, lanes, D, monkeypatch):
    """Keys and values as mx.quantize packs them (two groups a row at group 32), read in place: attention over the
    dequantized cache, in one pass and split into chunks. A lane's D / lanes values: 2 (4 bits: half a word), 4, 8
    (8 bits: two words in one load) or 16 (four words in one load)."""
    monkeypatch.setattr(attention, "SINGLE_PASS_MAX", single_pass)
    monkeypatch.setattr(attention, "CHUNK", 4)
    monkeypatch.setattr(attention, "LANES_PER_KEY", lanes)
    mx.random.seed(bits + group)
    B, NH, NKV, cap, length = 2, 4, 2, 20, 13
    q = rnd(B, NH, 1, D)
    keys, values = (mx.quantize(rnd(B, NKV, cap, D), group_size=group, bits=bits) for _ in range(2))
    lp = mx.array([0, 3], dtype=mx.int32)
    assert attention.kernel_supported(q, keys)
    ref = attention.decode_attention_reference(q, keys, values, length, scale=D**-0.5, left_padding=lp, window=9)
    with emulated():
        out = attention.decode_attention_kernel(q, keys, values, mx.array([length], mx.int32), scale=D**-0.5,
                                                left_padding=lp, window=9, back="cuda")
    assert out.shape == ref.shape and max_rel(out, ref) < 1e-5


@pytest.mark.parametrize("bits,single_pass,dtype,apart", [(8, 64, mx.bfloat16, False), (4, 4, mx.float32, False),
                                                          (8, 4, mx.bfloat16, True), (4, 4, mx.float32, True)])
def test_cca_step_inside_attention_writes_a_quantized_cache(bits, single_pass, dtype, apart, monkeypatch):
    """With a quantized cache the step quantizes the new key and value as mx.quantize does, at position filled - 1
    alone, and attends to them as the cache then holds them; in one pass and split into chunks; apart (as for shapes
    the one launch does not cover, float32 at head dim 128): the CCA kernel (cca_decode.h) writes them, and attention
    reads them from the cache."""
    monkeypatch.setattr(attention, "SINGLE_PASS_MAX", single_pass)
    monkeypatch.setattr(attention, "CHUNK", 4)
    cap, filled, group = 20, 13, 32
    a, kw, o_proj = _cca_attention_case(2, 4, 2, 64, 2, 2, 32, dtype, cap, filled, seed=bits,
                                        o_proj=linear(40, 4 * 64, dtype))
    a["keys"], a["values"] = (mx.quantize(a[n], group_size=group, bits=bits) for n in ("keys", "values"))
    lp = mx.array([0, 3], dtype=mx.int32)
    want = _cca_attention_reference(a, kw, filled, lp, 6, o_proj)
    mx.eval(want)  # before the kernel writes into the cache's buffers
    assert attention.cca_kernel_supported(a["qkv"], a["conv_state"], a["gw_w"], a["keys"], o_proj=o_proj,
                                          **{k: v for k, v in kw.items() if k != "scale"})
    if apart:
        monkeypatch.setattr(attention, "cca_kernel_supported", lambda *a, **k: False)
    seen = launches(monkeypatch)
    with emulated():  # 'auto': 'kernel' asks for the one launch
        got = attention.cca_decode_attention(**a, filled=mx.array([filled], mx.int32), left_padding=lp, window=6,
                                             o_proj=o_proj, impl="auto" if apart else "kernel", **kw)
    assert attention_launches(seen) == layer_launches(apart, cap > single_pass)
    assert got[1] is a["keys"] and got[2] is a["values"]  # written in place
    out = got[0].sum(axis=1, keepdims=True)
    assert out.shape == want[0].shape and max_rel(out, want[0]) < (2e-2 if dtype == mx.bfloat16 else 1e-5)
    for g, w in zip(got[1:3], want[1:3]):  # every other position as it was
        for gp, wp in zip(g, w):
            assert gp.dtype == wp.dtype and gp.shape == wp.shape
            assert mx.array_equal(gp[:, :, : filled - 1], wp[:, :, : filled - 1]).item()
            assert mx.array_equal(gp[:, :, filled:], wp[:, :, filled:]).item()
    # the new value (the step's input, copied) quantized as mx.quantize does it: the same integers; the scales and
    # biases to float32's last bit
    (gw, gs, gb), (ww, ws, wb) = got[2], want[2]
    assert mx.array_equal(gw, ww).item() and max_rel(gs, ws) < 1e-6 and max_rel(gb, wb) < 1e-6
    # the new key, computed in float32 where the reference rounds to dtype: as close as in the plain cache's test,
    # give or take one step of the integers (a bfloat16 difference may cross a rounding boundary)
    new, ref = (attention.dequantized(k, 64)[:, :, filled - 1].astype(mx.float32) for k in (got[1], want[1]))
    step = mx.abs(want[1][1][:, :, filled - 1]).max().item()
    tol = 2e-2 * mx.abs(ref).max().item() + step if dtype == mx.bfloat16 else 1e-5 * mx.abs(ref).max().item()
    assert mx.abs(new - ref).max().item() <= tol


O_PROJ_FORMATS = [("dense", None, True), ("affine", dict(group_size=64, bits=4), False),
                  ("affine", dict(group_size=32, bits=8), True),
                  ("mxfp4", dict(group_size=32, bits=4, mode="mxfp4"), False)]


@pytest.mark.parametrize("fmt,opts,bias,single_pass,threadgroups,fused",
                         [(*f, sp, tg, False) for f in O_PROJ_FORMATS
                          for sp, tg in ((64, 8), (64, 32), (4, 8), (4, 32))]
                         + [(*O_PROJ_FORMATS[-1], sp, 1024, False) for sp in (64, 4)]  # a row a share: one format
                         + [(*f, 4, 32, True) for f in O_PROJ_FORMATS])
def test_attention_body_with_o_proj(fmt, opts, bias, single_pass, threadgroups, fused, monkeypatch):
    """o_proj inside attention: the head blocks' shares (or, split into chunks, the combine's per-head shares) sum
    to o_proj of the plain attention, bias once; 72 output rows leave the last rows of a thread's round empty.
    o_proj's rows are spread over 1 (8 threadgroups for the 8 heads, or in chunks 8 merging them), 4 (18 rows each, so
    a round ends inside a SIMD group's rows) or 72 threadgroups a head (a row each); fused: in chunks, each head's
    last chunk's threadgroup merges them and adds all its rows, with no combine launch.
    float32 activations: MLX's quantized matmul in bfloat16 rounds too coarsely to be the reference."""
    monkeypatch.setattr(attention, "SINGLE_PASS_MAX", single_pass)
    monkeypatch.setattr(attention, "O_PROJ_THREADGROUPS", threadgroups)
    monkeypatch.setattr(attention, "CHUNK", 4)
    monkeypatch.setattr(attention, "FUSED_COMBINE", fused)
    mx.random.seed(11)
    B, NH, NKV, D, cap, length, HO = 2, 4, 2, 64, 20, 13, 72
    q, keys, values = rnd(B, NH, 1, D), rnd(B, NKV, cap, D), rnd(B, NKV, cap, D)
    o_proj = linear(HO, NH * D, mx.float32, opts, bias)
    lp = mx.array([0, 3], dtype=mx.int32)
    assert attention.kernel_supported(q, keys, o_proj)
    ref = attention.decode_attention_reference(q, keys, values, length, scale=D**-0.5, left_padding=lp, window=6,
                                               o_proj=o_proj)
    with emulated():
        parts = attention.decode_attention_kernel(q, keys, values, mx.array([length], mx.int32), scale=D**-0.5,
                                                  left_padding=lp, window=6, o_proj=o_proj, back="cuda")
    assert parts.dtype == mx.float32 and parts.shape == (B, NH, HO)  # one share a head (one head a threadgroup)
    assert ref.shape == (B, 1, HO) and max_rel(parts.sum(axis=1, keepdims=True), ref) < 1e-5


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_residual_norm_body_sums_partial_outputs(dtype):
    """o as 4 partial sums a row (o_proj's shares from the attention kernel), float32, rounded to dtype once summed."""
    mx.random.seed(5)
    N, H, P = 2, 256, 4
    o, h = rnd(N, P, H), rnd(N, 1, H, scale=4.0)
    p = [(mx.random.uniform(shape=(H,)) + 0.5).astype(dtype) for _ in range(5)]
    proj = linear(40, H, dtype)
    ref = norms.residual_norm_reference(o, h, *p[:4], p[4], 1e-5, proj, dtype=dtype)
    whole = norms.residual_norm_reference(o.sum(axis=1, keepdims=True), h, *p[:4], p[4], 1e-5, proj, dtype=dtype)
    assert all(mx.array_equal(a, b) for a, b in zip(ref, whole))  # the reference adds the parts first
    assert norms.kernel_supported(o, h, proj)
    with emulated():
        out = norms.residual_norm_kernel(o, h, *p[:4], p[4], 1e-5, proj, dtype=dtype, back="cuda")
    tol = 1e-2 if dtype == mx.bfloat16 else 1e-5
    assert [a.shape for a in out] == [(N, 1, H), (N, 1, H), (N, 1, 40)]
    assert max_rel(out[0], ref[0]) < 1e-5 and max_rel(out[1], ref[1]) < tol and max_rel(out[2], ref[2]) < tol


@pytest.mark.parametrize("quant", [None, "mxfp4"])
def test_fused_decode_runs_the_bodies_like_the_plain_ops(quant, monkeypatch):
    """The model's fused decode step with every kernel body emulated (the launchers, shapes and dtypes as on a
    GPU) gives the plain ops' logits, for a lone sequence and a left-padded batch."""
    from zaya_mlx.benchmark import build_zaya, fused_vs_plain, small_config

    dtype = mx.bfloat16 if quant else mx.float32
    model = build_zaya(small_config(), quant, seed=2, dtype=dtype)
    model.decode_options = DecodeOptions(compile=False)  # an emulated kernel reads its inputs' values
    for batch, pads in ((1, None), (2, [0, 3])):
        errors, _ = fused_vs_plain(model, model.args.vocab_size, batch, context=6, steps=2, left_padding=pads, fused_context=emulated)
        assert max(errors) < (1e-4 if dtype == mx.float32 else BF16_LOGITS), (batch, errors)


def test_fused_decode_with_grouped_experts_runs_like_the_plain_ops(monkeypatch):
    """From the batch DecodeOptions.group_experts_from names, the fused step runs the router's own launch and the
    expert kernel's grouped form (only that form: a launch of the one-token form would show), and gives the plain
    ops' logits."""
    from zaya_mlx.benchmark import build_zaya, fused_vs_plain, small_config

    model = build_zaya(small_config(), None, seed=2, dtype=mx.float32)
    model.decode_options = DecodeOptions(compile=False, group_experts_from=2)
    seen = launches(monkeypatch)
    errors, _ = fused_vs_plain(model, model.args.vocab_size, 2, context=5, steps=1, fused_context=emulated)
    assert max(errors) < 1e-4, errors
    forms = [t["GROUPED"] for body, t in seen if body == "expert_mlp.h"]
    assert forms and all(forms), forms


def test_fused_decode_on_a_quantized_cache_runs_the_bodies_like_the_plain_ops():
    """With an 8-bit KV cache the fused step (every body emulated: the CCA step inside attention, which writes the
    quantized key and value in place) gives the plain ops' logits (mlx-lm's QuantizedKVCache and quantized
    attention) for a batch of two; float32 activations (see test_kernels.py's fused decode on a quantized cache).
    4 bits: the attention body's tests."""
    from zaya_mlx.benchmark import build_zaya, fused_vs_plain, small_config

    bits = 8
    model = build_zaya(small_config(), None, seed=2, dtype=mx.float32)
    model.decode_options = DecodeOptions(compile=False)  # an emulated kernel reads its inputs' values
    errors, cache = fused_vs_plain(model, model.args.vocab_size, 2, context=6, steps=2, fused_context=emulated,
                                   kv_bits=bits)
    assert max(errors) < 1e-4, errors
    assert isinstance(cache[0][0].keys, tuple) and cache[0][0].keys[0].dtype == mx.uint32


def test_fused_decode_writes_only_buffers_it_owns(monkeypatch):
    """The CCA body writes the new key and value into the cache in place. An array that shared the prefill's
    buffer (a snapshot taken then) keeps its values; the step's own buffers are reused from step to step; a view
    of the held positions keeps its values across a trim and the next step."""
    from zaya_mlx.benchmark import build_zaya, small_config

    model = build_zaya(small_config(), None, seed=3, dtype=mx.float32)
    model.decode_options = DecodeOptions(fused=True, compile=False)
    cache = model.make_cache()
    model(mx.array([[3, 1, 4, 1, 5]], dtype=mx.int32), cache)
    kv = cache[0][0]
    snapshot = kv.keys
    before = np.array(snapshot)
    tok = mx.array([[9]], dtype=mx.int32)
    with emulated():
        mx.eval(model(tok, cache))
        first = kv.keys
        mx.eval(model(tok, cache))
    assert np.array_equal(np.array(snapshot), before)
    assert kv.keys is first and kv.offset == 7
    assert not np.array_equal(np.array(first[:, :, 5:7]), np.zeros_like(np.array(first[:, :, 5:7])))

    # a view of the held positions, then a trim below them: the next step writes elsewhere
    view = kv.state[0]
    held = np.array(view)
    kv.trim(2)
    with emulated():
        mx.eval(model(tok, cache))
    assert np.array_equal(np.array(view), held) and kv.offset == 6


def _first_decode(model, monkeypatch, plain=False):
    """Logits of a prompt's first decode step (fused=None, the default, the kernels emulated; plain: fused=False)."""
    cache = model.make_cache()
    mx.eval(model(mx.array([[3, 1, 4, 1, 5]], dtype=mx.int32), cache))
    options = model.decode_options
    model.decode_options = DecodeOptions(fused=False if plain else None, compile=False)
    try:
        with emulated():
            return np.array(model(mx.array([[9]], dtype=mx.int32), cache))
    finally:
        model.decode_options = options


def test_fused_decode_is_checked_before_it_serves(monkeypatch):
    """On a GPU (fused=None, the default) the first decode step checks the fused step and LM head kernel against the plain
    ops once a model; here they pass (the bodies emulated), so the step runs them, with no warning."""
    import warnings

    from zaya_mlx.benchmark import build_zaya, small_config

    model = build_zaya(small_config(), "mxfp4", seed=4, dtype=mx.bfloat16)
    launches = []
    real = kernel_emulator.EmulatedKernel.__call__
    monkeypatch.setattr(kernel_emulator.EmulatedKernel, "__call__",
                        lambda self, **k: launches.append(self.body) or real(self, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _first_decode(model, monkeypatch)
    assert model.decoder.checked == {"cuda": True}
    assert "decode_attention.h" in launches and "cca_decode.h" not in launches  # the CCA step inside attention
    checked = len(launches)
    _first_decode(model, monkeypatch)  # checked once: this step alone launches kernels
    assert 0 < len(launches) - checked < checked


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_a_failing_fused_kernel_falls_back_to_the_plain_ops(failure, monkeypatch):
    """A kernel that does not build (MLX raises RuntimeError, as Metal's compiler would) or computes garbage: the
    check warns once, and decoding gives the plain ops' logits."""
    from zaya_mlx import kernels
    from zaya_mlx.benchmark import build_zaya, small_config

    model = build_zaya(small_config(), None, seed=4, dtype=mx.float32)
    want = _first_decode(model, monkeypatch, plain=True)
    real = kernels.cca_decode_attention

    def broken(*args, **kwargs):
        if failure == "raises":
            raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: ...")
        out, *rest = real(*args, **kwargs)
        return (out * float("nan"), *rest)

    monkeypatch.setattr(kernels, "cca_decode_attention", broken)
    with pytest.warns(RuntimeWarning, match="failed their check on this cuda GPU .*plain MLX ops") as record:
        got = _first_decode(model, monkeypatch)
        _first_decode(model, monkeypatch)
    assert len(record) == 1
    assert ("Unable to build" if failure == "raises" else "differ") in str(record[0].message)
    assert model.decoder.checked == {"cuda": False}
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
