"""`zaya bench` on a tiny model: the measurements are written, --experts changes the model as it says, the bytes a
step moves follow from the shapes, and a run that does not fit is refused before anything is built."""

import json

import mlx.core as mx
import pytest

from zaya_mlx import benchmark
from zaya_mlx.benchmark import count_primitives, fill_context, small_config, weights_read
from mlx.utils import tree_flatten
from zaya_mlx.model import Model


def bench(run_zaya, tmp_path, *args):
    """Run a small `zaya bench`; its JSON results (one per model measured)."""
    out = tmp_path / "bench.json"
    code, _, err = run_zaya("bench", "--small", "--quant", "bf16", "--batch", "1", "--steps", "2", "--context", "8",
                            "--runs", "1", "--json", out, *args)
    assert code in (0, None), err
    return json.loads(out.read_text())


def test_fewer_experts_keep_a_tokens_work(run_zaya, tmp_path):
    """Top-1 routing reads one expert a token however many there are: with --experts 2 the step's graph is the
    4-expert model's, the bytes a token reads differ only by the router's output rows (one an expert), and the
    total weight shrinks by about two experts' share."""
    (four,) = bench(run_zaya, tmp_path)
    (two,) = bench(run_zaya, tmp_path, "--experts", "2")
    (r4,), (r2,) = four["rows"], two["rows"]
    assert r4["decode_tps"] > 0 and r2["decode_tps"] > 0
    assert r2["primitives"] == r4["primitives"] and r2["arguments"] == r4["arguments"]
    assert abs(two["weight_gb_per_token"] / four["weight_gb_per_token"] - 1) < 1e-3
    unread = four["weight_gb"] - four["weight_gb_per_token"]  # the 3 experts a token does not read
    assert abs((four["weight_gb"] - two["weight_gb"]) / (2 * unread / 3) - 1) < 1e-2


def test_the_json_keeps_each_runs_rate(run_zaya, tmp_path):
    """--runs 3: the three timed rates are written, and the rate reported is their median."""
    (res,) = bench(run_zaya, tmp_path, "--runs", "3")
    (row,) = res["rows"]
    assert len(row["decode_runs"]) == 3 and all(r > 0 for r in row["decode_runs"])
    assert row["decode_tps"] == sorted(row["decode_runs"])[1]


def test_rows_and_kv_formats_and_the_bytes_a_step_moves(run_zaya, tmp_path):
    """Each batch x context with each KV format is a row. The small model's KV a token, by hand: 2 layers x (keys,
    values) x 2 KV heads x 64 values at 2 bytes = 1,024 bytes; at 8 bits 64 bytes + a bf16 scale and bias for the
    one group of 64 = 68 bytes a row, 544 a token. A step moves the weights it reads and the batch's KV; the bound
    is the bandwidth over those bytes."""
    (res,) = bench(run_zaya, tmp_path, "--rows", "1x8,2x20", "--kv", "bf16,8", "--bandwidth", "0.5", "--steps", "1")
    assert res["kv_bytes_per_token"] == {"bf16": 1024, "8-bit": 544}
    rows = {(r["kv"], r["batch"], r["context"]): r for r in res["rows"]}
    assert set(rows) == {(kv, b, c) for kv in ("bf16", "8-bit") for b, c in ((1, 8), (2, 20))}
    for (kv, b, c), r in rows.items():
        weights = r["bytes_per_step"] - b * c * res["kv_bytes_per_token"][kv]
        assert weights == rows["bf16", b, c]["bytes_per_step"] - b * c * 1024  # the same weights either way
        assert r["bound_tps"] == pytest.approx(0.5e12 * b / r["bytes_per_step"])
        assert r["share"] == pytest.approx(r["decode_tps"] / r["bound_tps"]) and r["prefill_tps"] > 0
    assert rows["bf16", 2, 20]["bytes_per_step"] - rows["8-bit", 2, 20]["bytes_per_step"] == 40 * (1024 - 544)
    # two tokens choose 4 (1 - (3/4)^2) = 1.75 of the 4 experts on average: more weights read than one token's
    assert rows["bf16", 2, 20]["bytes_per_step"] - 40 * 1024 > rows["bf16", 1, 8]["bytes_per_step"] - 8 * 1024


