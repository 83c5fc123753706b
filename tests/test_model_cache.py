"""The first run without `--model`: bf16 where it fits, else an MXFP4 copy made once, shard by shard, resumable.

The hub is a local stand-in: `snapshot_download` and `hf_hub_download` serve a tiny bf16 checkpoint in three
shards from a folder, laid out as the hub cache lays out a snapshot, and count what is downloaded. The copy must
hold exactly what `zaya quantize` writes from the same checkpoint.
"""

import fnmatch
import json
import shutil
from collections import Counter
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import pytest

from fixtures import make_reference, reference_state_dict
from zaya_mlx import ZayaError, load_model, quantize
from zaya_mlx import model_cache as mc
from zaya_mlx.config import DEFAULT_MODEL, ZayaConfig
from zaya_mlx.quantization import planned_weight_bytes

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """`snapshot_download` / `hf_hub_download` over a folder; `fail_on` interrupts one file's download."""

    def __init__(self, source: Path, cache: Path):
        self.source, self.cache = source, cache
        self.snapshot = cache / f"models--{DEFAULT_MODEL.replace('/', '--')}" / "snapshots" / COMMIT
        self.downloads, self.fail_on = Counter(), None

    def snapshot_download(self, repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        assert repo_id == DEFAULT_MODEL
        self.snapshot.mkdir(parents=True, exist_ok=True)
        (self.snapshot.parent.parent / "refs").mkdir(exist_ok=True)
        (self.snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
        for f in self.source.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns or ["*"]) and not (self.snapshot / f.name).exists():
                if local_files_only:
                    continue
                shutil.copy(f, self.snapshot / f.name)
        return str(self.snapshot)

    def hf_hub_download(self, repo_id, filename, local_dir=None, tqdm_class=None, **kwargs):
        assert repo_id == DEFAULT_MODEL and local_dir is not None
        self.downloads[filename] += 1
        if filename == self.fail_on:
            raise KeyboardInterrupt
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        size = (self.source / filename).stat().st_size
        bar = tqdm_class(total=size, initial=0, desc=filename)  # as the hub reports its chunks
        for _ in range(0, size, 1 << 16):
            bar.update(min(1 << 16, size - bar.got))
        return shutil.copy(self.source / filename, Path(local_dir) / filename)


@pytest.fixture
def hub(tiny_checkpoint, tmp_path, monkeypatch):
    source = tiny_checkpoint("quant", "transformers", "bfloat16", shards=3)  # as the hub holds it: bf16, sharded
    fake = FakeHub(source, tmp_path / "hf" / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake.cache))
    return fake


def tight_budget(source: Path) -> tuple:
    """Between what MXFP4 and bf16 need with the first-run context: bf16 does not fit, the copy does."""
    config = ZayaConfig.from_dict(json.loads((source / "config.json").read_text()))
    context = min(mc.FIRST_RUN_CONTEXT, config.max_position_embeddings)
    bf16, copy = mc.memory_needed(config, None, context), mc.memory_needed(config, "mxfp4", context)
    assert copy < bf16
    return (copy + bf16) // 2, "test limit"


def test_planned_bf16_weights_are_the_parameter_count_in_two_bytes(tiny_checkpoint):
    """The memory rule's weights: every parameter in 2 bytes (the fp32 balancing biases in 4), counted here from the
    reference model's tensors."""
    state = reference_state_dict(make_reference("quant"))
    want = sum(v.numel() * (4 if k.endswith("balancing_biases") else 2) for k, v in state.items())
    config = ZayaConfig.from_dict(json.loads((tiny_checkpoint("quant") / "config.json").read_text()))
    assert planned_weight_bytes(config)[0] == want
    assert planned_weight_bytes(config, "mxfp4")[0] < want * 0.6


def test_bf16_where_it_fits(hub, tmp_path):
    """A budget with room for bf16 runs the hub's checkpoint: no copy, no shard fetched one by one."""
    path = mc.default_model(budget=(1 << 40, "test"), cache=tmp_path / "ours")
    assert path == hub.snapshot and not (tmp_path / "ours").exists() and not hub.downloads


def test_copy_made_once_reused_and_resumed(hub, tmp_path):
    cache = tmp_path / "ours"
    budget = tight_budget(hub.source)
    shards = sorted(json.loads((hub.source / "model.safetensors.index.json").read_text())["weight_map"].values())
    shards = list(dict.fromkeys(shards))
    assert len(shards) == 3

    hub.fail_on = shards[1]  # Ctrl-C while the second shard downloads
    lines = []
    with pytest.raises(KeyboardInterrupt):
        mc.default_model(budget=budget, cache=cache, log=lines.append)
    dest = mc.copy_folder(cache, DEFAULT_MODEL)
    partial = dest.with_name(dest.name + ".partial")
    assert not dest.exists() and (partial / "part-00001.json").is_file()
    listed = {e.id: e for e in mc.list_models(cache)}
    assert listed[f"{DEFAULT_MODEL}@mxfp4.partial"].format.startswith("partial") and listed[DEFAULT_MODEL].ours is False
    assert "MXFP4" in lines[0] and "budget" in lines[0]

    hub.fail_on = None
    seen = []
    path = mc.default_model(budget=budget, cache=cache, log=lines.append,
                            progress=lambda stage, done, total, what: seen.append((stage, done, total)))
    assert path == dest and not partial.exists()
    assert hub.downloads == Counter({shards[0]: 1, shards[1]: 2, shards[2]: 1})  # the first shard not again
    assert seen[-1][0] == "quantize" and seen[-1][1] == seen[-1][2] > 0
    downloaded = [done for stage, done, _ in seen if stage == "download"]
    assert downloaded == sorted(downloaded) and downloaded[-1] > seen[0][1]  # the download's bytes, as they come
    assert "resuming after 1 done" in "\n".join(lines)
    assert not any(dest.rglob("*.tmp*")) and not (dest / "download").exists()

    # the same tensors and config block as `zaya quantize` of the same checkpoint
    want = tmp_path / "quantized"
    quantize(hub.source, want, recipe="mxfp4", progress=False)
    got_t, want_t = _tensors(dest), _tensors(want)
    assert set(got_t) == set(want_t)
    for name in want_t:
        assert mx.array_equal(got_t[name], want_t[name]), name
    config = json.loads((dest / "config.json").read_text())
    assert config["quantization"] == json.loads((want / "config.json").read_text())["quantization"]
    assert (dest / "tokenizer.json").is_file()
    ids = mx.array([[5, 9, 31, 7]])
    assert mx.array_equal(load_model(dest, dtype="float32")(ids), load_model(want, dtype="float32")(ids))

    # reused: nothing fetched, no message
    hub.downloads.clear()
    assert mc.default_model(budget=budget, cache=cache, log=lines.append) == dest and not hub.downloads


