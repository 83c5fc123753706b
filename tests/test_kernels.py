"""Fused decode ops: references against independent truth (CPU), kernels against references (GPU).

On the CPU only the references run: they are checked against transformers' modules (the semantics) or
numpy with dequantized weights. Where MLX has a GPU back end (Metal, or CUDA: dev/run_on_device.sh
runs this file on an NVIDIA GPU), each kernel is checked against its reference for bfloat16, float32
and quantized weights, odd shapes and batches > 1; those tests skip elsewhere.
"""

import dataclasses
import os
import re
import typing

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from zaya_mlx.kernels import (
    QuantizedStack,
    backend,
    cca_decode_step,
    cca_decode_step_reference,
    decode_attention,
    decode_attention_reference,
    expert_gather,
    expert_gather_reference,
    lm_head,
    lm_head_reference,
    residual_norm,
    residual_norm_reference,
    routed_expert_gather,
    routed_expert_gather_reference,
    router_mlp,
    router_mlp_reference,
)
from zaya_mlx.decode import DecodeOptions
from zaya_mlx.kernels import RouterWeights, _build, attention, cca, experts, head, norms
from zaya_mlx.kernels.cca import write_kv_reference

GPU = backend() in ("metal", "cuda")
# float32 checks: MLX-CUDA runs float32 matmuls and convolutions in TF32 (~1e-4 relative) where the kernels and
# the CPU compute in float32, so on a GPU the float32 bound is the TF32 one.
F32 = 1e-5 if mx.default_device() == mx.cpu else 2e-3
gpu_only = pytest.mark.skipif(not GPU, reason="no Metal or CUDA back end here: kernels not run")
# bfloat16 fused decode vs plain ops, max |logit difference| / max |logit|: the kernels round in another order.
# Over seeds of the emulated MXFP4 model it is 1-2e-2 a step, with single steps up to 5e-2; a wrong state or
# index gives O(1).
BF16_LOGITS = 6e-2


def rel(a, b) -> float:
    a = np.array(a.astype(mx.float32)) if isinstance(a, mx.array) else np.asarray(a, np.float64)
    b = np.array(b.astype(mx.float32)) if isinstance(b, mx.array) else np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def rnd(*shape, scale=1.0, dtype=mx.float32):
    return (mx.random.normal(shape) * scale).astype(dtype)


def linear(rows, H, dtype, opts=None, bias=True):
    """A random nn.Linear(H, rows) in dtype (with a bias), quantized with opts (mx.quantize's) when given."""
    lin = nn.Linear(H, rows, bias=bias)
    lin.weight = rnd(rows, H, scale=H**-0.5, dtype=dtype)
    if bias:
        lin.bias = rnd(rows, scale=0.1, dtype=dtype)
    return lin.to_quantized(**opts) if opts else lin


# --- sources ----------------------------------------------------------------------------------------


def test_kernel_variants_are_keyed_by_every_dtype():
    """MLX-CUDA keeps one compiled variant per name + template arguments, while the buffers' types follow the
    arrays: every call must pass a key that changes with any input or output dtype, and only then."""
    keys = []

    def fake_kernel(*, inputs, template, output_dtypes, grid):
        assert template[:1] == [("T", mx.bfloat16)] and grid == (32, 1, 1)
        keys.append(dict(template)["ZK_DTYPES"])

    def call(in_dtypes, out_dtypes):
        _build._call_keyed_by_dtypes(fake_kernel, inputs=[mx.zeros((2,), d) for d in in_dtypes],
                                     template=[("T", mx.bfloat16)], output_dtypes=list(out_dtypes), grid=(32, 1, 1))

    f32, bf16 = mx.float32, mx.bfloat16
    for ins, outs in [((bf16, f32), (f32,)), ((bf16, bf16), (f32,)), ((f32, bf16), (f32,)), ((bf16, f32), (bf16,)),
                      ((bf16, f32), (f32,))]:
        call(ins, outs)
    assert len(set(keys[:4])) == 4 and keys[4] == keys[0]
    assert all(0 <= k < 2**31 for k in keys)  # a template int argument


@pytest.mark.parametrize("back", ["metal", "cuda"])
@pytest.mark.parametrize("body", ["cca_decode.h", "expert_mlp.h", "matvec.h", "router_mlp.h", "residual_norm.h",
                                  "decode_attention.h", "attention_combine.h"])
def test_kernel_sources_assemble_with_the_helpers_they_use_and_nothing_else(back, body):
    """MLX-CUDA hashes a kernel's whole source at every launch, so the assembled source leaves out comments,
    indentation and the helpers its body does not reach; the body must still find every helper it calls."""
    header, source = _build.kernel_source(body, back)
    if back == "cuda":  # each an include line of a saved file, ending in a line break: MLX-CUDA writes its code
        # right after the header, on the same line (its build_kernel), where the preprocessor would take it as text
        # after the directive
        for text in (header, source):
            assert re.fullmatch(r'#include "/[^"\n]+"\n', text)
        header, source = _included(header), _included(source)
    assert not re.search(r"_shape\b|_strides\b|_ndim\b", source)  # MLX-CUDA would have to see them: see kernel_source

    def defined(text):  # top-level definitions, read from the files' own layout (not the assembler's cutting)
        return set(re.findall(r"^(?:ZK_DEV\s.*?|struct\s+)(zk_\w+)\s*[({]", text, re.M))

    every_helper = defined(_build._prelude(back)[0] + _build._source("common.h"))
    assert len(every_helper) > 25
    named = set(re.findall(r"\bzk_\w+", header + source)) & every_helper
    assert named <= defined(header) < every_helper
    assert "#define ZK_SHARED" in header  # the macros stay, all of them
    assert "//" not in header + source and "/*" not in header + source
    assert all(line and not line[0].isspace() for line in (header + "\n" + source).split("\n"))
    assert source.startswith("const int zk_tid")
    if back == "metal":  # MLX adds a Metal attribute argument only when the source names it
        assert "thread_position_in_threadgroup" in source and "simdgroup_index_in_threadgroup" in source
    else:
        assert "threadIdx.x" in source


def _included(text: str) -> str:
    """The text behind an include line that kernel_source made (CUDA), or the text itself."""
    m = re.fullmatch(r'#include "([^"]+)"\n', text)
    return open(m.group(1)).read() if m else text


def test_compact_drops_comments_indentation_and_blank_lines_only():
    text = ('  int a = 1;  // one\n\n/* two\n  lines */ int b = 2;\n#define M(x) \\\n    (x)  /* m */\n'
            'const char* s = "a // b /* c */";\n\t}\n')
    assert _build.compact(text) == 'int a = 1;\nint b = 2;\n#define M(x) \\\n(x)\nconst char* s = "a // b /* c */";\n}'


def test_helpers_keep_what_a_body_reaches_through_other_helpers_and_macros(monkeypatch):
    common = """
// shared
struct zk_a { float x; };
template <typename T>
ZK_DEV zk_a zk_b(T p) {
  zk_a r = {zk_c(p)};
  return r;
}
ZK_DEV float zk_c(float p) { return p; }
ZK_DEV float zk_c(int p) { return p; }
ZK_DEV float zk_unused(float p) { return zk_c(p); }
ZK_DEV float zk_d(float p) {
#ifdef __METAL_VERSION__
  return p;
#else
  return -p;
#endif
}
ZK_DEV float zk_e(float p) { return p; }
"""
    monkeypatch.setattr(_build, "_source", lambda name: common)
    prelude = "#define ZK_DEV inline\n#define ZK_X(p) zk_b(p)\nusing namespace metal;\n"
    assert _build.helpers("float y = zk_d(1.0f);", prelude) == "\n".join([
        "#define ZK_DEV inline", "#define ZK_X(p) zk_b(p)", "using namespace metal;", "struct zk_a { float x; };",
        "template <typename T>", "ZK_DEV zk_a zk_b(T p) {", "zk_a r = {zk_c(p)};", "return r;", "}",
        "ZK_DEV float zk_c(float p) { return p; }", "ZK_DEV float zk_c(int p) { return p; }",
        "ZK_DEV float zk_d(float p) {", "#ifdef __METAL_VERSION__", "return p;", "#else", "return -p;", "#endif", "}"])
    assert "zk_e" in _build.helpers("zk_e(2.0f)") and "zk_d" not in _build.helpers("zk_e(2.0f)")


