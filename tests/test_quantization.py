"""The quantizer: round trips on tiny checkpoints, bytes on disk, bit-identical kept tensors, atomic writes.

KL divergences are measured against the unquantized fp32 model on 512 tokens; with `pytest -s` they are printed.
"""

import errno
import json
import os
import re
import shutil
import stat
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import fixtures
from fixtures import fixture_ids
from zaya_mlx import ZayaError, load_model, quantize
from zaya_mlx import quantization as q
from zaya_mlx.loading import open_checkpoint

RECIPES = ("affine8", "mxfp8", "mixed", "nvfp4", "affine4", "mxfp4")
# Hand-computed stored bits per weight: packed value + the group's scale (+ bias for affine), bf16 for affine.
BPW = {"mxfp4": 4 + 8 / 32, "nvfp4": 4 + 8 / 16, "mxfp8": 8 + 8 / 32, "affine4": 4 + 32 / 64, "affine8": 8 + 32 / 64}
ATTN_EMBED = re.compile(r"model\.embed_tokens|.*\.self_attn\.(qkv_proj\.in_proj|o_proj)")
EXPERTS = re.compile(r".*\.mlp\.experts\.(gate_up_proj|down_proj)")
ROUTER = re.compile(r".*\.mlp\.gate\.(down_proj|router_mlp\.(fc1|fc2|out_proj))")


def expected_bpw(recipe: str, module: str) -> float:
    if recipe == "mixed":
        return BPW["affine4"] if EXPERTS.fullmatch(module) else BPW["affine8"]
    return BPW[recipe]


