"""The examples run as documented, on a tiny fixture checkpoint instead of the hub's 8B."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name, *args, stdin=""):
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_logits_example_decode_step_equals_full_prefill(tiny_checkpoint):
    out = run_example("logits.py", "--model", tiny_checkpoint(), "--dtype", "float32", "hello there")
    # The example prints the difference between one cached decode step and a full prefill: in float32 it must be
    # ~0 (the decode step and the prefill run different ops, so in bf16 they differ by its rounding).
    diff = float(out.split("max |difference|:")[1].split()[0])
    assert diff < 1e-2, out
    assert "bytes per token" in out


def test_generate_example_streams_and_batches(tiny_checkpoint):
    out = run_example("generate.py", "--model", tiny_checkpoint(), "--max-tokens", 8, "hi")
    assert out.strip(), "the example printed nothing"


@pytest.mark.parametrize("recipe", ["mxfp4"])
def test_quantize_example_writes_a_loadable_folder(tiny_checkpoint, tmp_path, recipe):
    out_dir = tmp_path / "q"
    run_example("quantize.py", tiny_checkpoint("quant"), out_dir, "--recipe", recipe, "--no-generate")
    assert (out_dir / "config.json").exists() and list(out_dir.glob("model-*.safetensors"))