def test_on_cuda_the_header_and_body_are_includes_of_files_saved_once_by_their_content(tmp_path, monkeypatch):
    """MLX-CUDA hashes a kernel's whole source at every launch: on CUDA the helpers and the body travel as includes
    of files (NVRTC reads them), each named by a checksum of its text, so a changed text is a changed source to MLX's
    caches; where no file can be saved, the text itself."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "zaya-mlx" / "kernels"
    header, source = _build.kernel_source("router_mlp.h", "cuda")
    inline_header, inline_source = _build.kernel_source("router_mlp.h", "metal")  # Metal: inline
    assert inline_header.startswith("#include <metal_stdlib>")
    prologue = _build.compact(_build._prelude("cuda")[1] + "\n")
    body = _build.compact(_build._source("router_mlp.h"))
    paths = [re.fullmatch(r'#include "(.+)"\n', line).group(1) for line in (header, source)]
    assert [os.path.dirname(p) for p in paths] == [str(folder)] * 2
    assert open(paths[0]).read() == _build.helpers(prologue + "\n" + body, _build._prelude("cuda")[0])
    assert open(paths[1]).read() == prologue + "\n" + body
    assert _build.kernel_source("matvec.h", "cuda")[0] != header  # other helpers, another file
    open(paths[1], "w").write("damaged")
    assert _build.kernel_source("router_mlp.h", "cuda")[1] == source and open(paths[1]).read() != "damaged"
    assert sorted(p.suffix for p in folder.iterdir()) == [".cuh"] * 4  # no temporary file left

    (tmp_path / "zaya-mlx").rename(tmp_path / "moved")
    (tmp_path / "zaya-mlx").write_text("a file where the folder would be")
    text_header, text_source = _build.kernel_source("router_mlp.h", "cuda")
    assert text_source == prologue + "\n" + body + "\n" and "#define ZK_DEV __device__" in text_header
    assert text_header.endswith("}\n")  # MLX-CUDA's code follows on the next line
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / 'a "quoted" folder'))
    assert _build.kernel_source("router_mlp.h", "cuda") == (text_header, text_source)  # no include line can name it


def test_an_edited_body_compiles_under_another_name(monkeypatch):
    """MLX caches a compiled kernel by its name and template arguments for the process: a body edited since (as
    dev/lab.py empties them) must get another name, or the old compiled code would run."""
    names = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: names.append(kw["name"]) or kw)

    def name_of_router_kernel():
        _build.get_kernel.cache_clear()
        _build.get_kernel("router_mlp.h", "cuda", ("r",), ("choice",))
        return names[-1]

    real = name_of_router_kernel()
    source = _build._source
    edit = ("const int n = zk_bx;", "const int n = 0 + zk_bx;")
    assert edit[0] in source("router_mlp.h")
    monkeypatch.setattr(_build, "_source", lambda name: source(name).replace(*edit)
                        if name == "router_mlp.h" else source(name))
    edited = name_of_router_kernel()
    monkeypatch.setattr(_build, "_source", source)
    assert name_of_router_kernel() == real
    assert real.startswith("zaya_router_mlp_") and edited.startswith("zaya_router_mlp_") and edited != real
    _build.get_kernel.cache_clear()  # the fake kernels must not outlive the test


# --- CCA: reference against transformers ----------------------------------------------------------


def _torch_cca(nh, nkv, d, t0, t1, B, T, seed):
    torch = pytest.importorskip("torch")
    zaya = pytest.importorskip("transformers.models.zaya.modeling_zaya")
    from transformers import ZayaConfig

    torch.manual_seed(seed)
    H = 48
    cfg = ZayaConfig(
        vocab_size=32, hidden_size=H, num_hidden_layers=1, num_attention_heads=nh, num_key_value_heads=nkv,
        head_dim=d, cca_time0=t0, cca_time1=t1, moe_intermediate_size=32, num_experts=2, router_hidden_size=16,
    )
    proj = zaya.ZayaCCAProjection(cfg, 0).float()
    for p in proj.parameters():
        torch.nn.init.normal_(p, std=0.3)
    norm = zaya.ZayaQKNorm(cfg)
    torch.nn.init.uniform_(norm.temp, 0.5, 1.5)
    rope = zaya.ZayaRotaryEmbedding(cfg)
    x = torch.randn(B, T, H)
    with torch.no_grad():
        q, k, v = proj(x, None)
        q, k = norm(q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope(x, torch.arange(T)[None], "hybrid")
        q, k = zaya.apply_rotary_pos_emb(q, k, cos, sin)
    w_in = torch.cat([proj.q_proj.weight, proj.k_proj.weight, proj.v_proj_current.weight, proj.v_proj_delayed.weight])
    qkv = torch.einsum("bth,ph->btp", x, w_in)
    m = lambda t: mx.array(t.detach().numpy())  # noqa: E731
    weights = dict(
        dw_w=m(proj.conv_qk_depthwise.weight.permute(0, 2, 1)),
        dw_b=m(proj.conv_qk_depthwise.bias),
        gw_w=m(proj.conv_qk_grouped.weight.permute(0, 2, 1)),
        gw_b=m(proj.conv_qk_grouped.bias),
        temp=m(norm.temp),
    )
    theta = cfg.rope_parameters["hybrid"]["rope_theta"]
    rd = int(d * cfg.rope_parameters["hybrid"]["partial_rotary_factor"])
    return m(qkv), weights, (q.numpy(), k.numpy(), v.numpy()), theta, rd


@pytest.mark.parametrize("nh,nkv,d,t0,t1", [(4, 2, 16, 2, 2), (6, 3, 8, 3, 2), (2, 1, 8, 2, 3)])
def test_cca_reference_matches_transformers(nh, nkv, d, t0, t1):
    B, T = 2, 5
    qkv, w, (tq, tk, tv), theta, rd = _torch_cca(nh, nkv, d, t0, t1, B, T, seed=nh * 7 + t0)
    C = (nh + nkv) * d
    state = mx.zeros((B, t0 - 1 + t1 - 1, C))
    v_prev = mx.zeros((B, nkv * d // 2))
    for t in range(T):
        q, k, v, state, v_prev = cca_decode_step_reference(
            qkv[:, t], state, v_prev, **w, offset=t, n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=rd,
            rope_base=theta,
        )
        assert q.shape == (B, nh, 1, d) and k.shape == (B, nkv, 1, d) and v.shape == (B, nkv, 1, d)
        assert rel(q[:, :, 0], tq[:, :, t]) < F32
        assert rel(k[:, :, 0], tk[:, :, t]) < F32
        assert rel(v[:, :, 0], tv[:, :, t]) < F32


def _cca_inputs(B, nh, nkv, d, t0, t1, dtype, seed):
    mx.random.seed(seed)
    C = (nh + nkv) * d
    P = C + nkv * d
    S = t0 - 1 + t1 - 1
    return dict(
        qkv=rnd(B, P, dtype=dtype),
        conv_state=rnd(B, S, C, dtype=dtype),
        v_prev=rnd(B, nkv * d // 2, dtype=dtype),
        dw_w=rnd(C, t0, 1, scale=0.5, dtype=dtype),
        dw_b=rnd(C, scale=0.1, dtype=dtype),
        gw_w=rnd(C, t1, d, scale=0.1, dtype=dtype),
        gw_b=rnd(C, scale=0.1, dtype=dtype),
        temp=(mx.random.uniform(shape=(nkv,)) + 0.5).astype(dtype),
    )


def test_cca_reference_per_row_offsets():
    nh, nkv, d = 4, 2, 16
    a = _cca_inputs(3, nh, nkv, d, 2, 2, mx.float32, seed=1)
    kw = dict(n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=8, rope_base=1e4)
    offs = [0, 17, 300]
    both = cca_decode_step_reference(**a, offset=mx.array(offs, dtype=mx.int32), **kw)
    for b, off in enumerate(offs):
        row = {k: (v[b : b + 1] if k in ("qkv", "conv_state", "v_prev") else v) for k, v in a.items()}
        alone = cca_decode_step_reference(**row, offset=off, **kw)
        for x, y in zip(both, alone):
            assert mx.array_equal(x[b : b + 1], y)


# --- experts: reference against numpy with dequantized weights --------------------------------------

FORMATS = [
    ("dense", None),
    ("affine", dict(group_size=64, bits=4)),
    ("affine", dict(group_size=32, bits=8)),
    ("affine", dict(group_size=32, bits=4)),
    ("mxfp4", dict(group_size=32, bits=4, mode="mxfp4")),
]


def _expert_inputs(N, H, I, E, fmt, opts, dtype, wdtype, seed, expert=None):
    mx.random.seed(seed)
    x = rnd(N, H, dtype=dtype)
    gu = rnd(E, 2 * I, H, scale=H**-0.5)
    dn = rnd(E, H, I, scale=I**-0.5)
    if expert is None:
        expert = [(3 * n + 1) % (E + 1) for n in range(N)]
    expert = mx.array(expert, dtype=mx.int32)
    weight = mx.random.uniform(shape=(N,)).astype(dtype)
    if fmt == "dense":
        gu, dn = gu.astype(wdtype), dn.astype(wdtype)
        dense = (gu.astype(mx.float32), dn.astype(mx.float32))
    else:
        gu = QuantizedStack.quantize(gu.astype(wdtype), **opts)
        dn = QuantizedStack.quantize(dn.astype(wdtype), **opts)
        dense = (gu.dequantize(), dn.dequantize())
    return x, expert, weight, gu, dn, dense


def _expert_numpy(x, expert, weight, dense):
    gu, dn = (np.array(t) for t in dense)
    x = np.array(x.astype(mx.float32), np.float64)
    E, two_i, _ = gu.shape
    out = np.zeros_like(x)
    for n, e in enumerate(np.array(expert)):
        if e >= E:
            continue
        h = gu[e].astype(np.float64) @ x[n]
        g, u = h[: two_i // 2], h[two_i // 2 :]
        out[n] = dn[e] @ (g / (1 + np.exp(-g)) * u) * float(np.array(weight.astype(mx.float32))[n])
    return out


@pytest.mark.parametrize("fmt,opts", FORMATS)
def test_expert_reference_matches_numpy(fmt, opts):
    x, expert, weight, gu, dn, dense = _expert_inputs(6, 128, 64, 4, fmt, opts, mx.float32, mx.float32, seed=3)
    y = expert_gather_reference(x, expert, weight, gu, dn)
    truth = _expert_numpy(x, expert, weight, dense)
    assert y.shape == x.shape
    assert rel(y, truth) < 1e-5
    skip = np.array(expert) == 4
    assert skip.any() and (np.array(y)[skip] == 0).all()


def test_expert_op_adds_into_a_given_row_without_a_kernel():
    """Where the references run, ``into`` comes back with the experts' sum added and no launch to wait for."""
    x, expert, weight, gu, dn, dense = _expert_inputs(3, 64, 32, 2, "dense", None, mx.float32, mx.float32, seed=5)
    into = rnd(3, 64)
    summed, after = expert_gather(x, expert, weight, gu, dn, into=into, impl="reference")
    assert after is None
    assert rel(summed, np.array(into) + _expert_numpy(x, expert, weight, dense)) < 1e-5


