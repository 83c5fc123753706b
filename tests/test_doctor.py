"""`zaya doctor`: on the CPU it says the kernels are not used and why, and where kernels fail it says so."""

import re
import socket

import mlx.core as mx
import pytest

from zaya_mlx import doctor, kernels
from zaya_mlx.kernels import _build



@pytest.mark.skipif(kernels.backend() != "cpu", reason="a GPU back end runs the kernels (the lead's GPU run)")
def test_on_the_cpu_the_report_says_why_no_kernel_runs_and_nothing_is_downloaded(run_zaya, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("zaya doctor opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    code, out, err = run_zaya("doctor")
    assert code == 0, err
    for field in ("os:", "cpu:", "memory:", "python:", "mlx:"):
        assert re.search(rf"^  {field} +\S", out, re.M), field
    assert f"{mx.__version__} (back end: cpu" in out
    assert "not used: MLX runs on its CPU back end" in out and "FAILED" not in out
    assert "decode path:        plain MLX ops (the fused step runs only on a Metal or CUDA GPU)" in out
    peak, unit = re.search(r"peak memory ([\d.]+) (MB|GB)", out).groups()
    assert 0.5e6 < float(peak) * {"MB": 1e6, "GB": 1e9}[unit] < 2e9  # the tiny model's weights (~1 MB in MXFP4) and its run, not a real model's


@pytest.mark.skipif(kernels.backend() == "cpu", reason="no Metal or CUDA back end here: kernels not run")
@pytest.mark.parametrize("quant", ["mxfp4", "bf16"])
def test_on_a_gpu_every_kernel_builds_and_matches_its_reference(quant, run_zaya):
    code, out, err = run_zaya("doctor", "--quant", quant)
    assert code == 0, out + err
    assert len(re.findall(r"^  \S.* +ok  max error", out, re.M)) == 9 and "FAILED" not in out
    assert f"back end: {kernels.backend()}" in out and "  gpu:" in out
    assert "decode path:        fused step with the kernels" in out


def test_a_bad_weight_format_is_one_line(run_zaya):
    code, _, err = run_zaya("doctor", "--quant", "int3")
    assert code == 1 and err.startswith("error: --quant 'int3'") and err.count("\n") == 1


def _as_if_on_metal(monkeypatch, kernel):
    """The launchers build Metal kernels through ``kernel`` (in place of mx.fast.metal_kernel)."""
    for m in kernels.BACKEND_READERS:
        monkeypatch.setattr(m, "backend", lambda: "metal")
    monkeypatch.setattr(mx.fast, "metal_kernel", kernel)
    _build.get_kernel.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_kernels():
    yield
    _build.get_kernel.cache_clear()  # no kernel built through a test's fake outlives it


def test_a_kernel_that_does_not_build_is_reported_with_metals_message(monkeypatch):
    def metal_kernel(name, **_):
        def call(**_):
            raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: no simd_summ")
        return call

    _as_if_on_metal(monkeypatch, metal_kernel)
    checks = doctor.kernel_checks()
    assert len(checks) == 9 and not any(c.ok for c in checks)
    assert all(c.detail == "did not build or run: [metal::Device] Unable to build metal library from source"
               for c in checks)


def test_a_kernel_that_computes_garbage_fails_its_check(monkeypatch):
    """Kernels that build and return zeros: each check compares them to the reference and fails, the CCA step
    too (its query, not only the cache it writes in place), and the report marks them."""
    def metal_kernel(name, input_names, output_names, **_):
        def call(*, output_shapes, output_dtypes, **_):
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return call

    _as_if_on_metal(monkeypatch, metal_kernel)
    checks = doctor.kernel_checks()
    failed = [c.name for c in checks if not c.ok]
    # the router's top-1 choice of zero logits may still match (expert 0): its probability does not
    assert set(failed) == {c.name for c in checks}, [c for c in checks if c.ok]
    report = doctor.Report({"os": "test"}, "metal", "", checks, "plain MLX ops", "why", 2**20, 1.0)
    assert report.text().count("FAILED") == 9 and "too large" in report.text()
