"""Property-based fuzzing of the loader and the quantizer on damaged copies of a tiny checkpoint.

Each example damages a fresh copy of the base fixture (transformers layout, two shards and an index) in one to
three ways: config values, index entries, safetensors headers, data bytes, lengths, and files replaced by FIFOs,
folders or links out of the folder. The property, for the loader:

- it loads and computes what transformers' reference computes from the same files, or it raises a one-line
  `ZayaError`; never another exception;
- it never hangs and never opens a file outside the folder: every FIFO (inside the folder or out) has a
  watcher that notices a reader and unblocks it, which fails the example;
- no file changes (folder and outside, bytes and modes).

For the quantizer: a one-line `ZayaError` with nothing written, or a folder that loads; the source unchanged.
Derandomized and bounded (`max_examples`), so a CI run is reproducible and takes well under a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fixtures
from zaya_mlx import ZayaError, load_model, quantize

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
IDS = [[5, 17, 33, 101, 250, 7]]
FUZZ = settings(max_examples=25, deadline=timedelta(seconds=30), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --- what a mutation may write ------------------------------------------------------------------------------------

plausible_ints = st.sampled_from([-5, -1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 63, 64, 96, 128, 384, 1 << 40])
json_values = st.recursive(
    st.none() | st.booleans() | plausible_ints | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
# Names an index may point a tensor at: outside the folder (relative, absolute, through a link), FIFOs, a folder.
HOSTILE_NAMES = ["../outside/canary.safetensors", "{outside}/canary.safetensors", "../outside/fifo", "fifo",
                 "sub/../../outside/canary.safetensors", "subdir", "link-out.safetensors", "missing.safetensors",
                 SHARDS[0], SHARDS[1], "", "."]
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I8", "U8", "U32", "BOOL", "F8_E4M3", "Q4", ""]


def config_edit():
    keys = st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts",
                            "router_hidden_size", "cca_time0", "cca_time1", "rms_norm_eps", "layer_types",
                            "sliding_window", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                            "eos_token_id", "quantization", "model_type", "num_experts_per_tok", "ffn_hidden_size",
                            "zaya_mlp_expansion", "swa_layers"])
    return st.tuples(st.just("config"), keys, st.one_of(st.just("<delete>"), json_values))


def index_edit():
    return st.one_of(
        st.tuples(st.just("index-entry"), st.integers(0, 10_000), st.sampled_from(HOSTILE_NAMES)),
        st.tuples(st.just("index-drop"), st.integers(0, 10_000), st.none()),
        st.tuples(st.just("index-all"), st.none(), json_values))


def header_edit():
    fields = st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
        st.tuples(st.just("shape"), st.lists(plausible_ints, max_size=4)),
        st.tuples(st.just("data_offsets"), st.lists(plausible_ints, max_size=3)),
        st.tuples(st.just("<delete>"), st.sampled_from(["dtype", "shape", "data_offsets"])),
        st.tuples(st.just("<rename>"), st.text(max_size=12)),
        st.tuples(st.just("<drop>"), st.none()),
        st.tuples(st.just("<whole>"), json_values))
    return st.tuples(st.just("header"), st.tuples(st.integers(0, 1), st.integers(0, 10_000)), fields)


def bytes_edit():
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, 1), st.floats(0, 1)),
        st.tuples(st.just("append"), st.integers(0, 1), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("overwrite"), st.integers(0, 1), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=8))),
        st.tuples(st.just("length-prefix"), st.integers(0, 1), st.integers(0, (1 << 64) - 1)))


def file_edit():
    files = st.sampled_from(["config.json", INDEX, SHARDS[0], SHARDS[1]])
    return st.tuples(st.just("file"), files, st.sampled_from(["fifo", "folder", "link-out", "link-fifo-out", "delete"]))


# Each family is fuzzed on its own (so each gets its share of examples), and all of them mixed.
FAMILIES = {"config": config_edit(), "index": index_edit(), "header": header_edit(), "bytes": bytes_edit(),
            "file": file_edit()}
FAMILIES["mixed"] = st.one_of(*FAMILIES.values())


def mutations(family: str):
    return st.lists(FAMILIES[family], min_size=1, max_size=3)


# --- applying one ---------------------------------------------------------------------------------------------------


def read_header(path: Path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def replace_file(path: Path, kind: str, outside: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "link-out":
        path.symlink_to(outside / "canary.safetensors")
    elif kind == "link-fifo-out":
        path.symlink_to(outside / "fifo")


def apply(folder: Path, outside: Path, mutation) -> None:
    """Damage `folder` as `mutation` says; a mutation that no longer applies (its file is gone) does nothing."""
    kind, where, what = mutation
    if kind in ("config", "file"):
        target = folder / ("config.json" if kind == "config" else where)
    else:
        target = folder / (INDEX if kind.startswith("index") else SHARDS[where[0] if kind == "header" else where])
    if kind != "file" and (target.is_symlink() or not target.is_file()):
        return  # a FIFO, a folder or a link by now: reading it here would block or reach outside
    try:
        if kind == "config":
            config = json.loads((folder / "config.json").read_text())
            if isinstance(config, dict):
                config.pop(where, None) if what == "<delete>" else config.__setitem__(where, what)
                (folder / "config.json").write_text(json.dumps(config))
        elif kind.startswith("index"):
            index = json.loads((folder / INDEX).read_text())
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if kind == "index-all":
                index = what
            elif isinstance(weight_map, dict) and weight_map:
                name = sorted(weight_map)[where % len(weight_map)]
                if kind == "index-drop":
                    del weight_map[name]
                else:
                    weight_map[name] = what.format(outside=outside)
            (folder / INDEX).write_text(json.dumps(index))
        elif kind == "header":
            (shard, pick), (field, value) = where, what
            path = folder / SHARDS[shard]
            header, data = read_header(path)
            names = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else []
            if field == "<whole>":
                header = value
            elif names:
                name = names[pick % len(names)]
                if field == "<delete>":
                    header[name].pop(value, None)
                elif field == "<rename>":
                    header[value] = header.pop(name)
                elif field == "<drop>":
                    del header[name]
                else:
                    header[name][field] = value
            write_header(path, header, data)
        elif kind == "file":
            replace_file(folder / where, what, outside)
        else:
            path = folder / SHARDS[where]
            raw = path.read_bytes()
            if kind == "truncate":
                raw = raw[: int(len(raw) * what)]
            elif kind == "append":
                raw += what
            elif kind == "overwrite":
                at = int(len(raw) * what[0])
                raw = raw[:at] + what[1] + raw[at + len(what[1]) :]
            else:
                raw = struct.pack("<Q", what) + raw[8:]
            path.write_bytes(raw)
    except (OSError, ValueError, struct.error, TypeError, AttributeError, KeyError):
        pass  # an earlier mutation left nothing this one applies to (not JSON, not an object, an entry gone)


# --- watching -------------------------------------------------------------------------------------------------------


@contextmanager
def fifo_watch(fifos):
    """Record every FIFO among `fifos` that someone opens for reading, and unblock that reader (write, close)."""
    opened, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            for fifo in fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
                except OSError:
                    continue
                opened.append(str(fifo))
                try:
                    os.write(fd, b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
                except OSError:
                    pass
                os.close(fd)
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join()


def snapshot(*roots: Path) -> dict:
    """Path -> (kind, mode, content hash) of everything under `roots`, without opening FIFOs or following links."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            st_ = p.lstat()
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", st_.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p)] = ("other", st_.st_mode)
    return out