def test_expert_reference_accepts_mlx_lm_modules():
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    mx.random.seed(4)
    gu, dn = SwitchLinear(64, 2 * 32, 3, bias=False), SwitchLinear(32, 64, 3, bias=False)
    x = rnd(4, 64)
    expert, weight = mx.array([0, 3, 2, 1], dtype=mx.int32), mx.ones((4,))
    y = expert_gather_reference(x, expert, weight, gu, dn)
    qgu, qdn = QuantizedSwitchLinear(64, 64, 3, bias=False, group_size=32, bits=4, mode="mxfp4"), QuantizedSwitchLinear(
        32, 64, 3, bias=False, group_size=32, bits=4, mode="mxfp4"
    )
    yq = expert_gather_reference(x, expert, weight, qgu, qdn)
    dense = (QuantizedStack(qgu.weight, qgu.scales, None, 32, 4, "mxfp4").dequantize(),
             QuantizedStack(qdn.weight, qdn.scales, None, 32, 4, "mxfp4").dequantize())
    assert rel(yq, _expert_numpy(x, expert, weight, dense)) < 1e-5
    assert rel(y, _expert_numpy(x, expert, weight, (gu.weight, dn.weight))) < 1e-5


# --- router and residual norm: references against transformers -----------------------------------


def test_router_reference_matches_transformers():
    torch = pytest.importorskip("torch")
    zaya = pytest.importorskip("transformers.models.zaya.modeling_zaya")
    from transformers import ZayaConfig

    torch.manual_seed(5)
    cfg = ZayaConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, num_experts=6, router_hidden_size=32, moe_intermediate_size=32)
    router = zaya.ZayaRouter(cfg, 1)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    router.balancing_biases.copy_(torch.randn(7) * 0.05)
    x, prev = torch.randn(1, 9, 64), torch.randn(1, 9, 32)
    with torch.no_grad():
        _, probs, idx, nxt = router(x, prev)
        r_down = router.down_proj(x)
    m = lambda t: mx.array(t.detach().numpy())  # noqa: E731
    mlp = router.router_mlp
    # the state the residual norm's prev_state makes (see test_residual_norm_reference_carries_the_router_state)
    r = m(r_down[0]) + m(prev[0]) * m(router.router_states_scale)
    assert rel(r, nxt[0].numpy()) < F32
    choice, weight = router_mlp_reference(r, RouterWeights(
        m(mlp.norm.weight), m(mlp.fc1.weight), m(mlp.fc1.bias), m(mlp.fc2.weight), m(mlp.fc2.bias),
        m(mlp.out_proj.weight), m(router.balancing_biases), cfg.rms_norm_eps))
    # transformers maps the skip choice (index E) to expert 0 with weight 0 before its experts run
    skip = np.array(choice) == 6
    assert skip.any() and (~skip).any()
    assert (np.where(skip, 0, np.array(choice)) == idx.reshape(-1).numpy()).all()
    assert rel(np.where(skip, 0, np.array(weight)), probs.reshape(-1).numpy()) < F32


def test_residual_norm_reference_matches_transformers():
    torch = pytest.importorskip("torch")
    zaya = pytest.importorskip("transformers.models.zaya.modeling_zaya")
    torch.manual_seed(6)
    H = 96
    res = zaya.ZayaResidualScaling(H)
    norm = zaya.ZayaRMSNorm(H, eps=1e-5)
    for p in list(res.parameters()) + list(norm.parameters()):
        torch.nn.init.normal_(p, mean=1.0, std=0.3)
    o, h = torch.randn(3, H), torch.randn(3, H) * 4
    wd, bd = torch.randn(24, H) * 0.1, torch.randn(24) * 0.1
    down = nn.Linear(H, 24)
    down.weight, down.bias = mx.array(wd.numpy()), mx.array(bd.numpy())
    with torch.no_grad():
        hn = res(o, h)
        x = norm(hn)
        r = x @ wd.T + bd
    m = lambda t: mx.array(t.detach().numpy())  # noqa: E731
    h2, x2, r2 = residual_norm_reference(
        m(o), m(h), m(res.hidden_states_scale), m(res.hidden_states_bias), m(res.residual_scale), m(res.residual_bias),
        m(norm.weight), 1e-5, down,
    )
    assert rel(h2, hn.numpy()) < 1e-6 and rel(x2, x.numpy()) < F32 and rel(r2, r.numpy()) < F32