def test_models_lists_and_removes_only_ours(hub, tmp_path, run_zaya, monkeypatch):
    """`zaya models`: the hub's download and our copy with format, size and path; `--remove` deletes ours only."""
    from zaya_mlx import rsa

    monkeypatch.setattr(rsa, "default_memory_budget", lambda: tight_budget(hub.source))
    code, out, err = run_zaya("generate", "-p", "hi", "-n", "2", "--temp", "0")
    assert code == 0, err
    assert "running an MXFP4 copy" in err and "the MXFP4 copy is ready" in err
    ours = mc.copy_folder(mc.default_cache(), DEFAULT_MODEL)
    assert ours.parent == hub.cache.parent / "zaya-mlx" and (ours / mc.MARKER).is_file()

    code, out, err = run_zaya("models")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == [DEFAULT_MODEL, f"{DEFAULT_MODEL}@mxfp4"]
    assert rows[0][1:5] == ["bf16", "(config", "and", "tokenizer"]  # the first run fetched no bf16 weights
    assert rows[1][1] == "mxfp4" and rows[1][-1] == str(ours)

    code, out, err = run_zaya("models", "--remove", DEFAULT_MODEL)
    assert code == 1 and "the hub's download" in err and hub.snapshot.is_dir()
    code, out, err = run_zaya("models", "--remove", f"{DEFAULT_MODEL}@mxfp4")
    assert code == 0 and not ours.exists() and hub.snapshot.is_dir()
    code, out, err = run_zaya("models", "--remove", "nothing@here")
    assert code == 1 and err.startswith("error: no cached model")


def test_one_copy_at_a_time(hub, tmp_path):
    """A second process finds the copy in progress and says so; the lock of a process that is gone is taken over."""
    import subprocess
    import sys

    cache = tmp_path / "ours"
    partial = mc.copy_folder(cache, DEFAULT_MODEL).with_name(mc.copy_folder(cache, DEFAULT_MODEL).name + ".partial")
    partial.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (partial / "lock").write_text(str(other.pid))
        with pytest.raises(ZayaError, match=f"another zaya \\(process {other.pid}\\) is making this copy"):
            mc.default_model(budget=tight_budget(hub.source), cache=cache)
        assert not hub.downloads
    finally:
        other.kill()
        other.wait()
    assert mc.default_model(budget=tight_budget(hub.source), cache=cache) == mc.copy_folder(cache, DEFAULT_MODEL)


def test_a_full_disk_is_one_line_error_before_any_fetch(hub, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(mc.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ZayaError, match=r"the MXFP4 copy needs about [0-9.]+ KB free in .* and 1.00 KB are"):
        mc.default_model(budget=tight_budget(hub.source), cache=tmp_path / "ours")
    assert not hub.downloads and not any((tmp_path / "ours").iterdir())


def test_not_even_the_copy_fits_is_one_line_error(hub, tmp_path):
    with pytest.raises(ZayaError, match="even MXFP4 needs"):
        mc.default_model(budget=(1000, "test"), cache=tmp_path / "ours")
    assert not (tmp_path / "ours").exists() and not hub.downloads


def test_readme_mac_table_is_what_the_memory_plan_gives():
    """The README's table is `mac_table()` as it is now; its KV column is the hand count (40 layers x key and value
    x 2 heads x 128 x 2 bytes x 1,024 tokens), its budgets 90% of 2/3 (<= 36 GB) or 3/4 of the memory in GiB, and a
    bigger Mac never fits less."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- zaya models --macs -->\n")[1].split("<!-- end -->")[0].strip()
    assert table == mc.mac_table(), "README.md is stale: paste `zaya models --macs` into it"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert {r[4] for r in rows} == {f"{40 * 2 * 2 * 128 * 2 * 1024 / 1e6:.1f} MB"}
    for gb, share in ((16, 2 / 3), (36, 2 / 3), (64, 3 / 4)):
        assert f"| {gb} GB | {0.9 * share * gb * 2 ** 30 / 1e9:.1f} GB |" in table
    for fmt in ("bf16", "mxfp4"):
        contexts = [int(r[5].replace(",", "")) for r in rows if r[2].startswith(fmt)]
        populations = [int(r[6]) for r in rows if r[2].startswith(fmt)]
        assert contexts == sorted(contexts) and populations == sorted(populations), fmt
    assert [r[0] for r in rows if "first run" in r[2]] == [f"{gb} GB" for gb in mc.MAC_SIZES]


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(mx.load(str(f)))
    return out