def log_softmax(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def kl(ref_logits, logits) -> float:
    p = mx.softmax(ref_logits, axis=-1)
    return mx.mean(mx.sum(p * (log_softmax(ref_logits) - log_softmax(logits)), axis=-1)).item()


def read_folder(folder) -> dict:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(mx.load(str(folder / f)))
    assert set(out) == set(index["weight_map"])
    return out


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def quant_src(tiny_checkpoint):
    return tiny_checkpoint("quant")  # transformers layout, fp32, 2 shards, with tokenizer


@pytest.fixture(scope="module")
def quantized(quant_src, tmp_path_factory):
    """recipe -> (folder, report), each written once."""
    done = {}

    def get(recipe):
        if recipe not in done:
            out = tmp_path_factory.mktemp("quantized") / recipe
            done[recipe] = (out, quantize(quant_src, out, recipe=recipe))
        return done[recipe]

    return get


@pytest.fixture(scope="module")
def kl_per_recipe(quant_src, quantized):
    ids = mx.array(fixture_ids(seed=1, length=64, batch=8))
    ref = load_model(quant_src, dtype="float32")(ids)
    out = {r: kl(ref, load_model(quantized(r)[0], dtype="float32")(ids)) for r in RECIPES}
    print("\nKL(unquantized || quantized) over 512 tokens:", {r: f"{v:.2e}" for r, v in out.items()})
    return out


def with_mlx_lm():
    """mlx-lm with model_type zaya registered (`import zaya_mlx` does it; make sure)."""
    from zaya_mlx.mlx_lm_registry import register

    assert register()
    import mlx_lm

    return mlx_lm


# --- recipes ------------------------------------------------------------------------------------------------------


def test_builtin_recipes_load():
    assert set(RECIPES) <= set(q.available_recipes())
    for name in RECIPES:
        recipe = q.load_recipe(name)
        assert recipe.description and recipe.default is None
        # what decides routing stays; experts, attention and the embedding are quantized
        assert recipe.format_for("model.layers.0.mlp.gate.router_mlp.fc1", 40) is None
        assert recipe.format_for("model.layers.7.mlp.gate.down_proj", 40) is None
        for module in ("model.layers.3.mlp.experts.gate_up_proj", "model.layers.3.self_attn.o_proj", "model.embed_tokens"):
            assert recipe.format_for(module, 40) is not None, (name, module)


def test_formats_bits_per_weight():
    for spec, bpw in [("mxfp4", 4.25), ("nvfp4", 4.5), ("mxfp8", 8.25), ("affine4", 4.5), ("affine8", 8.5),
                      ("affine4-g32", 5.0), ("affine3-g128", 3.25)]:
        assert q.Format.parse(spec).bits_per_weight() == bpw, spec
    assert q.Format.parse({"mode": "affine", "bits": 6, "group_size": 32}) == q.Format("affine", 6, 32)
    assert q.Format.parse("keep") is None
    for bad in ("mxfp3", "affine7", "affine4-g48", {"mode": "mxfp4", "group_size": 64}, 4):
        with pytest.raises(ValueError):
            q.Format.parse(bad)


def test_rules_by_pattern_and_layer():
    recipe = q.load_recipe({"rules": [
        {"match": "model.layers.*.mlp.experts.*", "layers": [0, "-2:"], "format": "affine8"},
        {"regex": r"model\.layers\.\d+\.mlp\.experts\.down_proj", "format": "keep"},
        {"match": "model.layers.*.mlp.experts.*", "format": "mxfp4"},
    ], "default": "nvfp4"})
    f = lambda m: recipe.format_for(m, 10)  # noqa: E731
    assert f("model.layers.0.mlp.experts.down_proj") == q.Format("affine", 8, 64)
    assert f("model.layers.9.mlp.experts.down_proj") == q.Format("affine", 8, 64)
    assert f("model.layers.8.mlp.experts.gate_up_proj") == q.Format("affine", 8, 64)
    assert f("model.layers.5.mlp.experts.down_proj") is None
    assert f("model.layers.5.mlp.experts.gate_up_proj") == q.Format("mxfp4", 4, 32)
    assert f("model.embed_tokens") == q.Format("nvfp4", 4, 16)


@pytest.mark.parametrize("bad, message", [
    ("no-such-recipe", "unknown recipe 'no-such-recipe'"),
    ({"rules": [{"match": "x", "format": "int3"}]}, "unknown format"),
    ({"rules": [{"match": "x", "format": "mxfp4", "layer": [1]}]}, "unknown keys"),
    ({"rules": [{"match": "x", "regex": "x", "format": "mxfp4"}]}, "exactly one of"),
    ({"rules": [{"match": "x", "layers": ["a:b"], "format": "mxfp4"}]}, "layers"),
    ({"rulez": []}, "unknown recipe keys"),
])
def test_bad_recipes_are_one_line_errors(bad, message):
    with pytest.raises(ZayaError, match=re.escape(message)) as e:
        q.load_recipe(bad)
    assert "\n" not in str(e.value)


def test_recipe_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"rules": [{"match": "model.embed_tokens", "format": "affine8"}]}')
    recipe = q.load_recipe(str(path))
    assert recipe.name == "mine" and recipe.format_for("model.embed_tokens", 3) == q.Format("affine", 8, 64)
    path.write_text("{not json")
    with pytest.raises(ZayaError, match="not valid JSON"):
        q.load_recipe(str(path))


# --- round trips --------------------------------------------------------------------------------------------------


def test_kl_ordering(kl_per_recipe):
    k = kl_per_recipe
    assert all(np.isfinite(v) and v >= 0 for v in k.values()), k
    # ordered as expected, with margins (measured margins are 5x and more)
    assert k["affine8"] < 0.5 * k["mixed"], k
    assert k["mixed"] < 0.5 * min(k["mxfp4"], k["affine4"]), k
    assert k["mxfp8"] < 0.5 * min(k["mxfp4"], k["affine4"], k["nvfp4"]), k
    assert k["mxfp4"] < 0.1 and k["affine4"] < 0.1, k


def test_report(quantized):
    _, report = quantized("mixed")
    groups = {g.name: g for g in report.groups}
    assert groups["mlp.experts.gate_up_proj"].format == "affine4 g64"
    assert groups["embed_tokens"].format == "affine8 g64"
    assert groups["mlp.gate.router_mlp.fc1"].rel_error is None
    assert 0 < groups["embed_tokens"].rel_error < 0.02 < groups["mlp.experts.down_proj"].rel_error < 0.2
    assert groups["mlp.experts.down_proj"].bits_per_weight == 4.5
    assert not report.skipped
    assert report.bytes == sum(g.bytes for g in report.groups)
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(report)
    assert "mlp.experts.gate_up_proj" in console.export_text()


