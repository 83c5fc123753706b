"""`zaya bench` on a tiny model: the measurements are written, and --experts changes the model as it says."""

import json

import mlx.core as mx
import pytest

from zaya_mlx import benchmark
from zaya_mlx.benchmark import count_primitives


def bench(run_zaya, tmp_path, *args):
    """Run a small `zaya bench`; its JSON results (one per model measured)."""
    out = tmp_path / "bench.json"
    code, _, err = run_zaya("bench", "--small", "--quant", "bf16", "--batch", "1", "--steps", "2", "--prompt", "8",
                            "--context", "8", "--json", out, *args)
    assert code in (0, None), err
    return json.loads(out.read_text())


def test_fewer_experts_keep_a_tokens_work(run_zaya, tmp_path):
    """Top-1 routing reads one expert a token however many there are: with --experts 2 the step's graph is the
    4-expert model's, the bytes a token reads differ only by the router's output rows (one an expert), and the
    total weight shrinks by about two experts' share."""
    (four,) = bench(run_zaya, tmp_path)
    (two,) = bench(run_zaya, tmp_path, "--experts", "2")
    assert four["decode_tps"]["1"] > 0 and two["decode_tps"]["1"] > 0
    assert two["primitives_per_step"] == four["primitives_per_step"]
    assert two["arguments_per_step"] == four["arguments_per_step"]
    assert abs(two["weight_gb_per_token"] / four["weight_gb_per_token"] - 1) < 1e-3
    unread = four["weight_gb"] - four["weight_gb_per_token"]  # the 3 experts a token does not read
    assert abs((four["weight_gb"] - two["weight_gb"]) / (2 * unread / 3) - 1) < 1e-2


def test_the_json_keeps_each_runs_rate(run_zaya, tmp_path):
    """--runs 3: the three timed rates are written, and the rate reported is their median."""
    (res,) = bench(run_zaya, tmp_path, "--runs", "3")
    runs = res["decode_runs"]["1"]
    assert len(runs) == 3 and all(r > 0 for r in runs) and res["decode_tps"]["1"] == sorted(runs)[1]


@pytest.mark.parametrize("args", [["--batch", "x"], ["--batch", "1,0"], ["--quant", "int3"], ["--quant", ","]])
def test_bad_input_is_one_line(run_zaya, args):
    code, out, err = run_zaya("bench", "--small", *args)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in out + err


@pytest.mark.parametrize("args, says", [(["bench", "--runs", "0"], "'--runs'"), (["bench", "--nope"], "--nope"),
                                        (["generate"], "'--prompt'"), (["bench", "extra"], "(extra)")])
def test_usage_errors_are_one_line_too(run_zaya, args, says):
    """What the option parser rejects (a value out of range, an unknown option, a missing one) is one line as well,
    not click's boxed usage message; --help still shows the help."""
    code, out, err = run_zaya(*args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err
    code, out, _ = run_zaya("bench", "--help")
    assert code == 0 and "--runs" in out


def test_a_steps_primitives_and_their_arguments_are_counted():
    """A hand-counted graph: zeros (Broadcast, Full), a cast, a scalar (Broadcast) times it, a split in two, an add:
    7 primitives taking 1+1+1+1+2+1+2 arrays and making 1+1+1+1+1+2+1."""

    def forward(tokens, cache):
        a, b = mx.split(tokens.astype(mx.float32) * 2, 2, axis=0)
        return a + b

    n, kinds, arguments = count_primitives(forward, lambda: [], batch=2)
    assert n == 7 and kinds["Broadcast"] == 2 and kinds["Split"] == 1
    assert arguments == (9, 8)


def test_a_decode_rate_is_the_median_of_its_runs(monkeypatch):
    """Three runs at 5, 1 and 3 tok/s (graph building 0.5, 0.1, 0.3 ms): the rate is 3, the building time 0.3 (each
    the median, taken apart), and the log line gives the runs' range."""
    runs = iter([(5.0, 0.5), (1.0, 0.1), (3.0, 0.3)])

    def fake_run(forward, make_cache, batch, context, steps, vocab):
        rate, build_ms = next(runs)
        return benchmark.DecodeTiming(rate, build_ms, [rate])

    monkeypatch.setattr(benchmark, "time_decode", fake_run)
    timing = benchmark.median_decode(None, None, 4, 8, 2, 10, runs=3)
    assert (timing.tps, timing.build_ms, timing.rates) == (3.0, 0.3, [5.0, 1.0, 3.0])
    assert timing.runs() == ", median of 3 runs: 1.0-5.0"
    assert benchmark.DecodeTiming(2.0, 0.1, [2.0]).runs() == ""  # one run: no range


def test_runs_reach_every_model_measured(run_zaya, tmp_path):
    code, out, err = run_zaya("bench", "--small", "--quant", "bf16", "--batch", "1", "--steps", "2", "--prompt", "8",
                              "--context", "8", "--runs", "2", "--plain")
    assert code in (0, None), err
    assert out.count("median of 2 runs") == 3  # fused, fused not compiled, plain ops


def test_an_interrupted_command_exits_130_without_a_traceback(run_zaya, monkeypatch):
    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run", interrupted)
    code, out, err = run_zaya("bench", "--small")
    assert code == 130 and "Traceback" not in out + err
