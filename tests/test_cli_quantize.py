"""`zaya quantize`: a thin CLI over `zaya_mlx.quantize`; errors are one line on stderr and a non-zero exit."""

import json

import pytest

import fixtures

fixtures.TINY.setdefault("quant", dict(fixtures.TINY["base"], moe_intermediate_size=128))


@pytest.fixture(scope="module")
def src(tiny_checkpoint):
    return tiny_checkpoint("quant")


def test_quantize_writes_folder_and_table(src, tmp_path, run_zaya):
    out = tmp_path / "q"
    code, stdout, _ = run_zaya("quantize", src, out, "--recipe", "mixed", "--shard-size", "0.0001")
    assert code == 0
    assert "mlp.experts.gate_up_proj" in stdout and "affine4 g64" in stdout and "total" in stdout
    config = json.loads((out / "config.json").read_text())
    block = config["quantization"]
    assert {k: block[k] for k in ("group_size", "bits", "mode")} == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert block["model.layers.2.mlp.experts.down_proj"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


def test_recipe_file_and_force(src, tmp_path, run_zaya):
    recipe = tmp_path / "embed8.json"
    recipe.write_text(json.dumps({"rules": [{"match": "model.embed_tokens", "format": "affine8"}]}))
    out = tmp_path / "q"
    assert run_zaya("quantize", src, out)[0] == 0
    code, _, err = run_zaya("quantize", src, out, "--recipe", recipe)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error:") and "--force" in err
    code, stdout, _ = run_zaya("quantize", src, out, "--recipe", recipe, "--force")
    assert code == 0 and "embed_tokens" in stdout
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert block["mode"] == "affine" and block["bits"] == 8
    assert block["model.layers.0.self_attn.o_proj"] is False  # quantizable, named by no rule: kept


@pytest.mark.parametrize("case", ["unknown recipe", "bad recipe file", "missing src", "not a model", "bad shard size",
                                  "out under a file"])
def test_errors_are_one_line(src, tmp_path, run_zaya, case):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rules": [{"match": "*", "format": "int2"}]}')
    args = {
        "unknown recipe": [src, tmp_path / "o", "--recipe", "fp3"],
        "bad recipe file": [src, tmp_path / "o", "--recipe", bad],
        "missing src": [tmp_path / "nowhere", tmp_path / "o"],
        "not a model": [tmp_path, tmp_path / "o"],
        "bad shard size": [src, tmp_path / "o", "--shard-size", "0"],
        "out under a file": [src, bad / "o"],  # a folder no one can make, root included
    }[case]
    code, _, err = run_zaya("quantize", *args)
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if case == "out under a file":
        assert err == f"error: cannot write {bad / 'o'}: {bad} is a file\n"
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