@pytest.mark.parametrize("recipe", RECIPES)
def test_layout_config_and_bytes_on_disk(quantized, quant_src, recipe):
    out, report = quantized(recipe)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "zaya" and config["quantization"] == config["quantization_config"]
    block = config["quantization"]
    weights = read_folder(out)
    source = dict(open_checkpoint(quant_src).iter_tensors())

    quantized_modules = sorted(n[: -len(".scales")] for n in weights if n.endswith(".scales"))
    modules = [n[: -len(".weight")] for n in source if n.endswith(".weight")]
    assert quantized_modules == sorted(m for m in modules if ATTN_EMBED.fullmatch(m) or EXPERTS.fullmatch(m))
    for module in quantized_modules:
        params = source[f"{module}.weight"].size
        stored = sum(weights[f"{module}.{s}"].nbytes for s in ("weight", "scales", "biases") if f"{module}.{s}" in weights)
        assert stored * 8 == params * expected_bpw(recipe, module), module
        # mlx-lm convention: the global default or a per-module dict says how
        params_of = block.get(module, {k: block[k] for k in ("group_size", "bits", "mode")})
        assert params_of["bits"] == (8 if expected_bpw(recipe, module) > 8 else 4), module
    # the router's linears are quantizable modules left as they are: an explicit False
    assert sorted(k for k, v in block.items() if v is False) == sorted(m for m in modules if ROUTER.fullmatch(m))

    # files hold exactly the header and the tensors
    data = 0
    for f in sorted(out.glob("model-*-of-*.safetensors")):
        n = struct.unpack("<Q", f.read_bytes()[:8])[0]
        header = json.loads(f.read_bytes()[8 : 8 + n])
        header.pop("__metadata__")
        size = max(v["data_offsets"][1] for v in header.values())
        assert f.stat().st_size == 8 + n + size
        data += size
    kept = sum(a.nbytes for n, a in source.items() if not (n.endswith(".weight") and n[:-7] in quantized_modules))
    expected = kept + sum(source[f"{m}.weight"].size * expected_bpw(recipe, m) / 8 for m in quantized_modules)
    assert data == expected == report.bytes


@pytest.mark.parametrize("layout, dtype", [("transformers", "float32"), ("legacy", "bfloat16")])
def test_kept_tensors_bit_identical(tiny_checkpoint, tmp_path, layout, dtype):
    src = tiny_checkpoint("quant", layout, dtype)
    out = tmp_path / "out"
    quantize(src, out, "mxfp4")
    weights = read_folder(out)
    kept = 0
    for name, a in open_checkpoint(src).iter_tensors():
        if name.endswith(".weight") and f"{name[:-7]}.scales" in weights:
            continue  # quantized
        b = weights[name]
        assert a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item(), name
        kept += 1
    assert kept > 40
    assert weights["model.layers.0.mlp.gate.balancing_biases"].dtype == mx.float32
    if dtype == "bfloat16":
        assert weights["model.layers.0.mlp.experts.down_proj.scales"].dtype == mx.uint8
        assert weights["model.norm.weight"].dtype == mx.bfloat16
    model = load_model(out)
    assert model(mx.array([[5, 6, 7]])).shape == (1, 3, 384)


def test_loads_with_mlx_lm(quantized):
    mlx_lm = with_mlx_lm()
    ids = mx.array(fixture_ids(seed=2, length=16, batch=2))
    for recipe in ("mxfp4", "mixed"):
        out, _ = quantized(recipe)
        model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)  # config.json names our model file
        assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
        assert type(model.layers[0].mlp.experts.gate_up_proj).__name__ == "QuantizedSwitchLinear"
        assert type(model.layers[0].mlp.gate.router_mlp.fc1).__name__ == "Linear"
        ours = load_model(out, dtype="float32")
        assert mx.allclose(model(ids), ours(ids), atol=1e-4, rtol=1e-4).item(), recipe
        assert tokenizer.encode("hello there") and tokenizer.chat_template