def _attention_numpy(q, keys, values, length, scale, pads, window):
    """Softmax attention of one query per head over positions [start_b, length), written out by hand."""
    q, k, v = (np.array(a.astype(mx.float32), np.float64) for a in (q, keys, values))
    B, NH, _, D = q.shape
    rep = NH // k.shape[1]
    out = np.zeros((B, NH, 1, D))
    for b in range(B):
        start = max(pads[b] if pads is not None else 0, length - window if window else 0)
        for h in range(NH):
            kk, vv = k[b, h // rep, start:length], v[b, h // rep, start:length]
            s = kk @ q[b, h, 0] * scale
            p = np.exp(s - s.max())
            out[b, h, 0] = (p / p.sum()) @ vv
    return out.reshape(B, 1, NH * D)  # o_proj's input layout


@pytest.mark.parametrize("pads,window", [(None, None), ([0, 3, 5], None), (None, 6), ([0, 9, 2], 6)])
def test_decode_attention_reference_matches_numpy(pads, window):
    """Cache buffers longer than the filled length, grouped heads, left padding and a sliding window."""
    mx.random.seed(5)
    B, NH, NKV, D, cap, length = 3, 8, 2, 32, 20, 13
    q, keys, values = rnd(B, NH, 1, D), rnd(B, NKV, cap, D), rnd(B, NKV, cap, D)
    lp = mx.array(pads, dtype=mx.int32) if pads is not None else None
    out = decode_attention_reference(q, keys, values, length, scale=D**-0.5, left_padding=lp, window=window)
    assert rel(out, _attention_numpy(q, keys, values, length, D**-0.5, pads, window)) < 1e-5


# --- kernels against references (GPU only) ----------------------------------------------------------

CCA_SHAPES = [  # nh, nkv, d, t0, t1, rope dims, batch
    (8, 2, 128, 2, 2, 64, 1),
    (8, 2, 128, 2, 2, 64, 8),
    (6, 3, 48, 3, 2, 16, 3),
    (4, 4, 64, 2, 3, 64, 2),
    (5, 1, 32, 2, 2, 0, 3),
]


@gpu_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("shape", CCA_SHAPES)
def test_cca_kernel_matches_reference(shape, dtype):
    """q and the states as the reference; the key and value written in place into the cache at position
    filled - 1 (a GPU-side array), every other position untouched."""
    nh, nkv, d, t0, t1, rd, B = shape
    a = _cca_inputs(B, nh, nkv, d, t0, t1, dtype, seed=sum(shape))
    kw = dict(n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=rd, rope_base=5e6 if rd == 64 else 1e4)
    offset = mx.array([7 + 1000 * b for b in range(B)], dtype=mx.int32) if B > 1 else 123
    cap, filled = 40, 33
    keys, values = rnd(B, nkv, cap, d, dtype=dtype), rnd(B, nkv, cap, d, dtype=dtype)
    q, k, v, state, vprev = cca_decode_step_reference(**a, offset=offset, **kw)
    ref_keys, ref_values = write_kv_reference(keys, values, k, v, filled)
    mx.eval(q, state, vprev, ref_keys, ref_values)  # before the kernel writes into keys and values
    out = cca_decode_step(**a, offset=offset, keys=keys, values=values, filled=mx.array([filled], mx.int32),
                          impl="kernel", **kw)
    mx.eval(out)
    tol = 1e-2 if dtype == mx.bfloat16 else F32
    for name, o, r in zip(("q", "keys", "values", "conv_state", "v_prev"), out, (q, ref_keys, ref_values, state, vprev)):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        if name == "q":
            assert rel(o, r) < tol, (name, rel(o, r))
        elif name == "keys":
            assert rel(o[:, :, filled - 1], r[:, :, filled - 1]) < tol, name
        else:
            assert mx.array_equal(o, r), name
    assert mx.array_equal(keys[:, :, : filled - 1], ref_keys[:, :, : filled - 1])
    assert mx.array_equal(keys[:, :, filled:], ref_keys[:, :, filled:])


@gpu_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_cca_kernel_writes_the_query_into_a_given_array(dtype):
    """The fused step's form, at ZAYA's shapes: q written into an array filled with NaN first (an element left
    unwritten shows), the states as new outputs."""
    nh, nkv, d, B = 8, 2, 128, 2
    a = _cca_inputs(B, nh, nkv, d, 2, 2, dtype, seed=5)
    kw = dict(n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=64, rope_base=5e6)
    keys, values = rnd(B, nkv, 16, d, dtype=dtype), rnd(B, nkv, 16, d, dtype=dtype)
    q, _, _, state, vprev = cca_decode_step_reference(**a, offset=9, **kw)
    mx.eval(q, state, vprev)
    q_into = mx.full(q.shape, float("nan"), dtype)
    mx.eval(q_into)
    out = cca_decode_step(**a, offset=9, keys=keys, values=values, filled=10, q_into=q_into, impl="kernel", **kw)
    mx.eval(out)
    assert out[0] is q_into
    assert rel(q_into, q) < (1e-2 if dtype == mx.bfloat16 else F32)
    assert mx.array_equal(out[3], state) and mx.array_equal(out[4], vprev)


class _Launch(typing.NamedTuple):
    body: str
    args: list  # (argument name, array) pairs, the inputs in the body's order
    outs: list
    template: tuple  # (name, value) pairs


def _record_launches(monkeypatch) -> list[_Launch]:
    """_build.get_kernel replaced by kernels that record each launch and return zeros of their output shapes: what
    the host would send a GPU, without one."""
    launches = []

    def fake(body, back, names, outputs, absent=(), views=(), inplace=()):
        def call(*, inputs: list, output_shapes, output_dtypes, template=(), **_):
            outs = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
            launches.append(_Launch(body, list(zip(names, inputs)), outs, tuple(template)))
            return outs
        return call

    monkeypatch.setattr(_build, "get_kernel", fake)
    return launches


def test_a_grown_kv_buffer_compiles_no_new_variant(monkeypatch):
    """MLX compiles a kernel variant per name and template arguments; a KV buffer's capacity reaches the CCA step
    and attention at run time, so a decode that grows its buffers (256 -> 512 positions) compiles nothing mid-way
    (NVRTC takes seconds a variant)."""
    launches = _record_launches(monkeypatch)
    nh, nkv, d = 8, 2, 128
    a = _cca_inputs(1, nh, nkv, d, 2, 2, mx.bfloat16, seed=3)
    kw = dict(n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=64, rope_base=5e6)
    variants = []
    for cap in (256, 512):
        launches.clear()
        keys, values = mx.zeros((1, nkv, cap, d), mx.bfloat16), mx.zeros((1, nkv, cap, d), mx.bfloat16)
        q = cca._cca_kernel(**a, offset=9, keys=keys, values=values, filled=10, norm_eps=None, back="cuda", **kw)[0]
        attention.decode_attention_kernel(q, keys, values, 10, scale=d ** -0.5, back="cuda")
        variants.append([(launch.body, launch.template) for launch in launches])
    assert [body for body, _ in variants[0]] == ["cca_decode.h", "decode_attention.h"]
    assert variants[0] == variants[1]


@gpu_only
def test_cca_kernel_decodes_a_sequence():
    """Chained steps: the kernel's states and cache feed the next step as the reference's do."""
    nh, nkv, d = 8, 2, 128
    a = _cca_inputs(2, nh, nkv, d, 2, 2, mx.float32, seed=11)
    kw = dict(n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=64, rope_base=5e6)
    s_ref = s_k = mx.zeros_like(a["conv_state"])
    v_ref = v_k = mx.zeros_like(a["v_prev"])
    k_ref, val_ref = mx.zeros((2, nkv, 8, d)), mx.zeros((2, nkv, 8, d))
    k_k, val_k = mx.zeros((2, nkv, 8, d)), mx.zeros((2, nkv, 8, d))
    w = {k: a[k] for k in ("dw_w", "dw_b", "gw_w", "gw_b", "temp")}
    for t in range(4):
        qkv = rnd(2, a["qkv"].shape[1])
        qr, k_ref, val_ref, s_ref, v_ref = cca_decode_step(qkv, s_ref, v_ref, **w, offset=t, keys=k_ref,
                                                           values=val_ref, filled=t + 1, impl="reference", **kw)
        qk, k_k, val_k, s_k, v_k = cca_decode_step(qkv, s_k, v_k, **w, offset=t, keys=k_k, values=val_k,
                                                   filled=mx.array([t + 1], mx.int32), impl="kernel", **kw)
        mx.eval(qr, k_ref, val_ref, s_ref, v_ref, qk, k_k, val_k, s_k, v_k)
        assert rel(qk, qr) < F32 and rel(k_k, k_ref) < F32
        assert mx.array_equal(val_k, val_ref) and mx.array_equal(s_k, s_ref)


EXPERT_CASES = [  # N, H, I, E, expert choices (None: a mix with skips)
    (1, 2048, 2048, 16, [5]),
    (8, 2048, 2048, 16, None),
    (5, 320, 192, 5, [0, 5, 2, 2, 4]),
    (3, 256, 128, 3, [3, 3, 1]),
]


@gpu_only
@pytest.mark.parametrize("fmt,opts", FORMATS)
@pytest.mark.parametrize("case", EXPERT_CASES)
def test_expert_kernel_matches_reference(case, fmt, opts):
    N, H, I, E, choice = case
    for dtype, wdtype in ((mx.bfloat16, mx.bfloat16), (mx.float32, mx.float32)):
        if fmt != "dense" and dtype == mx.float32 and H > 512:
            continue
        x, expert, weight, gu, dn, _ = _expert_inputs(N, H, I, E, fmt, opts, dtype, wdtype, seed=N + H, expert=choice)
        ref = expert_gather_reference(x, expert, weight, gu, dn)
        out = expert_gather(x, expert, weight, gu, dn, impl="kernel")
        assert out.shape == ref.shape and out.dtype == ref.dtype
        tol = 2e-2 if dtype == mx.bfloat16 else F32
        assert rel(out, ref) < tol, (dtype, rel(out, ref))
        skip = np.array(expert) >= E
        assert (np.array(out.astype(mx.float32))[skip] == 0).all()


@gpu_only
@pytest.mark.parametrize("fmt,opts", FORMATS)
@pytest.mark.parametrize("N", [1, 8, 16, 32])
def test_grouped_expert_kernel_matches_reference(N, fmt, opts):
    """The grouped form at ZAYA's widths (16 experts, tiles of 2 tokens), each token's sum against the reference's
    and the one-token form's; skips among the tokens."""
    E = 16
    choice = None if N > 1 else [5]
    x, expert, weight, gu, dn, _ = _expert_inputs(N, 2048, 2048, E, fmt, opts, mx.bfloat16, mx.bfloat16, seed=N,
                                                  expert=choice)
    ref = expert_gather_reference(x, expert, weight, gu, dn)
    out = expert_gather(x, expert, weight, gu, dn, grouped=True, impl="kernel")
    one = expert_gather(x, expert, weight, gu, dn, impl="kernel")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel(out, ref) < 2e-2 and rel(out, one) < 1e-5, (rel(out, ref), rel(out, one))  # atomics in another order
    assert (np.array(out)[np.array(expert) >= E] == 0).all()


def test_lm_head_kernel_takes_only_rows_of_its_width():
    """A head whose rows are not h's width goes to MLX's matmul (which raises its own error), never to the kernel,
    which would read past each row."""
    h = rnd(1, 1, 256, dtype=mx.bfloat16)
    for opts in (None, dict(group_size=32, bits=4, mode="mxfp4")):
        assert head.kernel_supported(h, linear(1001, 256, mx.bfloat16, opts))
        assert not head.kernel_supported(h, linear(1001, 512, mx.bfloat16, opts))
        assert not head.kernel_supported(rnd(5, 1, 256, dtype=mx.bfloat16), linear(1001, 256, mx.bfloat16, opts))


def test_lm_head_kernel_takes_only_heads_its_grid_can_hold():
    """A grid's rows of threadgroups (its y, at most 65,535 on CUDA) hold blocks of 8 weight rows: 524,280 rows fit,
    one more goes to MLX's matmul. (Weights of zeros, never multiplied: the check reads shapes.)"""
    h = mx.zeros((1, 1, 32), mx.bfloat16)
    for rows, fits in ((65535 * 8, True), (65535 * 8 + 1, False)):
        layer = nn.Linear(32, 8, bias=False)
        layer.weight = mx.zeros((rows, 32), mx.bfloat16)
        assert head.kernel_supported(h, layer) == fits


@gpu_only
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("fmt,opts", FORMATS)
def test_lm_head_kernel_matches_reference(fmt, opts, tied):
    """The head through the expert matvec body at 1 and 4 rows (an odd vocab), tied embedding or untied
    head with a bias, against MLX's matmul on the same weights."""
    import mlx.nn as nn

    mx.random.seed(8)
    V, H = 1001, 2048
    layer = nn.Embedding(V, H) if tied else nn.Linear(H, V, bias=True)
    layer.set_dtype(mx.bfloat16)
    if fmt != "dense":
        layer = layer.to_quantized(**opts)
    for n in (1, 4):
        h = rnd(n, 1, H, dtype=mx.bfloat16)
        out = lm_head(h, layer, impl="kernel")
        ref = lm_head_reference(h, layer)
        assert out.shape == ref.shape == (n, 1, V) and out.dtype == ref.dtype
        assert rel(out, ref) < 1e-2


@gpu_only
def test_expert_kernel_decode_shape():
    x, expert, weight, gu, dn, _ = _expert_inputs(2, 256, 128, 4, "mxfp4", FORMATS[4][1], mx.bfloat16, mx.bfloat16, seed=9)
    out = expert_gather(x.reshape(2, 1, 256), expert, weight, gu, dn, impl="kernel")
    assert out.shape == (2, 1, 256)
    assert rel(out.reshape(2, 256), expert_gather_reference(x, expert, weight, gu, dn)) < 2e-2


def _router_weights(R, E1, dtype):
    return RouterWeights(
        (mx.random.uniform(shape=(R,)) + 0.5).astype(dtype),
        rnd(R, R, scale=R**-0.5 * 2, dtype=dtype),
        rnd(R, scale=0.1, dtype=dtype),
        rnd(R, R, scale=R**-0.5 * 2, dtype=dtype),
        rnd(R, scale=0.1, dtype=dtype),
        rnd(E1, R, scale=R**-0.5 * 3, dtype=dtype),
        rnd(E1, scale=0.05),
        1e-5,
    )


def _same_choices(c, c_ref, w, w_ref, dtype):
    """The kernel's choices and weights against the reference's: equal in float32; in bfloat16 a logit may round a
    near-tie the other way, so at least half agree and the weights of those that do agree."""
    assert c.dtype == mx.int32 and c.shape == c_ref.shape and w.dtype == mx.float32
    same = np.array(c) == np.array(c_ref)
    if dtype == mx.float32:
        assert same.all()
        assert rel(w, w_ref) < F32
    else:
        assert same.mean() >= 0.5
        assert rel(np.array(w)[same], np.array(w_ref)[same]) < 3e-2  # a bf16 logit ulp moves p by ~1%
    return same


@gpu_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("N,R,E1", [(1, 256, 17), (8, 256, 17), (4, 96, 7)])
def test_router_kernel_matches_reference(N, R, E1, dtype):
    mx.random.seed(N * R + E1)
    r, weights = rnd(N, R, dtype=dtype), _router_weights(R, E1, dtype)
    c_ref, w_ref = router_mlp_reference(r, weights)
    c, w = router_mlp(r, weights, impl="kernel")
    _same_choices(c, c_ref, w, w_ref, dtype)


@gpu_only
@pytest.mark.parametrize("fmt,opts", [FORMATS[0], FORMATS[4]])
@pytest.mark.parametrize("N", [1, 8])
def test_routed_expert_kernel_matches_reference(N, fmt, opts):
    """ZAYA's shapes: the router MLP inside the expert kernel, against the reference router and experts. Tokens
    whose bfloat16 choice differs from the reference's (a near-tie) are left out of the comparison."""
    E, H, I, R = 16, 2048, 2048, 256
    x, _, _, gu, dn, _ = _expert_inputs(N, H, I, E, fmt, opts, mx.bfloat16, mx.bfloat16, seed=20 + N)
    r, weights = rnd(N, 1, R, dtype=mx.bfloat16), _router_weights(R, E + 1, mx.bfloat16)
    x = x.reshape(N, 1, H)
    ref = routed_expert_gather_reference(x, r, weights, gu, dn)
    out = routed_expert_gather(x, r, weights, gu, dn, impl="kernel")
    assert out.shape == ref.shape == (N, 1, H) and out.dtype == mx.float32
    c_ref, w_ref = router_mlp_reference(r, weights)
    same = np.array(c_ref).reshape(N) == np.array(router_mlp(r, weights, impl="kernel")[0]).reshape(N)
    assert same.mean() >= 0.5
    assert rel(np.array(out)[same], np.array(ref)[same]) < 2e-2
    # adding into a given row in place (as the fused step does, into the residual norm's zeros), then a reader
    # that takes `after`, in one compiled graph: the residual norm, here with h_new = the row itself. MLX-CUDA
    # orders a graph's launches by the arrays each takes, so a write into an input is ordered by nothing else
    # (mx.depends adds no launch: a reader behind it raced the adds on the H100).
    into = rnd(N, 1, H)
    before = np.array(into)
    ones, zeros, h = mx.ones((H,)), mx.zeros((H,)), mx.zeros((N, 1, H))

    @mx.compile
    def added_then_read(x, r, into):
        summed, after = routed_expert_gather(x, r, weights, gu, dn, into=into, impl="kernel")
        return residual_norm(summed, h, ones, zeros, zeros, zeros, ones, 1e-5,
                             dtype=mx.float32, after=after, impl="kernel")[0]

    got = np.array(added_then_read(x, r, into)) - before
    assert rel(got[same], np.array(ref)[same]) < 2e-2


def test_routed_expert_kernel_covers_zaya():
    """The fused step routes inside the expert kernel for ZAYA's router (bf16 or float32) and every expert format
    `zaya quantize` writes; a quantized router, or one routed by another thread count, goes its own way."""
    E, H, I, R = 16, 2048, 2048, 256
    x, r = rnd(1, 1, H, dtype=mx.bfloat16), rnd(1, 1, R, dtype=mx.bfloat16)
    for dtype in (mx.bfloat16, mx.float32):
        weights = _router_weights(R, E + 1, dtype)
        for fmt, opts in FORMATS:
            gu, dn = _expert_inputs(1, H, I, E, fmt, opts, mx.bfloat16, mx.bfloat16, seed=1)[3:5]
            assert experts.routed_kernel_supported(x, r, weights, gu, dn)
    quantized = dataclasses.replace(weights, fc1_w=nn.Linear(R, R).to_quantized(group_size=64, bits=4))
    assert not experts.routed_kernel_supported(x, r, quantized, gu, dn)
    narrow = _router_weights(96, E + 1, mx.bfloat16)  # routed by 256 threads: not the expert kernel's 512
    assert not experts.routed_kernel_supported(x, rnd(1, 1, 96, dtype=mx.bfloat16), narrow, gu, dn)


@gpu_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("N,H,R", [(1, 2048, 256), (8, 2048, 256), (3, 200, 40), (2, 2048, 0)])
def test_residual_norm_kernel_matches_reference(N, H, R, dtype):
    """With the router's down-projection (dense, with a bias) or no projection."""
    mx.random.seed(N + H + R)
    o, h = rnd(N, H, dtype=dtype), rnd(N, H, scale=4.0)
    p = [(mx.random.uniform(shape=(H,)) + 0.5).astype(dtype) for _ in range(5)]
    proj = linear(R, H, dtype) if R else None
    ref = residual_norm_reference(o, h, *p[:4], p[4], 1e-5, proj)
    out = residual_norm(o, h, *p[:4], p[4], 1e-5, proj, impl="kernel")
    assert rel(out[0], ref[0]) < 1e-6
    tol = 1e-2 if dtype == mx.bfloat16 else F32
    assert rel(out[1], ref[1]) < tol
    if R:
        assert rel(out[2], ref[2]) < tol
    else:
        assert out[2] is None


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_residual_norm_kernel_covers_zaya_projections(dtype):
    """The fused step hands the kernel the router's down-projection (a float32 row of 2,048 is 16 chunks a lane,
    the most a SIMD group holds) and the next layer's in_proj in every format `zaya quantize` writes."""
    H = 2048
    o, h = rnd(1, H, dtype=dtype), rnd(1, H)
    assert norms.kernel_supported(o, h, linear(256, H, dtype))
    for opts in (None, dict(group_size=32, bits=4, mode="mxfp4"), dict(group_size=64, bits=4),
                 dict(group_size=64, bits=8)):
        assert norms.kernel_supported(o, h, linear(1536, H, dtype, opts, bias=False))
    assert not norms.kernel_supported(o, h, linear(256, 1024, dtype))  # not x's width
    assert not norms.kernel_supported(o, h, linear(256, 1024, dtype, dict(group_size=32, bits=4, mode="mxfp4")))
    wide = rnd(1, 4096, dtype=dtype)
    fits = dtype == mx.bfloat16  # a row of 4,096: 16 chunks a lane in bfloat16, 32 in float32
    assert norms.kernel_supported(wide, rnd(1, 4096), linear(256, 4096, dtype)) == fits


@gpu_only
@pytest.mark.parametrize("opts", [dict(group_size=32, bits=4, mode="mxfp4"), dict(group_size=64, bits=4),
                                  dict(group_size=32, bits=8)])
@pytest.mark.parametrize("N,H,P,bias", [(1, 2048, 1536, False), (8, 2048, 1536, False), (3, 256, 72, True)])
def test_residual_norm_kernel_with_a_quantized_projection(N, H, P, bias, opts):
    """The next layer's in_proj (ZAYA: 1,536 rows, no bias) in each quantized format, and odd rows with a bias.
    float32 activations: MLX's quantized matmul in bfloat16 rounds too coarsely to be the reference."""
    mx.random.seed(N + P)
    o, h = rnd(N, H), rnd(N, H, scale=4.0)
    p = [mx.random.uniform(shape=(H,)) + 0.5 for _ in range(5)]
    proj = linear(P, H, mx.float32, opts, bias)
    ref = residual_norm_reference(o, h, *p[:4], p[4], 1e-5, proj)
    out = residual_norm(o, h, *p[:4], p[4], 1e-5, proj, impl="kernel")
    assert rel(out[0], ref[0]) < 1e-6 and rel(out[1], ref[1]) < F32 and rel(out[2], ref[2]) < F32



@gpu_only
@pytest.mark.parametrize("N", [1, 8])
def test_residual_norm_kernel_writes_into_given_arrays(N):
    """As the fused step calls it after attention: the residual stream, the router state (the bf16 router
    down-projection, 32 threadgroups, with the previous state) and the zero row written into arrays filled with NaN
    first; then after the MoE with the MXFP4 in_proj, the stream only. The arrays come back as the outputs."""
    mx.random.seed(N)
    H, R, P = 2048, 256, 1536
    o, h = rnd(N, 1, H, dtype=mx.bfloat16), rnd(N, 1, H, scale=4.0)
    p = [(mx.random.uniform(shape=(H,)) + 0.5).astype(mx.bfloat16) for _ in range(5)]
    down, state = linear(R, H, mx.bfloat16), (rnd(N, 1, R, dtype=mx.bfloat16), rnd(R, dtype=mx.bfloat16))
    into = (mx.full((N, 1, H), np.nan), mx.full((N, 1, R), np.nan, mx.bfloat16), mx.full((N, 1, H), np.nan))
    mx.eval(into)
    ref = residual_norm_reference(o, h, *p[:4], p[4], 1e-5, down, prev_state=state, zeros=True)
    out = residual_norm(o, h, *p[:4], p[4], 1e-5, down, prev_state=state, zeros=True, into=into, impl="kernel")
    mx.eval(out[1])  # the launch (the arrays written in place are already evaluated: reading them runs nothing)
    assert out[0] is into[0] and out[2] is into[1] and out[3] is into[2]
    assert rel(into[0], ref[0]) < 1e-6 and rel(out[1], ref[1]) < 1e-2 and rel(into[1], ref[2]) < 1e-2
    assert (np.array(into[2]) == 0).all()

    in_proj = linear(P, H, mx.bfloat16, dict(group_size=32, bits=4, mode="mxfp4"), bias=False)
    stream = mx.full((N, 1, H), np.nan)
    ref = residual_norm_reference(o, h, *p[:4], p[4], 1e-5, in_proj)
    mx.eval(stream)
    out = residual_norm(o, h, *p[:4], p[4], 1e-5, in_proj, normed=False, into=(stream, None, None), impl="kernel")
    mx.eval(out[2])
    assert out[0] is stream and out[1] is None
    assert rel(stream, ref[0]) < 1e-6 and rel(out[2], ref[2]) < 1e-2


# --- the model's fused decode path against its plain ops ------------------------------------------------------


@pytest.mark.parametrize("quant", [None, "mxfp4", "mxfp4+router"])
def test_fused_decode_matches_plain_decode(quant, monkeypatch):
    """Same weights, same tokens: the fused decode step (kernels on a GPU, their references on the CPU) gives the
    logits of the model's plain ops, for a lone sequence, a left-padded batch and a batch of 8 (the experts
    grouped by expert on a GPU). "+router" also quantizes
    the router MLP, which the fused step then runs through the router's own plain ops."""
    import mlx.nn as nn
    from mlx_lm.models.cache import BatchKVCache

    from zaya_mlx.benchmark import build_zaya, fused_vs_plain, small_config

    dtype = mx.bfloat16 if quant == "mxfp4" else mx.float32
    model = build_zaya(small_config(), quant and quant.split("+")[0], seed=2, dtype=dtype)
    if quant == "mxfp4+router":
        nn.quantize(model, group_size=32, bits=4, mode="mxfp4",
                    class_predicate=lambda path, m: ".router_mlp.fc" in path and isinstance(m, nn.Linear))
    tol = max(1e-4, F32) if dtype == mx.float32 else BF16_LOGITS
    model.decode_options = DecodeOptions(group_experts_from=8)
    # 254 + 3 outgrows 256 keys; 8 runs the experts grouped
    for batch, pads, prompt_len in ((1, None, 9), (1, None, 254), (3, [0, 2, 5], 9), (8, None, 9)):
        errors, cache = fused_vs_plain(model, model.args.vocab_size, batch, context=prompt_len, steps=3, left_padding=pads)
        assert max(errors) < tol, (batch, prompt_len, errors)
        assert cache[0][0].keys.shape[2] >= prompt_len + 3
        if pads is not None:
            assert isinstance(cache[0][0], BatchKVCache)


# float32 bounds of the fused step against the plain ops on a quantized cache: on the CPU both compute in float32;
# on a GPU MLX runs the plain ops' float32 matmuls in TF32 (MLX_ENABLE_TF32, on by default), and a key or value whose
# projection moves by that rounding can land on the next quantization step, 1/15 of its group's range at 4 bits. On an
# H100 the largest errors were 1.5e-3 at 8 bits and 1.3e-2 at 4 (bench/RESULTS.md); a wrong read or write is O(1).
FUSED_ON_QUANTIZED = {8: 5e-3, 4: 5e-2} if GPU else {8: 1e-5, 4: 1e-5}


@pytest.mark.parametrize("bits, pads, batch, context", [
    (8, None, 2, 12), (4, None, 2, 12), (8, [0, 5], 2, 12), (4, [3, 0], 2, 12),
    pytest.param(8, None, 16, 1100, marks=gpu_only),  # the kernels' split path; on the CPU a minute of references
])
def test_fused_decode_on_a_quantized_cache_gives_the_plain_ops_logits(bits, pads, batch, context):
    """The fused step (on a GPU its kernels, on the CPU their references) reads and writes the quantized cache as the
    plain ops do (mlx-lm's QuantizedKVCache and quantized attention), a left-padded batch's
    (BatchQuantizedKVCache), and a batch of 16 past one pass (attention split into chunks). float32 activations: in
    bfloat16, mx.quantized_matmul rounds the scores, which the kernel and its reference keep in float32 (1-7% of the
    largest logit apart)."""
    from zaya_mlx.benchmark import build_zaya, fused_vs_plain, small_config

    model = build_zaya(small_config(), "mxfp4", dtype=mx.float32)  # heads of 64 values
    model.decode_options = DecodeOptions(fused=True, compile=False)
    mx.random.seed(3)
    errors, cache = fused_vs_plain(model, 512, batch=batch, context=context, steps=3, kv_bits=bits, left_padding=pads)
    assert max(errors) < FUSED_ON_QUANTIZED[bits], errors
    assert getattr(cache[0][0], "bits", None) == bits and isinstance(cache[0][0].keys, tuple)


@gpu_only
@pytest.mark.parametrize("quant", [None, "mxfp4"])
def test_fused_decode_check_passes_with_the_real_kernels(quant, monkeypatch):
    """DecodeOptions(fused=None), the default: the first call checks the fused step and LM head kernel against the plain ops (see
    FusedDecoder.works); with this GPU's real kernels it must pass, with no warning, or every user here would
    decode through the slow path."""
    import warnings

    from zaya_mlx.benchmark import build_zaya, small_config

    model = build_zaya(small_config(), quant, seed=2, dtype=mx.bfloat16 if quant else mx.float32)
    cache = model.make_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mx.eval(model(mx.array([[3, 1, 4, 1, 5]], dtype=mx.int32), cache))
        mx.eval(model(mx.array([[9]], dtype=mx.int32), cache))
    assert model.decoder.checked == {backend(): True}


ATTENTION_CASES = [  # B, NH, NKV, D, length, capacity, left padding, window
    (1, 8, 2, 128, 300, 512, None, None),
    (1, 8, 2, 128, 1, 256, None, None),
    (8, 8, 2, 128, 77, 256, [0, 1, 2, 3, 10, 20, 30, 76], None),
    (2, 8, 2, 128, 3000, 3072, [0, 100], None),  # past SINGLE_PASS_MAX: chunks, then the combine pass
    (3, 8, 2, 128, 2500, 2560, [0, 4, 9], 1000),
    (2, 4, 4, 64, 50, 64, None, 16),
    (2, 8, 1, 256, 40, 64, [0, 5], None),
    (1, 16, 2, 32, 1100, 1280, None, None),
]


@gpu_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_decode_attention_kernel_matches_reference(case, dtype):
    _check_attention_kernel(case, dtype)


@gpu_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("case", [ATTENTION_CASES[i] for i in (0, 2, 3, 4)])
def test_decode_attention_kernel_with_a_kv_heads_query_heads_in_one_threadgroup(case, dtype, monkeypatch):
    """HB = NH / NKV (each key and value read once a chunk; at most 256 threads, so that the registers fit): as the
    reference, in one pass and in chunks, with left padding and a window."""
    monkeypatch.setattr(attention, "HEADS_PER_THREADGROUP", 8)
    _check_attention_kernel(case, dtype)


@gpu_only
@pytest.mark.parametrize("heads", [1, 8])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("case", [ATTENTION_CASES[i] for i in (0, 2, 3, 4, 5, 6)])
def test_decode_attention_kernel_with_two_keys_a_simd_group(case, dtype, heads, monkeypatch):
    """LANES_PER_KEY 16 (two key slots a SIMD group, merged by shuffles), a query head a threadgroup or a KV head's:
    as the reference, in one pass and in chunks, with left padding and a window, at head dims 64, 128 and 256."""
    monkeypatch.setattr(attention, "LANES_PER_KEY", 16)
    monkeypatch.setattr(attention, "HEADS_PER_THREADGROUP", heads)
    _check_attention_kernel(case, dtype)


@gpu_only
@pytest.mark.parametrize("heads", [1, 8])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("case", [ATTENTION_CASES[i] for i in (3, 4, 7)])
def test_decode_attention_kernel_merges_its_chunks_in_the_same_launch(case, dtype, heads, monkeypatch):
    """FUSED_COMBINE (CUDA; elsewhere the combine launch): in chunks, each head block's last chunk's threadgroup
    merges the chunks, as the reference, with left padding and a window, a query head a threadgroup or a KV head's."""
    monkeypatch.setattr(attention, "FUSED_COMBINE", True)
    monkeypatch.setattr(attention, "HEADS_PER_THREADGROUP", heads)
    _check_attention_kernel(case, dtype)


def _check_attention_kernel(case, dtype):
    B, NH, NKV, D, length, cap, pads, window = case
    mx.random.seed(length + B)
    q, keys, values = rnd(B, NH, 1, D, dtype=dtype), rnd(B, NKV, cap, D, dtype=dtype), rnd(B, NKV, cap, D, dtype=dtype)
    lp = mx.array(pads, dtype=mx.int32) if pads is not None else None
    kw = dict(scale=D**-0.5, left_padding=lp, window=window)
    ref = decode_attention_reference(q, keys, values, length, **kw)
    out = decode_attention(q, keys, values, mx.array([length], mx.int32), impl="kernel", **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel(out, ref) < (1e-2 if dtype == mx.bfloat16 else F32)


O_PROJ_FORMATS = [  # activation dtype, o_proj's format (mx.quantize options), bias
    (mx.bfloat16, None, True),
    (mx.float32, dict(group_size=32, bits=4, mode="mxfp4"), False),
    (mx.float32, dict(group_size=64, bits=4), False),
    (mx.float32, dict(group_size=32, bits=8), True),
]


@gpu_only
@pytest.mark.parametrize("dtype,opts,bias", O_PROJ_FORMATS)
@pytest.mark.parametrize("case", [ATTENTION_CASES[i] for i in (0, 2, 3, 6)])
def test_decode_attention_kernel_with_o_proj(case, dtype, opts, bias):
    """o_proj inside attention: its shares (a head block's in one pass; a head's after the combine pass) sum to
    o_proj of the reference attention. float32 activations with quantized weights: MLX's quantized matmul in
    bfloat16 rounds too coarsely to be the reference."""
    B, NH, NKV, D, length, cap, pads, window = case
    mx.random.seed(length + B + 1)
    q, keys, values = rnd(B, NH, 1, D, dtype=dtype), rnd(B, NKV, cap, D, dtype=dtype), rnd(B, NKV, cap, D, dtype=dtype)
    o_proj = linear(2048, NH * D, dtype, opts, bias)
    lp = mx.array(pads, dtype=mx.int32) if pads is not None else None
    kw = dict(scale=D**-0.5, left_padding=lp, window=window, o_proj=o_proj)
    ref = decode_attention_reference(q, keys, values, length, **kw)
    parts = decode_attention(q, keys, values, mx.array([length], mx.int32), impl="kernel", **kw)
    assert parts.dtype == mx.float32 and parts.shape[0] == B and parts.shape[2] == 2048
    assert rel(parts.sum(axis=1, keepdims=True), ref) < (1e-2 if dtype == mx.bfloat16 else F32)


def _cca_attention_case(B, nh, nkv, d, t0, t1, rd, dtype, cap, filled, seed, o_proj):
    """The CCA step's and attention's arguments for cca_decode_attention (weights, states, a cache holding
    ``filled`` - 1 positions), and o_proj (made after the seed)."""
    mx.random.seed(seed)
    C = (nh + nkv) * d
    a = dict(qkv=rnd(B, C + nkv * d), conv_state=rnd(B, t0 - 1 + t1 - 1, C), v_prev=rnd(B, nkv * d // 2),
             dw_w=rnd(C, t0, 1, scale=0.5), dw_b=rnd(C, scale=0.1), gw_w=rnd(C, t1, d, scale=0.1),
             gw_b=rnd(C, scale=0.1), temp=mx.random.uniform(shape=(nkv,)) + 0.5)
    a = {k: v.astype(dtype) for k, v in a.items()}
    a["keys"], a["values"] = rnd(B, nkv, cap, d).astype(dtype), rnd(B, nkv, cap, d).astype(dtype)
    a["offset"] = mx.array([filled - 1 + 7 * b for b in range(B)], dtype=mx.int32)
    kw = dict(n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=rd, rope_base=1e4, scale=d ** -0.5)
    return a, kw, o_proj


def _cca_attention_reference(a, kw, filled, pads, window, o_proj):
    cca_kw = {k: v for k, v in kw.items() if k != "scale"}
    q, k, v, state, vprev = cca.cca_decode_step_reference(*[a[n] for n in CCA_ARGS], **cca_kw)
    keys, values = cca.write_kv_reference(a["keys"], a["values"], k, v, filled)
    out = attention.decode_attention_reference(q, keys, values, filled, scale=kw["scale"], left_padding=pads,
                                               window=window, o_proj=o_proj)
    return out, keys, values, state, vprev


CCA_ARGS = ("qkv", "conv_state", "v_prev", "dw_w", "dw_b", "gw_w", "gw_b", "temp", "offset")


CCA_ATTENTION_CASES = [  # B, NH, NKV, D, T0, T1, RD, length, capacity, left padding, window
    (1, 8, 2, 128, 2, 2, 64, 300, 512, None, None),
    (8, 8, 2, 128, 2, 2, 64, 77, 256, [0, 1, 2, 3, 10, 20, 30, 76], None),
    (2, 8, 2, 128, 2, 2, 64, 3000, 3072, [0, 100], None),  # past SINGLE_PASS_MAX: chunks, then the combine pass
    (3, 8, 2, 128, 2, 2, 64, 2500, 2560, [0, 4, 9], 1000),
    (2, 4, 2, 64, 3, 2, 32, 50, 64, None, 16),
]


@gpu_only
@pytest.mark.parametrize("lanes,fused", [(32, False), (16, False), (32, True)])
@pytest.mark.parametrize("dtype,opts", [(mx.bfloat16, None), (mx.bfloat16, dict(group_size=32, bits=4, mode="mxfp4")),
                                        (mx.float32, dict(group_size=64, bits=4))])
@pytest.mark.parametrize("case", CCA_ATTENTION_CASES)
def test_cca_attention_kernel_matches_reference(case, dtype, opts, lanes, fused, monkeypatch):
    """The CCA step inside attention (one launch) against the step's reference, its cache write and attention's
    reference with ZAYA's o_proj: the output, the new states, and the cache written at position length - 1 alone.
    float32 goes only where half a threadgroup's registers hold its grouped-conv rows (the smaller head). lanes 16:
    two key slots a SIMD group, each taking the new key from threadgroup memory; fused: in chunks, the last chunk's
    threadgroup merges them and applies o_proj (CUDA)."""
    monkeypatch.setattr(attention, "LANES_PER_KEY", lanes)
    monkeypatch.setattr(attention, "FUSED_COMBINE", fused)
    B, NH, NKV, D, t0, t1, rd, length, cap, pads, window = case
    a, kw, o_proj = _cca_attention_case(B, NH, NKV, D, t0, t1, rd, dtype, cap, length, seed=length + B,
                                        o_proj=linear(2048, NH * D, dtype, opts, bias=False))
    cca_kw = {k: v for k, v in kw.items() if k != "scale"}
    if not attention.cca_kernel_supported(a["qkv"], a["conv_state"], a["gw_w"], a["keys"], o_proj=o_proj, **cca_kw):
        assert dtype == mx.float32 and D == 128
        pytest.skip("float32 at head dim 128: the step runs in its own launch")
    lp = mx.array(pads, dtype=mx.int32) if pads is not None else None
    want = _cca_attention_reference(a, kw, length, lp, window, o_proj)
    mx.eval(want)  # before the kernel writes into the cache's buffers
    got = attention.cca_decode_attention(**a, filled=mx.array([length], mx.int32), left_padding=lp, window=window,
                                         o_proj=o_proj, impl="kernel", **kw)
    tol = 2e-2 if dtype == mx.bfloat16 else F32
    assert got[0].dtype == mx.float32 and rel(got[0].sum(axis=1, keepdims=True), want[0]) < tol
    for name, g, w in zip(("keys", "values", "conv_state", "v_prev"), got[1:], want[1:]):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel(g, w) < (1e-2 if dtype == mx.bfloat16 else F32), name
    assert mx.array_equal(got[1][:, :, : length - 1], want[1][:, :, : length - 1])
    assert mx.array_equal(got[2], want[2])


def test_the_cca_step_runs_inside_attention_until_split_chunks_repeat_it_too_often():
    """A one-pass launch repeats no CCA step: inside at any batch. A launch split into 512-key chunks computes each
    head's step again in every chunk after the first, B x (chunks - 1) repeats a head: inside up to 32 of them (1 x
    16,384 keys, 33 chunks), apart beyond (2 rows of that, or 16 x 16,384). Shapes only: nothing is allocated."""
    def pays(batch, cap, bits=0):
        keys = mx.zeros((batch, 2, cap, 128), mx.bfloat16)
        if bits:  # a quantized cache's (words, scales, biases), group 64
            keys = (mx.zeros((batch, 2, cap, 128 * bits // 32), mx.uint32), keys[..., :2], keys[..., :2])
        return attention.cca_inside_pays(keys, 128)

    assert attention.SINGLE_PASS_MAX == 1024 and attention.CHUNK == 512
    assert pays(1, 256) and pays(16, 1024) and pays(256, 1024)
    assert pays(1, 16384 + 512) and pays(16, 1536)  # 32 repeats: 1 x 32, 16 x 2
    assert not pays(2, 16384 + 512) and not pays(16, 16384) and not pays(17, 1536)
    assert pays(1, 16384, bits=8) and not pays(16, 16384, bits=8) and not pays(16, 16384, bits=4)


@gpu_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", CCA_ATTENTION_CASES[:3])
def test_cca_attention_kernel_with_a_quantized_cache(case, bits, dtype):
    """The CCA step inside attention on a quantized cache (mlx-lm's layout, group 64): the output against the
    references (the step's, mx.quantize's write, attention over the dequantized cache), the new value's words as
    mx.quantize packs them, and every other position untouched; one pass and split into chunks. float32 at head dim
    128: the CCA kernel in its own launch (cca_decode.h) writes them, in place, and attention reads them."""
    B, NH, NKV, D, t0, t1, rd, length, cap, pads, window = case
    a, kw, o_proj = _cca_attention_case(B, NH, NKV, D, t0, t1, rd, dtype, cap, length, seed=length + bits,
                                        o_proj=linear(2048, NH * D, dtype, None, bias=False))
    a["keys"], a["values"] = (mx.quantize(a[n], group_size=64, bits=bits) for n in ("keys", "values"))
    cca_kw = {k: v for k, v in kw.items() if k != "scale"}
    one_launch = attention.cca_kernel_supported(a["qkv"], a["conv_state"], a["gw_w"], a["keys"], o_proj=o_proj,
                                                **cca_kw)
    assert one_launch == (dtype == mx.bfloat16)
    lp = mx.array(pads, dtype=mx.int32) if pads is not None else None
    want = _cca_attention_reference(a, kw, length, lp, window, o_proj)
    mx.eval(want)  # before the kernel writes into the cache's buffers
    got = attention.cca_decode_attention(**a, filled=mx.array([length], mx.int32), left_padding=lp, window=window,
                                         o_proj=o_proj, impl="kernel" if one_launch else "auto", **kw)
    assert got[1] is a["keys"] and got[2] is a["values"]  # written in place: a kernel, not the reference
    assert rel(got[0].sum(axis=1, keepdims=True), want[0]) < 3e-2
    for g, w in zip(got[1:3], want[1:3]):
        for gp, wp in zip(g, w):
            assert mx.array_equal(gp[:, :, : length - 1], wp[:, :, : length - 1])
            assert mx.array_equal(gp[:, :, length:], wp[:, :, length:])
    assert mx.array_equal(got[2][0], want[2][0])  # the value: a copy of the step's input, quantized alike
    for g, w in zip(got[3:], want[3:]):
        assert rel(g, w) < 1e-2


def test_decode_attention_kernel_takes_zaya_o_proj():
    """The fused step hands attention ZAYA's o_proj in every format `zaya quantize` writes; a head whose chunks
    do not split evenly over a row's lanes, or a projection of another width, goes to the plain path."""
    q, keys = rnd(1, 8, 1, 128, dtype=mx.bfloat16), rnd(1, 2, 256, 128, dtype=mx.bfloat16)
    for opts in (None, dict(group_size=32, bits=4, mode="mxfp4"), dict(group_size=64, bits=4),
                 dict(group_size=64, bits=8)):
        assert attention.kernel_supported(q, keys, linear(2048, 1024, mx.bfloat16, opts, bias=False))
    assert not attention.kernel_supported(q, keys, linear(2048, 512, mx.bfloat16))
    q96, keys96 = rnd(1, 8, 1, 96, dtype=mx.bfloat16), rnd(1, 2, 256, 96, dtype=mx.bfloat16)
    assert attention.kernel_supported(q96, keys96)
    assert not attention.kernel_supported(q96, keys96, linear(2048, 768, mx.bfloat16))  # 12 chunks a head


@gpu_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("N", [1, 8])
def test_residual_norm_kernel_sums_partial_outputs(N, dtype):
    """o as the attention kernel leaves it: 8 heads' shares of o_proj, float32, summed then rounded to dtype."""
    mx.random.seed(N + 3)
    H = 2048
    o, h = rnd(N, 8, H), rnd(N, 1, H, scale=4.0)
    p = [(mx.random.uniform(shape=(H,)) + 0.5).astype(dtype) for _ in range(5)]
    proj = linear(256, H, dtype)
    ref = residual_norm_reference(o, h, *p[:4], p[4], 1e-5, proj, dtype=dtype)
    out = residual_norm(o, h, *p[:4], p[4], 1e-5, proj, dtype=dtype, impl="kernel")
    tol = 1e-2 if dtype == mx.bfloat16 else F32
    assert rel(out[0], ref[0]) < 1e-5 and rel(out[1], ref[1]) < tol and rel(out[2], ref[2]) < tol


def test_kv_capacity_doubles_then_grows_by_kv_growth():
    """Few buffer sizes (each retraces the compiled step): powers of two from 256 up to 4096, then steps of 4096."""
    from zaya_mlx.decode import kv_capacity

    needed = (1, 256, 257, 1000, 4096, 4097, 8193)
    assert [kv_capacity(n) for n in needed] == [256, 256, 512, 1024, 4096, 8192, 12288]


def test_fused_decode_follows_replaced_weights(monkeypatch):
    """The compiled step functions close over the weights; replacing weights through Model.update (what
    load_weights and nn.quantize use) must reach the fused step, as it reaches the plain ops."""
    from mlx.utils import tree_flatten, tree_unflatten

    from zaya_mlx.benchmark import build_zaya, small_config

    model = build_zaya(small_config(), None, seed=4, dtype=mx.float32)
    prompt = mx.random.randint(0, 512, (1, 6)).astype(mx.int32)
    tok = mx.array([[3]], dtype=mx.int32)

    def step(on):
        model.decode_options = DecodeOptions(fused=on)
        cache = model.make_cache()
        model(prompt, cache)
        return model(tok, cache)

    before = step(True)
    scaled = [(k, v * 1.5) for k, v in tree_flatten(model.parameters()) if "o_proj.weight" in k]
    model.update(tree_unflatten(scaled))
    plain, fused = step(False), step(True)
    assert float(mx.abs(fused - before).max()) > 1e-3  # the change is visible at all
    assert float(mx.abs(fused - plain).max() / mx.abs(plain).max()) < max(1e-4, F32)


def test_packed_weights_are_the_arrays_end_to_end_in_float32():
    """_build.packed: the arrays flattened end to end in float32 (bfloat16 values exactly), and a new pack when an
    array is replaced."""
    a = mx.array([1.5, -2.0], dtype=mx.bfloat16)
    b = mx.array([[3.0], [4.25]])
    pack = _build.packed((a, b))
    assert pack.dtype == mx.float32 and pack.tolist() == [1.5, -2.0, 3.0, 4.25]
    c = mx.array([5.0, 6.0])
    assert _build.packed((c, b)).tolist() == [5.0, 6.0, 3.0, 4.25]


# Arguments a kernel body writes in place: outputs given an array (ZK_INPLACE), and inputs it writes (ZK_WRITABLE):
# the expert kernel's sum, and the KV cache's buffers, which the CCA step writes (in its own launch, or inside
# attention's: one that takes qkv). The buffers take each step's key and value at a position no earlier launch reads
# (attention reads the positions before it), so for them only a read after a write needs ordering.
_WRITTEN_AT_NEW_POSITIONS = ("kcache", "vcache", "keys", "values")


def _writes(name: str, args) -> bool:
    if name.startswith(_build.INPLACE_PREFIX) or name in ("yin", "kcache", "vcache"):
        return True
    return name in ("keys", "values") and any(n == "qkv" for n, _ in args)


def _recorded_step(monkeypatch, quant, router):
    """The launches of two fused decode steps (the second and third after a prompt) with the kernels replaced by
    fakes that record them (``_record_launches``). router: None (the small model's, beside
    the expert kernel), "wide" (ZAYA's 256-wide one, inside it) or "mxfp4" (quantized: its plain ops)."""
    import mlx.nn as nn

    from zaya_mlx import kernels as kernels_pkg
    from zaya_mlx.benchmark import build_zaya, small_config

    launches = _record_launches(monkeypatch)
    for m in kernels_pkg.BACKEND_READERS:
        monkeypatch.setattr(m, "backend", lambda: "cuda")
    cfg = small_config()
    if router == "wide":
        cfg = dataclasses.replace(cfg, router_hidden_size=256)
    model = build_zaya(cfg, quant, seed=0, dtype=mx.bfloat16 if quant else mx.float32)
    if router == "mxfp4":
        nn.quantize(model, group_size=32, bits=4, mode="mxfp4",
                    class_predicate=lambda path, m: ".router_mlp.fc" in path and isinstance(m, nn.Linear))
    cache = model.make_cache()
    model.decode_options = DecodeOptions(fused=False, compile=False)  # the prompt through the plain ops
    mx.eval(model(mx.array([[3, 1, 4, 1, 5]], dtype=mx.int32), cache))
    model.decode_options = DecodeOptions(fused=True, compile=False)
    model(mx.array([[9]], dtype=mx.int32), cache)
    launches.clear()
    for _ in range(2):  # two steps on the buffers the first one made, the second's token not from the first's logits
        model(mx.array([[9]], dtype=mx.int32), cache)
    return launches


def _writes_in_place(args) -> bool:
    return any(n.startswith(_build.INPLACE_PREFIX) for n, _ in args)


@pytest.mark.parametrize("one_launch", [True, False])
@pytest.mark.parametrize("quant,router", [(None, None), ("mxfp4", None), ("mxfp4", "mxfp4"), (None, "wide")])
def test_fused_step_orders_every_in_place_write(quant, router, one_launch, monkeypatch):
    """MLX orders a step's launches only by the arrays they take (docs/PERFORMANCE.md), so a launch that
    reads an array another launch writes in place must take, through launch outputs, an output of that writer; and a
    writer must so follow the earlier readers of what it overwrites, within a step and from one step to the next
    (whose token need not come from the last one's logits). Checked on the launches of real fused steps, for
    the router inside the expert kernel, beside it (in its own kernel) and quantized (its plain ops, which this does
    not see: the step keeps the router state a new array for any router the expert kernel does not run); and for
    the CCA step inside attention, or (one_launch False, as for shapes that launch does not cover) in its own
    launch, which writes the query in place."""
    if not one_launch:
        monkeypatch.setattr(attention, "cca_kernel_supported", lambda *a, **k: False)
    launches = _recorded_step(monkeypatch, quant, router)
    assert any(body == "residual_norm.h" and _writes_in_place(args) for body, args, *_ in launches)
    bodies = {launch.body for launch in launches}
    assert ("cca_decode.h" in bodies) != one_launch
    assert one_launch or any(body == "cca_decode.h" and _writes_in_place(args) for body, args, *_ in launches)
    assert any(any(_writes(n, args) for n in ("keys", "values", "kcache", "vcache")) for _, args, *_ in launches)
    if router == "wide":
        assert "router_mlp.h" not in {launch.body for launch in launches}  # routed inside the expert kernel

    producer, ancestors = {}, []
    last_write, reads_since = {}, {}
    for k, (body, args, outs, _) in enumerate(launches):
        before = set()
        for _, a in args:
            j = producer.get(id(a))
            if j is not None:
                before |= {j} | ancestors[j]
        ancestors.append(before)
        for name, a in args:
            writes = _writes(name, args)
            w = last_write.get(id(a))
            assert w is None or w == k or w in before, f"launch {k} ({body}) takes {name} before launch {w} wrote it"
            if writes:
                unordered = [r for r in reads_since.get(id(a), ()) if r != k and r not in before
                             and name not in _WRITTEN_AT_NEW_POSITIONS]
                assert not unordered, f"launch {k} ({body}) overwrites {name} that launches {unordered} read"
                last_write[id(a)], reads_since[id(a)] = k, []
            else:
                reads_since.setdefault(id(a), []).append(k)
        for o in outs:
            producer[id(o)] = k
