"""The development tools in dev/ (and the offline parts of bench/bench_kernels.py): what they compute from a
profiler's output, and smoke runs on the CPU. Run apart from the package's tests:

    python -m pytest dev/tests -q
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
BENCH = os.path.join(ROOT, "bench")
DEV = os.path.join(ROOT, "dev")


def test_kernel_times_are_summarized_per_batch(tmp_path):
    """ncu's CSV names a kernel variant by its template, which does not say the batch: the summary must keep
    each grid's launches apart and take the median of each (here 10 and 30 us at one grid, 100 at another)."""
    head = '"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"'
    rows = [(0, "(32, 1, 1)", "10,000"), (1, "(32, 1, 1)", "30,000"), (2, "(32, 1, 1)", "20,000"),
            (3, "(32, 8, 1)", "100,000")]
    lines = ["==PROF== Connected to process 1", head]
    lines += [f'"{i}","custom_kernel_zaya_residual_norm_bf16(const float *)","{g}","gpu__time_duration.sum","ns","{v}"'
              for i, g, v in rows]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_kernels.py"), "--summarize", str(path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    assert out[0].split()[0] == "20.0" and "(n=3)" in out[0] and "(32, 1, 1)" in out[0]
    assert out[1].split()[0] == "100.0" and "(n=1)" in out[1] and "zaya_residual_norm_bf16" in out[1]


def test_gpu_step_sums_each_kind_of_kernel_per_step(tmp_path):
    """Two profiled steps: each launched the router once (20 and 22 us), the expert kernel twice (10 us each) and
    one MLX fill (2 us). Per step that is 21 + 20 + 2 = 43 us over 4 launches, the router first."""
    head = '"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"'
    router, expert = "custom_kernel_zaya_router_mlp_12345678901", "custom_kernel_zaya_expert_mlp_99abcdef"
    kernels = [(router, "20,000"), (expert, "10,000"), (expert, "10,000"), ("fill_kernel", "2,000"),
               (router, "22,000"), (expert, "10,000"), (expert, "10,000"), ("fill_kernel", "2,000")]
    lines = ["==PROF== Connected to process 1", head]
    lines += [f'"{i}","{k}","(1, 1, 1)","gpu__time_duration.sum","ns","{v}"' for i, (k, v) in enumerate(kernels)]
    path = tmp_path / "step.csv"
    path.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, os.path.join(DEV, "gpu_step.py"), "--summarize", str(path), "--steps", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split()[0] == "43.0" and "4 launches a step" in out[0]
    assert [line.split()[-1] for line in out[1:]] == ["zaya_router_mlp", "zaya_expert_mlp", "fill_kernel"]
    assert [float(line.split()[0]) for line in out[1:]] == [21.0, 20.0, 2.0]
    assert [float(line.split()[2]) for line in out[1:]] == [1.0, 2.0, 1.0]


