"""The Metal kernels' sources, as mx.fast.metal_kernel assembles them, compiled by clang against our declaration of
what Metal provides (tests/metal_source.py): every variant the fused decode step launches compiles, and each kind of
mistake that would break it on a Mac fails the check."""

import functools

import mlx.core as mx
import pytest

import metal_source
from metal_source import Step, check_all, step_launches
from zaya_mlx.kernels import _build, attention, norms

pytestmark = pytest.mark.skipif(metal_source.CLANG is None, reason="no clang to check the Metal sources")

# Every switch a variant's source turns on: each weight format and activation dtype, the router apart, inside the
# expert kernel or quantized, the experts grouped by expert, the CCA step inside attention or in its own launch,
# attention in one pass or in chunks with a combine launch, a quantized KV cache written by either CCA launch; at the
# small model's shapes and at ZAYA1-8B's.
STEPS = [Step(None, mx.float32, "apart"), Step(None, mx.bfloat16, "inside"), Step("mxfp4", mx.bfloat16, "apart"),
         Step("mxfp4", mx.bfloat16, "inside", cca_inside=False), Step("affine4", mx.bfloat16, "mxfp4", split=True),
         Step("affine8", mx.bfloat16, "inside", split=True),
         Step(None, mx.float32, "inside", cca_inside=False, split=True),
         Step("mxfp4", mx.bfloat16, "inside", full=True), Step("affine4", mx.bfloat16, "inside", full=True, split=True),
         Step(None, mx.float32, "inside", full=True), Step("mxfp4", mx.bfloat16, "inside", full=True, grouped=True),
         Step(None, mx.float32, "apart", cca_inside=False, split=True, kv_bits=4),
         Step("affine8", mx.bfloat16, "inside", split=True, kv_bits=8)]
BODIES = {"attention_combine", "cca_decode", "decode_attention", "expert_mlp", "matvec", "residual_norm", "router_mlp"}


def test_attention_with_several_keys_a_simd_group_compiles_for_metal(monkeypatch):
    """attention.LANES_PER_KEY 16: a SIMD group's two key slots, each summing its scores over its lanes by shuffles;
    in one pass with the CCA step inside, in chunks with it apart, on a quantized cache."""
    monkeypatch.setattr(attention, "LANES_PER_KEY", 16)
    launches = [launch for step in (Step("mxfp4", mx.bfloat16, "inside", full=True),
                                    Step("mxfp4", mx.bfloat16, "inside", full=True, split=True, cca_inside=False),
                                    Step(None, mx.float32, "apart", split=True, kv_bits=8))
                for launch in step_launches(step) if "decode_attention" in launch.name]
    assert len({launch.key() for launch in launches}) >= 3
    failed = check_all(launches)
    assert not failed, "\n\n".join(f"{key}:\n{errors[:2000]}" for key, errors in failed)


@functools.cache
def _all_launches():
    return [launch for step in STEPS for launch in step_launches(step)]


def test_every_variant_of_the_decode_step_compiles_for_metal():
    launches = _all_launches()
    assert {launch.name.rsplit("_", 1)[0].removeprefix("zaya_") for launch in launches} == BODIES
    assert len({launch.key() for launch in launches}) > 60
    failed = check_all(launches)
    assert not failed, "\n\n".join(f"{key}:\n{errors[:2000]}" for key, errors in failed)


def _mutated(monkeypatch, name, old, new):
    """metal/<name> with ``old`` replaced by ``new``, for the kernels built from now on."""
    real = _build._source

    def source(n):
        text = real(n)
        if n == name:
            assert old in text
            text = text.replace(old, new)
        return text

    monkeypatch.setattr(_build, "_source", source)


def _failures(step=Step("mxfp4", mx.bfloat16, "inside"), **kw) -> str:
    return "\n".join(errors for _, errors in check_all(step_launches(step), **kw))