def test_a_row_the_back_end_cannot_run_is_reported_and_the_others_are_measured(run_zaya, tmp_path, monkeypatch):
    """A row whose ops the back end refuses (MLX raises a RuntimeError, as MLX-CUDA's quantized_matmul did for an
    8-bit cache) is named with what MLX said, in the log, the table and the JSON; the rows after it are still
    measured, and the command ends with one error line and exit code 1 once the results are written."""
    real = benchmark.measure_row

    def refusing(forward, make_cache, batch, context, kv, **kw):
        if kv == "8-bit" and batch == 2:
            raise RuntimeError("[quantized_matmul] No implementation for problem shape: 2x2x64x4\nmore")
        return real(forward, make_cache, batch, context, kv, **kw)

    monkeypatch.setattr(benchmark, "measure_row", refusing)
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    code, stdout, err = run_zaya("bench", "--small", "--quant", "bf16", "--rows", "2x8,1x8", "--kv", "8,bf16",
                                 "--steps", "1", "--runs", "1", "--json", out, "--markdown", table)
    assert code == 1
    assert err == ("error: 1 row(s) did not run, the first: 2 x 8 (8-bit KV): [quantized_matmul] No implementation "
                   "for problem shape: 2x2x64x4\n")
    assert "2 x 8 (8-bit KV): failed: [quantized_matmul]" in stdout
    (res,) = json.loads(out.read_text())
    assert [(r["kv"], r["batch"]) for r in res["rows"]] == [("8-bit", 1), ("bf16", 2), ("bf16", 1)]
    assert all(r["decode_tps"] > 0 for r in res["rows"])
    assert res["failed"] == ["2 x 8 (8-bit KV): [quantized_matmul] No implementation for problem shape: 2x2x64x4"]
    assert "Rows that did not run:" in table.read_text() and "2 x 8 (8-bit KV)" in table.read_text()


def test_both_forms_of_the_expert_kernel_are_timed_in_one_run(run_zaya, tmp_path):
    """--group-experts-from off,2: a fused run a form, named so, on one model; at batch 2 the grouped run counts
    the distinct experts two tokens choose (1.75 of 4 on average), the other a token's own each (2)."""
    per_token, grouped = bench(run_zaya, tmp_path, "--rows", "2x8", "--group-experts-from", "off,2")
    assert "a token a threadgroup" in per_token["name"] and "grouped from batch 2" in grouped["name"]
    (a,), (b,) = per_token["rows"], grouped["rows"]
    assert a["decode_tps"] > 0 and b["decode_tps"] > 0
    expert = (grouped["weight_gb"] - grouped["weight_gb_per_token"]) * 1e9 / 3  # one of the 4 experts' bytes
    assert (a["bytes_per_step"] - b["bytes_per_step"]) / expert == pytest.approx(2 - 1.75, rel=1e-2)


def test_weights_read_counts_the_experts_a_batch_chooses():
    """All but the experts, and E (1 - (1 - 1/E)^B) experts' share: one expert at batch 1, 10.30 of 16 at 16."""
    assert weights_read(1000 + 1600, 1600, 16, 1) == 1000 + 100
    assert weights_read(1000 + 1600, 1600, 16, 16) == int(1000 + 100 * 16 * (1 - (15 / 16) ** 16))
    assert abs(16 * (1 - (15 / 16) ** 16) - 10.30) < 0.01
    # the experts a token a threadgroup: each token reads its own, 16 expert reads at 16
    assert weights_read(1000 + 1600, 1600, 16, 16, grouped=False) == 1000 + 1600
    assert weights_read(1000 + 1600, 1600, 16, 1, grouped=False) == 1000 + 100


def test_a_long_context_is_filled_in_chunks_with_one_positions_logits():
    """fill_context runs the prompt in chunks and the last token alone, and leaves the cache as one pass over the
    whole prompt would: the next token and the following step's logits agree."""
    mx.random.seed(3)
    model = Model(small_config())
    lengths = []

    def forward(tokens, cache):
        lengths.append(tokens.shape[1])
        return model(tokens, cache)

    cache = model.make_cache()
    mx.random.seed(5)
    tok = fill_context(forward, cache, 2, 40, 512, chunk=16)
    assert lengths == [16, 16, 7, 1]
    mx.random.seed(5)
    tokens = mx.random.randint(0, 512, (2, 40)).astype(mx.int32)
    whole = model.make_cache()
    logits = model(tokens, whole)
    assert (tok == mx.argmax(logits[:, -1:], axis=-1)).all()
    step, ref = model(tok, cache), model(tok, whole)
    assert mx.abs(step - ref).max().item() < 1e-3 * mx.abs(ref).max().item()


def test_the_models_forward_gives_the_last_positions_logits_when_asked():
    mx.random.seed(4)
    model = Model(small_config())
    tokens = mx.random.randint(0, 512, (2, 9)).astype(mx.int32)
    last = model(tokens, last_only=True)
    assert last.shape == (2, 1, 512) and mx.allclose(last, model(tokens)[:, -1:], atol=1e-5).item()


@pytest.mark.parametrize("args, says", [
    (["--quant", "bf16"], "the model needs ~"),
    (["--quant", "mxfp4", "--rows", "32x32768"], "no row fits: the smallest, 32 x 32768 (bf16 KV), needs"),
])
def test_a_run_that_does_not_fit_is_refused_before_building(run_zaya, args, says, monkeypatch):
    """Full size in a 12 GB budget: the bf16 weights alone (16.8 GB) do not fit; MXFP4 weights do, but not 32
    sequences of 32,768 tokens of bf16 KV (43 GB). Nothing is built: one line, exit 1."""
    monkeypatch.setattr(benchmark, "build_zaya", lambda *a, **k: pytest.fail("built"))
    code, out, err = run_zaya("bench", "--memory", "12", *args)
    assert code == 1 and out == "" and err.startswith(f"error: {says}") and err.count("\n") == 1
    assert "--memory" in err and ("--quant mxfp4" in err or "--kv 8" in err)