@contextmanager
def damaged_copy(base: Path, muts):
    """(folder, outside, fifos) for a damaged copy of `base`, with canaries outside it: a copy of a real shard and
    a FIFO, which nothing may open."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, outside = tmp / "model", tmp / "outside"
        shutil.copytree(base, folder)
        outside.mkdir()
        shutil.copy(base / SHARDS[1], outside / "canary.safetensors")
        os.mkfifo(outside / "fifo")
        (folder / "subdir").mkdir()
        os.mkfifo(folder / "fifo")
        (folder / "link-out.safetensors").symlink_to(outside / "canary.safetensors")
        for m in muts:
            apply(folder, outside, m)
        fifos = [p for p in tmp.rglob("*") if p.is_fifo()]
        yield folder, outside, fifos


def one_line_error(e: ZayaError) -> None:
    message = str(e)
    assert message and "\n" not in message, f"not one line: {message!r}"


def names_inside(folder: Path) -> None:
    """Every file the index names resolves inside the folder (what a successful load may have read)."""
    index = folder / INDEX
    if index.exists():
        for name in set(json.loads(index.read_text())["weight_map"].values()):
            assert (folder / name).resolve().is_relative_to(folder.resolve()), f"loaded {name}, outside the folder"


def reference_logits(folder: Path):
    """transformers' logits from the same (damaged) files, or None where transformers cannot build the model."""
    try:
        reference = fixtures.load_reference(folder)
    except Exception:  # noqa: BLE001 - the reference's own limits; the loader is what is tested
        return None
    return fixtures.reference_logits(reference, IDS).numpy()


# --- the properties -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    folder = tiny_checkpoint("base")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == list(SHARDS) and (folder / INDEX).exists()
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_loader_loads_and_matches_or_refuses_in_one_line(base, family):
    @FUZZ
    @given(muts=mutations(family))
    def check(muts):
        with damaged_copy(base, muts) as (folder, outside, fifos):
            before = snapshot(folder.parent)
            with fifo_watch(fifos) as opened:
                try:
                    model = load_model(folder, dtype="float32")
                except ZayaError as e:
                    model = None
                    one_line_error(e)
            assert opened == [], f"opened {opened} for reading"
            assert snapshot(folder.parent) == before
            event("refused" if model is None else "loaded")
            if model is None:
                return
            names_inside(folder)
            got = np.array(model(mx.array(IDS)))
            want = reference_logits(folder)
            event("compared with transformers" if want is not None and np.isfinite(want).all() else "not compared")
            if want is not None and np.isfinite(want).all():
                scale = float(np.abs(want).max())
                assert float(np.abs(got - want).max()) <= 1e-4 * max(scale, 1.0), "loaded, but computes another model"

    check()


@pytest.mark.parametrize("family", ["config", "header", "mixed"])
def test_quantizer_writes_a_loadable_folder_or_refuses_in_one_line(base, family):
    @settings(FUZZ, max_examples=8)
    @given(muts=mutations(family))
    def check(muts):
        with damaged_copy(base, muts) as (folder, outside, fifos):
            before = snapshot(folder, outside)
            out = folder.parent / "out"
            with fifo_watch(fifos) as opened:
                try:
                    quantize(folder, out, "mxfp4", progress=False)
                except ZayaError as e:
                    one_line_error(e)
                    assert not out.exists() and not list(folder.parent.glob(".out.*")), "left something behind"
                else:
                    load_model(out)
            assert opened == [], f"opened {opened} for reading"
            assert snapshot(folder, outside) == before

    check()