@pytest.mark.parametrize("what", ["source", "include", "heads"])
def test_one_process_ab_times_both_sides(what):
    """A smoke run of dev/ab_one_process.py on the CPU: the prompt filled once, each round times both sides, then
    the medians."""
    cmd = [sys.executable, os.path.join(DEV, "ab_one_process.py"), "--what", what, "--small", "--rounds", "2",
           "--steps", "2", "--context", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()
    assert out[0].startswith("prompt: 1 x 4 tokens in ")
    assert [line.split(":")[0] for line in out[1:5]] == [f"round 0 {what} on", f"round 0 {what} off",
                                                          f"round 1 {what} off", f"round 1 {what} on"]
    assert out[5].startswith(f"median tok/s: {what} on ") and "ratio" in out[5]


def test_one_process_ab_times_attention_settings_against_the_library():
    """--what attention on the CPU: the constants as they are, then each --configs setting, in the same rounds; a
    name that is not one of attention's constants is one line and exit 1."""
    cmd = [sys.executable, os.path.join(DEV, "ab_one_process.py"), "--what", "attention", "--small", "--rounds", "1",
           "--steps", "2", "--context", "4", "--configs", "CHUNK=2;LANES_PER_KEY=16"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()
    assert [line.split(":")[0] for line in out[1:4]] == ["round 0 as it is", "round 0 CHUNK=2",
                                                         "round 0 LANES_PER_KEY=16"]
    assert out[4].startswith("median tok/s: as it is ") and "CHUNK=2" in out[4] and "LANES_PER_KEY=16" in out[5]
    bad = subprocess.run(cmd[:-1] + ["CHUNKS=2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("--configs: CHUNKS is not one of")


def test_native_stacks_are_summarized_by_function_and_caller(tmp_path):
    """py-spy's raw stacks (outermost first, a count a line): 10 samples, 8 of them in the string hash under two
    callers (6 and 2), 2 in malloc. Lines of one function count as one; a caller is the frame right above."""
    raw = tmp_path / "stacks.txt"
    raw.write_text(
        "<module> (bench/x.py:10);loop (bench/x.py:20);mlx::core::eval_impl (/lib/libmlx.so);"
        "std::_Hash_bytes (/lib/libstdc++.so.6) 6\n"
        "<module> (bench/x.py:10);loop (bench/x.py:21);mlx::core::gpu::eval (/lib/libmlx.so);"
        "std::_Hash_bytes (/lib/libstdc++.so.6) 2\n"
        "<module> (bench/x.py:10);loop (bench/x.py:22);malloc (libc.so.6) 2\n")
    cmd = [sys.executable, os.path.join(DEV, "profile_native.py"), "--summarize", str(raw)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split("\n\n")
    assert out[0] == "samples: 10"
    assert out[1].splitlines()[1:] == [" 80.00% std::_Hash_bytes [libstdc++.so.6]", " 20.00% malloc [libc.so.6]"]
    callers = out[2].splitlines()[1:]
    assert callers[:3] == [" 80.00% std::_Hash_bytes [libstdc++.so.6]",
                           "     60.00% <- mlx::core::eval_impl [libmlx.so]",
                           "     20.00% <- mlx::core::gpu::eval [libmlx.so]"]
    inclusive = dict(reversed(line.strip().split(" ", 1)) for line in out[3].splitlines()[1:] if line.strip())
    assert inclusive["loop [x.py]"] == "100.00%" and inclusive["mlx::core::eval_impl [libmlx.so]"] == "60.00%"


def test_native_summary_of_a_missing_file_is_one_line():
    cmd = [sys.executable, os.path.join(DEV, "profile_native.py"), "--summarize", "/nonexistent/stacks.txt"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "cannot read" in res.stderr


def test_profile_decode_runs_every_op_on_the_small_model():
    """A smoke run of dev/profile_decode.py on the CPU: it calls the fused step's private pieces (_attention,
    _mlp_block) directly, so a change to their signatures must not break it unnoticed (it once did)."""
    cmd = [sys.executable, os.path.join(DEV, "profile_decode.py"), "--small", "--copies", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    assert "mlp_block (compiled)" in out and "cca+attention" in out and "whole step" in out


def test_nvcc_check_says_in_one_line_when_nvrtc_does_not_load(tmp_path):
    cmd = [sys.executable, os.path.join(DEV, "nvcc_check.py"), "--nvrtc", str(tmp_path / "libnvrtc.so.12")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: cannot load NVRTC from ") and r.stderr.count("\n") == 1


def test_python_step_times_fused_decode_with_stubbed_steps():
    cmd = [sys.executable, os.path.join(DEV, "python_step.py"), "--steps", "3", "--layers", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    ms, rest = out.split(" ", 1)
    assert float(ms) > 0 and rest == "ms of Python a step, 4 layers\n"


def test_every_gpu_test_is_in_a_group_the_device_script_runs():
    """dev/run_on_device.sh runs this file's GPU tests in groups chosen by name (pytest -k); a test no group's
    name matches would never run on a GPU."""
    script = open(os.path.join(DEV, "run_on_device.sh")).read()
    groups = re.search(r'TEST_GROUPS:-([^}"]+)', script).group(1).split(";")
    words = [w.strip() for g in groups for w in g.split(" or ")]
    gpu_tests = re.findall(r"^@gpu_only\n(?:@.*\n)*def (test_\w+)", open(os.path.join(ROOT, "tests", "test_kernels.py")).read(), re.M)
    assert len(gpu_tests) > 10
    assert [t for t in gpu_tests if not any(w in t for w in words)] == []


def test_nvcc_check_records_the_launches_a_decode_step_makes(monkeypatch):
    """--step compiles what a fused decode step launches, recorded on this machine: on a left-padded batch whose
    buffer splits into chunks, the launches docs/PERFORMANCE.md lists for a step (attention with the CCA step inside
    and its combine, the residual norms with their projections, the router (in its own launch at the small model's
    width), the expert MLP, the LM head), each assembled as MLX-CUDA gets it, one case a distinct variant."""
    monkeypatch.syspath_prepend(DEV)
    import nvcc_check
    from zaya_mlx.benchmark import small_config
    from zaya_mlx.kernels import attention

    monkeypatch.setattr(attention, "SINGLE_PASS_MAX", 8)
    cases = nvcc_check.step_cases(None, batch=2, context=12, kv_bits=None, config=small_config())
    bodies = {name.rsplit("_", 1)[0] for name, *_ in cases}
    assert bodies == {"decode_attention", "attention_combine", "residual_norm", "router_mlp", "expert_mlp",
                      "matvec"}, bodies
    attn = [t for name, _, _, t in cases if name.startswith("decode_attention")]
    assert [(t["HAS_CCA"], t["SPLIT"], t["T"]) for t in attn] == [(True, True, "bf16")]
    assert all("__global__ void " + name + "(" in source for name, source, _, _ in cases)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc to compile the CUDA twins")
def test_cuda_twins_compile_and_fit_an_sm():
    """dev/nvcc_check.py: every CUDA twin compiles as MLX assembles it, its registers times its threads fit an
    SM (else the launch fails on the GPU), and its threadgroup memory fits Metal's 32 KB."""
    r = subprocess.run([sys.executable, os.path.join(DEV, "nvcc_check.py")], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:]
    assert r.stdout.count("\nok ") + r.stdout.startswith("ok ") >= 20


def test_step_primitives_counts_the_combine_launch_attention_in_chunks_adds():
    """Two layers at batch 3: with attention in chunks (--split), each layer has one launch more, the combine; with
    the chunks merged in attention's launch (--fused-combine), none."""
    cmd = [sys.executable, os.path.join(DEV, "step_primitives.py"), "--layers", "2", "--batch", "3",
           "--group-experts-from", "off"]
    outs = [subprocess.run(cmd + split, capture_output=True, text=True, check=True, timeout=300).stdout
            for split in ([], ["--split"], ["--split", "--fused-combine"])]
    launches = [int(n) for out in outs for n in re.findall(r"\((\d+) launches\)", out)]
    assert len(launches) == 3 and launches[1] == launches[0] + 2 and launches[2] == launches[0], outs


def test_step_primitives_counts_the_router_launch_the_grouped_experts_add():
    """Two layers at batch 3, on one model: grouped from batch 3, each layer has one launch more than a token a
    threadgroup (the router's own, which the one-token expert kernel runs inside itself); grouped from 4, none."""
    cmd = [sys.executable, os.path.join(DEV, "step_primitives.py"), "--layers", "2", "--batch", "3",
           "--group-experts-from", "off,3,4"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    launches = [int(n) for n in re.findall(r"\((\d+) launches\)", out)]
    assert len(launches) == 3 and launches[1] == launches[0] + 2 and launches[2] == launches[0], out


def test_empty_kernels_empties_only_the_bodies_named():
    """lab.empty_kernels(model, bodies): the named bodies compile to nothing, the others and the shared helpers stay
    as they are, and leaving restores them all."""
    sys.path.insert(0, DEV)
    from lab import empty_kernels

    from zaya_mlx.benchmark import build_zaya, small_config
    from zaya_mlx.kernels import _build

    model = build_zaya(small_config(), None)
    whole = {name: _build._source(name) for name in ("expert_mlp.h", "residual_norm.h", "common.h")}
    with empty_kernels(model, ("expert_mlp.h",)):
        assert _build._source("expert_mlp.h") == "#if 0\n" + whole["expert_mlp.h"] + "\n#endif\n"
        assert _build._source("residual_norm.h") == whole["residual_norm.h"]
        assert _build._source("common.h") == whole["common.h"]
    with empty_kernels(model):
        assert _build._source("residual_norm.h").startswith("#if 0\n")
    assert {name: _build._source(name) for name in whole} == whole