def test_side_files_copied(quantized, quant_src):
    out, _ = quantized("mxfp4")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (quant_src / name).read_bytes(), name


def test_shape_that_does_not_fit_stays_unquantized(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("base")  # expert intermediate 32: down_proj [E, 64, 32] does not fit group 64
    out = tmp_path / "out"
    report = quantize(src, out, "affine4")
    names = sorted(s.name for s in report.skipped)
    assert names == [f"model.layers.{i}.mlp.experts.down_proj.weight" for i in range(3)]
    assert all("group size 64" in s.reason and s.format == "affine4 g64" for s in report.skipped)
    config = json.loads((out / "config.json").read_text())
    assert all(config["quantization"][n[:-7]] is False for n in names)
    weights = read_folder(out)
    source = dict(open_checkpoint(src).iter_tensors())
    for n in names:
        assert mx.array_equal(weights[n], source[n]).item()
    assert "model.layers.0.mlp.experts.gate_up_proj.scales" in weights
    load_model(out, dtype="float32")(mx.array([[3, 4, 5]]))


def dequantized_reference(folder, reference):
    """`reference` (transformers, fp32) with each weight the folder quantized replaced by its dequantized values:
    the model a correct run of the quantized folder computes. The fused in_proj splits back into q, k, v rows."""
    import torch

    config = json.loads((folder / "config.json").read_text())["quantization"]
    weights = read_folder(folder)
    state = fixtures.reference_state_dict(reference)  # without the tied head, which follows the embedding
    for name in [n for n in weights if n.endswith(".scales")]:
        module = name[: -len(".scales")]
        fmt = config.get(module) or config
        w = mx.dequantize(weights[module + ".weight"], weights[name], weights.get(module + ".biases"),
                          group_size=fmt["group_size"], bits=fmt["bits"], mode=fmt.get("mode", "affine"),
                          dtype=mx.float32)
        w = torch.from_numpy(np.array(w))
        if module.endswith("qkv_proj.in_proj"):
            parts = [module[: -len("in_proj")] + f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")]
            for part, rows in zip(parts, torch.split(w, [state[p].shape[0] for p in parts])):
                state[part] = rows
        else:
            state[module if ".experts." in module else module + ".weight"] = w
    model = fixtures.make_reference("ragged")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(fixtures.TIED), (missing, unexpected)
    model.tie_weights()
    return model


@pytest.mark.parametrize("recipe", RECIPES)
def test_partly_quantized_folder_runs_at_default_dtype(recipe, tiny_checkpoint, tmp_path, run_zaya):
    """Expert down projections that fit no group size stay bf16 beside quantized gate/up projections; the folder
    runs at the default dtype on this back end (MLX's CPU gather_mm is float32 only) and computes the reference
    model with the quantized weights put in, within the bf16 bounds."""
    src = tiny_checkpoint("ragged")
    out = tmp_path / recipe
    report = quantize(src, out, recipe)
    assert sorted(s.name for s in report.skipped) == [f"model.layers.{i}.mlp.experts.down_proj.weight" for i in range(3)]
    ids = fixture_ids(seed=2, length=20, batch=3)
    want = fixtures.reference_logits(dequantized_reference(out, fixtures.load_reference(src)), ids).numpy()
    got = load_model(out)(mx.array(ids))
    fixtures.assert_bf16_close(np.array(got), want, f"{recipe}, down_proj kept")
    code, stdout, err = run_zaya("generate", "-m", out, "-p", "hello", "-n", "3", "--temp", "0")
    assert code in (0, None) and "3 tokens" in err, err


def test_shards_and_index(quant_src, tmp_path):
    out = tmp_path / "out"
    report = quantize(quant_src, out, "mxfp4", max_shard_size=60_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n == report.shards > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == report.bytes
    from safetensors import safe_open

    for f in files:
        arrays = mx.load(str(out / f))
        assert {k for k, v in index["weight_map"].items() if v == f} == set(arrays)
        with safe_open(str(out / f), framework="numpy") as st:  # the reference reader agrees
            assert st.metadata() == {"format": "mlx"}
            for k in st.keys():
                if arrays[k].dtype != mx.bfloat16:
                    assert np.array_equal(st.get_tensor(k), np.array(arrays[k])), k
    ids = mx.array([[7, 8, 9, 10]])
    quantize(quant_src, tmp_path / "single", "mxfp4")
    assert mx.array_equal(load_model(out)(ids), load_model(tmp_path / "single")(ids)).item()


# --- safety -------------------------------------------------------------------------------------------------------


def test_refuses_to_overwrite_and_force_replaces(quant_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ZayaError, match="already exists.*--force"):
        quantize(quant_src, out)
    assert (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(ZayaError, match="does not look like a model folder"):
        quantize(quant_src, out, "mxfp4", force=True)
    assert (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    out.rmdir()
    quantize(quant_src, out, "affine8")
    quantize(quant_src, out, "mxfp4", force=True)
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == "mxfp4"
    assert leftovers(tmp_path, "out") == []
    with pytest.raises(ZayaError, match="already quantized"):
        quantize(out, tmp_path / "again")
    with pytest.raises(ZayaError, match="source folder"):
        quantize(quant_src, quant_src, force=True)


def tree(folder) -> dict:
    """Every path under `folder` with its bytes (None for a folder): what a refused --force must leave alone."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", ["parent-of-source", "source-itself", "cwd", "home", "root", "user-files",
                                  "subfolder", "a-file"])
def test_force_never_deletes_what_it_did_not_write(case, tiny_checkpoint, tmp_path, monkeypatch):
    """`zaya quantize parent/src parent --force` deleted parent and the source in it. --force refuses, in one line
    naming the folder, OUT that holds the source, the current folder or the home folder, a filesystem root, or
    anything that does not look like a model folder zaya wrote; nothing is touched."""
    parent = tmp_path / "parent"
    src = parent / "src"
    shutil.copytree(tiny_checkpoint("base"), src)
    (parent / "notes.txt").write_text("mine")
    out = {"parent-of-source": parent, "source-itself": src, "root": Path("/")}.get(case, tmp_path / "target")
    if case in ("cwd", "home", "user-files", "subfolder"):
        shutil.copytree(src, out)  # a model folder, but ...
        if case == "cwd":
            monkeypatch.chdir(out / ".")
        elif case == "home":
            monkeypatch.setenv("HOME", str(out))
        elif case == "user-files":
            (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        else:
            (out / "runs").mkdir()
    elif case == "a-file":
        out.write_text("not a folder")
    before = tree(tmp_path)
    with pytest.raises(ZayaError) as info:
        quantize(src, out, "mxfp4", force=True)
    message = str(info.value)
    assert "\n" not in message and str(out) in message and "--force would delete" in message, message
    assert tree(tmp_path) == before


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_nothing(quant_src, tmp_path, monkeypatch, error, existing):
    """Ctrl-C or an I/O error mid-run: the temporary folder is gone and an existing OUT is as it was; an OSError
    (a full disk) is a one-line error that says nothing was written."""
    out = tmp_path / "out"
    if existing:
        quantize(quant_src, out, "affine8")
    before = tree(tmp_path)
    calls = {"n": 0}
    add = q._ShardWriter.add

    def failing_add(self, name, a):
        calls["n"] += 1
        if calls["n"] == 20:  # mid-run: after a shard was started and tensors written
            raise error(errno.ENOSPC, "No space left on device", str(self.folder)) if error is OSError else error()
        return add(self, name, a)

    monkeypatch.setattr(q._ShardWriter, "add", failing_add)
    with pytest.raises(ZayaError if error is OSError else error) as info:
        quantize(quant_src, out, "mxfp4", force=True, max_shard_size=20_000)
    assert calls["n"] == 20
    if error is OSError:
        assert "No space left on device" in str(info.value) and "nothing was written" in str(info.value)
        assert "\n" not in str(info.value)
    assert tree(tmp_path) == before


def test_sigterm_cleans_up_as_ctrl_c_does(quant_src, tmp_path, monkeypatch):
    """SIGTERM mid-run exits with 143 through the same cleanup as Ctrl-C: no temporary folder, no OUT."""
    import signal

    out = tmp_path / "out"
    calls = {"n": 0}
    add = q._ShardWriter.add

    def add_then_terminate(self, name, a):
        calls["n"] += 1
        if calls["n"] == 5:
            assert len(leftovers(tmp_path, "out")) == 1
            os.kill(os.getpid(), signal.SIGTERM)
        return add(self, name, a)

    def outside_the_run(signum, frame):  # what SIGTERM does here unless quantize handles it (not: end pytest)
        raise AssertionError("SIGTERM reached the handler outside quantize")

    monkeypatch.setattr(q._ShardWriter, "add", add_then_terminate)
    previous = signal.signal(signal.SIGTERM, outside_the_run)
    try:
        with pytest.raises(SystemExit) as info:
            quantize(quant_src, out, "mxfp4")
        assert signal.getsignal(signal.SIGTERM) is outside_the_run  # quantize's handler is there for the run only
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.code == 128 + signal.SIGTERM and calls["n"] == 5
    assert leftovers(tmp_path, "out") == [] and not out.exists()


def test_next_run_removes_what_a_killed_run_left(quant_src, tmp_path):
    """SIGKILL cannot be caught: the killed run's temporary folders (named after its process, now gone) are removed
    by the next run into the same OUT; a live process's folder, and other names, are kept."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = [tmp_path / f".out.zaya-{kind}-{dead.pid}-0a1b2c3d" for kind in ("tmp", "old")]
    for folder in killed:
        folder.mkdir()
        (folder / "model-00001-of-00001.safetensors").write_bytes(b"half")
    kept = [tmp_path / f".out.zaya-tmp-{os.getpid()}-0a1b2c3d", tmp_path / f".other.zaya-tmp-{dead.pid}-0a1b2c3d",
            tmp_path / ".out.mine"]
    for folder in kept:
        folder.mkdir()
    quantize(quant_src, tmp_path / "out", "mxfp4")
    assert not any(f.exists() for f in killed) and all(f.exists() for f in kept)
    assert (tmp_path / "out" / "config.json").exists()


def test_output_has_the_usual_modes(quant_src, tmp_path):
    """The folder and its files get the modes the umask gives (the temporary folder's 0700 does not leak)."""
    old = os.umask(0o022)
    try:
        quantize(quant_src, tmp_path / "out", "mxfp4")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "out").iterdir()} == {0o644}


def test_non_finite_source_tensor_is_refused(tiny_checkpoint, tmp_path):
    """An all-NaN tensor was quantized and reported as 'rel err 0.0000': it is refused by name, nothing written."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("base"), src)
    name, shard = "model.layers.1.mlp.experts.gate_up_proj", src / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    if name not in tensors:
        shard = src / "model-00002-of-00002.safetensors"
        tensors = load_file(str(shard))
    tensors[name].fill_(float("nan"))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ZayaError, match=f"{name} has NaN or infinite values"):
        quantize(src, tmp_path / "out", "mxfp4")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_bad_source_is_one_line_error(tmp_path):
    for src in (tmp_path / "missing", tmp_path):
        with pytest.raises(ZayaError) as e:
            quantize(src, tmp_path / "out")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_progress_reaches_the_callback_in_source_bytes(quant_src, tmp_path):
    """The library draws nothing: it tells a callback what it is writing and how many of the source's bytes are
    done, from 0 to the size of its shards on disk, never going back."""
    calls = []
    quantize(quant_src, tmp_path / "out", "mxfp4", progress=lambda what, done, total: calls.append((what, done, total)))
    total = sum(f.stat().st_size for f in Path(quant_src).glob("*.safetensors"))
    assert calls[0] == ("quantizing", 0, total) and calls[-1] == ("writing", total, total)
    done = [d for _, d, _ in calls]
    assert done == sorted(done) and all(t == total for _, _, t in calls)
    assert any(what.startswith("model.layers.1.") for what, _, _ in calls[1:-1])