def test_rows_that_do_not_fit_are_skipped_and_said_so():
    """The plan of the issue's rows on an 80 GB GPU: MXFP4 weights (4.5-5 GB); 32 x 32,768 fits with 8-bit KV
    (32 x 36,864 allocated x 21,760 bytes, twice: 51 GB) but not in bf16 (97 GB); every other row fits."""
    config = benchmark.full_config()
    rows = ((1, 256), (1, 16384), (16, 256), (16, 16384), (32, 32768))
    mx.reset_peak_memory()
    plan = benchmark.plan_bench(config, benchmark.lazy_model(config, "mxfp4"), rows, (None, 8), steps=32, runs=3,
                                chunk=2048, budget=(int(68e9), "85% of 80 GB"), cpu=False)
    assert set(plan.skipped) == {(None, 32, 32768)} and plan.row == "32 x 32768 (8-bit KV)"
    assert 4.4e9 < plan.weights < 5.0e9 and plan.kv == 2 * 32 * 36864 * 21760
    assert mx.get_peak_memory() < 1e8  # planned from the shapes: no weight was made


def test_a_checkpoint_is_measured(run_zaya, tiny_model_dir, tmp_path):
    """--model: the checkpoint's own weights as the loader gives them (bf16), not random ones of the config."""
    from zaya_mlx.loading import load_model
    from mlx.utils import tree_flatten

    out = tmp_path / "b.json"
    code, _, err = run_zaya("bench", "--model", tiny_model_dir, "--rows", "1x6", "--steps", "1", "--runs", "1",
                            "--json", out)
    assert code in (0, None), err
    (res,) = json.loads(out.read_text())
    params = tree_flatten(load_model(tiny_model_dir).parameters())
    assert res["weight_gb"] * 1e9 == pytest.approx(sum(v.nbytes for _, v in params))
    assert res["rows"][0]["decode_tps"] > 0


@pytest.mark.parametrize("args", [["--batch", "x"], ["--batch", "1,0"], ["--quant", "int3"], ["--quant", ","],
                                  ["--rows", "16"], ["--rows", "2x0"], ["--kv", "3"], ["--model", "x", "--small"],
                                  ["--group-experts-from", "0"], ["--group-experts-from", "off,x"],
                                  ["--json", "/etc/passwd/b.json"], ["--markdown", "/tmp"]])
def test_bad_input_is_one_line(run_zaya, args):
    code, out, err = run_zaya("bench", "--small", *args)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in out + err


@pytest.mark.parametrize("args, says", [(["bench", "--runs", "0"], "'--runs'"), (["bench", "--nope"], "--nope"),
                                        (["generate"], "'--prompt'"), (["bench", "extra"], "(extra)"),
                                        (["rsa", "x", "--memory", "nan"], "'--memory'"),
                                        (["rsa", "x", "--memory", "inf"], "'--memory'"),
                                        (["bench", "--bandwidth", "inf"], "'--bandwidth'")])
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


def test_a_decode_rate_is_the_median_of_its_runs():
    """Three runs at 5, 1 and 3 tok/s (graph building 0.5, 0.1, 0.3 ms): the rate is 3, the building time 0.3 (each
    the median, taken apart), and the log line gives the runs' range."""
    runs = iter([(5.0, 0.5), (1.0, 0.1), (3.0, 0.3)])

    timing = benchmark.median_timing([benchmark.DecodeTiming(rate, ms, [rate]) for rate, ms in runs])
    assert (timing.tps, timing.build_ms, timing.rates) == (3.0, 0.3, [5.0, 1.0, 3.0])
    assert timing.runs() == ", median of 3 runs: 1.0-5.0"
    assert benchmark.DecodeTiming(2.0, 0.1, [2.0]).runs() == ""  # one run: no range


def test_runs_reach_every_model_measured(run_zaya, tmp_path):
    code, out, err = run_zaya("bench", "--small", "--quant", "bf16", "--batch", "1", "--steps", "2", "--context", "8",
                              "--runs", "2", "--plain")
    assert code in (0, None), err
    assert out.count("median of 2 runs") == 3  # fused, fused not compiled, plain ops


def test_an_interrupted_command_exits_130_without_a_traceback(run_zaya, monkeypatch):
    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run", interrupted)
    code, out, err = run_zaya("bench", "--small")
    assert code == 130 and "Traceback" not in out + err


@pytest.mark.parametrize("quant", ["mxfp4", "affine4"])
def test_weights_quantized_in_blocks_of_rows_are_those_quantized_whole(quant, monkeypatch):
    """The random model's large weights are quantized a block of rows at a time (bounded memory on the CPU): the same
    packed weights, scales and biases as quantizing each whole."""
    whole = dict(tree_flatten(benchmark.build_zaya(small_config(), quant).parameters()))
    monkeypatch.setattr(benchmark, "QUANTIZE_ROWS_BYTES", 4096)
    blocks = dict(tree_flatten(benchmark.build_zaya(small_config(), quant).parameters()))
    assert whole.keys() == blocks.keys() and any(k.endswith("embed_tokens.scales") for k in whole)
    assert all(mx.array_equal(whole[k], blocks[k]).item() for k in whole)