def test_a_cast_into_the_wrong_address_space_fails(monkeypatch):
    """The expert kernel's atomic add cast to threadgroup memory while its output lives in device memory: clang
    allows this C-style cast, Metal does not."""
    _mutated(monkeypatch, "prelude.metal", "(device atomic_float*)", "(threadgroup atomic_float*)")
    assert "a cast between address spaces" in _failures()


def test_a_device_pointer_into_an_input_mlx_passes_as_constant_fails(monkeypatch):
    """MLX passes an input of fewer than 8 elements in the constant address space: a 4-element stand-in for the
    final norm's absent weights, which the body loads through a device pointer, does not compile."""
    monkeypatch.setattr(norms, "dummy", lambda dtype=mx.float32: _build.constant((0,) * 4, dtype))
    assert "a cast between address spaces" in _failures()


def test_a_misspelt_simd_function_fails(monkeypatch):
    _mutated(monkeypatch, "prelude.metal", "return simd_sum(x);", "return simd_summ(x);")
    assert "simd_summ" in _failures()


def test_a_cuda_name_in_a_body_fails(monkeypatch):
    """A CUDA function the Metal prelude does not map (Metal has fmax, not fmaxf)."""
    _mutated(monkeypatch, "router_mlp.h", "prob[n] = best.prob;", "prob[n] = fmaxf(best.prob, 0.0f);")
    assert "fmaxf" in _failures(Step(None, mx.float32, "apart"))


@pytest.mark.parametrize("how", ["misspelt", "in the header", "not added"])
def test_a_missing_attribute_argument_fails(how, monkeypatch):
    """MLX adds an attribute argument (thread_index_in_simdgroup [[thread_index_in_simdgroup]]) only for names of
    its list that the kernel's source, not its header, contains."""
    if how == "misspelt":
        _mutated(monkeypatch, "prelude.metal", "int(thread_index_in_simdgroup)", "int(thread_index_in_simd_group)")
        assert "thread_index_in_simd_group" in _failures()
    elif how == "in the header":
        _mutated(monkeypatch, "prelude.metal", "// ---- body prologue ----\n", "")  # the prologue joins the header
        monkeypatch.setattr(_build, "_prelude", lambda back: (_build._source("prelude.metal"), ""))
        assert "thread_position_in_threadgroup" in _failures()
    else:
        attributes = [a for a in metal_source.ATTRIBUTES if a[0] != "thread_index_in_simdgroup"]
        assert "thread_index_in_simdgroup" in _failures(attributes=attributes)


def test_the_source_is_written_as_mlx_writes_it():
    """A two-input kernel with template arguments, against the text MLX's write_signature and metal_kernel produce
    for it (mlx/backend/common/metal_kernel.cpp, written out by hand): a scalar input by reference, a small one in
    constant memory, a bool template argument as 1, the attribute the body names, the explicit instantiation."""
    launch = metal_source.Launch(
        "k", ("a", "s"), ("out",), "out[0] = a[0] + s[0] * thread_position_in_grid.x;", "// header\n",
        (metal_source.Argument(mx.bfloat16, 64, 2), metal_source.Argument(mx.int32, 1, 1)), (mx.float32,),
        (("T", mx.bfloat16), ("N", 4), ("B", True)))
    name = "custom_kernel_k__bfloat16_t_4_1_bfloat16_t_int32_tc_float"  # "<" of the template becomes "_"
    assert metal_source.metal_source(launch) == (
        "// header\ntemplate <typename T, int N, bool B>\n"
        f"[[kernel]] void {name}(\n"
        "  const device bfloat16_t* a [[buffer(0)]],\n"
        "  const constant int32_t* s [[buffer(1)]],\n"
        "  device float* out [[buffer(2)]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
        "out[0] = a[0] + s[0] * thread_position_in_grid.x;\n}\n"
        f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}<bfloat16_t, 4, 1>) {name}<bfloat16_t, 4, 1>;\n')
