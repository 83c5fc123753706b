"""A damaged or unsupported checkpoint is a one-line ZayaError that names what is wrong (tensor, file, setting).

Each test copies a session fixture folder, damages one thing, and loads it.
"""

import json
import shutil
import socket

import pytest
from safetensors.torch import load_file, save_file

import zaya_mlx


@pytest.fixture
def copy_checkpoint(tiny_checkpoint, tmp_path):
    """Factory (layout, shards) -> a private copy of the base fixture that a test may damage."""

    def get(layout="transformers", shards=None):
        dst = tmp_path / f"{layout}-{shards}"
        shutil.copytree(tiny_checkpoint("base", layout, "float32", shards=shards), dst)
        return dst

    return get


def load_error(folder) -> str:
    """The message of the ZayaError that loading `folder` raises; it must be one line."""
    with pytest.raises(zaya_mlx.ZayaError) as info:
        zaya_mlx.load_model(str(folder), dtype="float32")
    message = str(info.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


def shard_of(folder, name):
    """The file that holds tensor `name` (index or single file)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"][name]
    return "model.safetensors"


def edit_tensors(folder, edit, shard, index_too=True):
    """Rewrite one shard through `edit(tensors) -> tensors`, keeping the index's weight_map in step if asked."""
    tensors = edit(load_file(str(folder / shard)))
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index_too and index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != shard}
        data["weight_map"].update({k: shard for k in tensors})
        index.write_text(json.dumps(data))


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "layout, name, also",
    [
        ("transformers", "model.layers.1.post_attention_layernorm.weight", None),
        ("transformers", "model.layers.2.mlp.gate.balancing_biases", None),
        ("legacy", "model.layers.3.input_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("legacy", "model.res_scale.residual_bias", "model.layers.2.post_mlp_residual_scale.residual_bias"),
    ],
)
def test_missing_tensor(layout, name, also, copy_checkpoint):
    """A tensor absent from files and index: the message names it (the file's name or its canonical name)."""
    folder = copy_checkpoint(layout)
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != name}, shard_of(folder, name))
    message = load_error(folder)
    assert name in message or (also and also in message), message


def test_tensor_in_index_but_not_in_its_shard(copy_checkpoint):
    """The index promises a tensor its shard does not hold: the message names the tensor."""
    folder = copy_checkpoint()
    name = "model.layers.0.self_attn.qk_norm.temp"
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != name}, shard_of(folder, name), index_too=False)
    assert name in load_error(folder)


@pytest.mark.parametrize("layout", ["transformers", "legacy"])
def test_unexpected_tensor(layout, copy_checkpoint):
    """An extra tensor the layout does not know: the message names it."""
    folder = copy_checkpoint(layout)
    name = "model.layers.0.mlp.gate.extra_scale"
    shard = shard_of(folder, "model.embed_tokens.weight")
    edit_tensors(folder, lambda t: {**t, name: t["model.embed_tokens.weight"][0].clone()}, shard)
    assert name in load_error(folder)


@pytest.mark.parametrize(
    "layout, name, shape",
    [
        ("transformers", "model.layers.0.self_attn.o_proj.weight", (64, 63)),
        ("transformers", "model.layers.1.self_attn.qkv_proj.q_proj.weight", (65, 64)),
        ("transformers", "model.layers.2.mlp.experts.down_proj", (4, 32, 64)),
        ("legacy", "model.layers.3.zaya_block.experts.local_experts.2.linear_fc2.weight", (64, 31)),
        ("legacy", "model.layers.2.self_attn.qkv.conv_qk.1.weight", (96, 16, 3)),
    ],
)
def test_wrong_shape(layout, name, shape, copy_checkpoint):
    """A tensor of the wrong shape (also one that is fused or stacked on load): the message names it."""
    import torch

    folder = copy_checkpoint(layout)
    edit_tensors(folder, lambda t: {**t, name: torch.randn(*shape)}, shard_of(folder, name))
    assert name in load_error(folder)


@pytest.mark.parametrize("keep", [4, 0.5])
def test_truncated_shard(keep, copy_checkpoint):
    """A shard cut short (inside the header, or inside the data): the message names the file."""
    folder = copy_checkpoint()
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    assert shard.name in load_error(folder)


def test_truncated_single_file_legacy(copy_checkpoint):
    """The same for a single-file legacy checkpoint."""
    folder = copy_checkpoint("legacy")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert "model.safetensors" in load_error(folder)


def test_missing_shard(copy_checkpoint):
    """A shard the index names is not there: the message names the file."""
    folder = copy_checkpoint()
    (folder / "model-00001-of-00002.safetensors").unlink()
    assert "model-00001-of-00002.safetensors" in load_error(folder)


def test_corrupt_index(copy_checkpoint):
    """An index that is not JSON: the message names the index file."""
    folder = copy_checkpoint()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"model.embed')
    assert "model.safetensors.index.json" in load_error(folder)


def test_missing_config(copy_checkpoint):
    """No config.json: the message names it."""
    folder = copy_checkpoint()
    (folder / "config.json").unlink()
    assert "config.json" in load_error(folder)


@pytest.mark.parametrize(
    "layout, changes, setting",
    [
        ("transformers", {"num_experts_per_tok": 2}, ("num_experts_per_tok",)),
        ("transformers", {"num_key_value_heads": 3}, ("num_key_value_heads", "num_attention_heads")),
        ("legacy", {"moe_router_topk": 2}, ("moe_router_topk",)),
        ("legacy", {"num_query_groups": 3}, ("num_query_groups", "cca_num_q_heads")),
    ],
)
def test_unsupported_config(layout, changes, setting, copy_checkpoint):
    """Settings the port does not support: the message names the setting (before any shape check)."""
    folder = copy_checkpoint(layout)
    edit_config(folder, **changes)
    message = load_error(folder)
    assert any(s in message for s in setting), message


@pytest.fixture
def no_network(monkeypatch):
    """Offline hub and a socket that records any connection attempt instead of making it."""
    import huggingface_hub.constants

    attempts = []

    def connect(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.mark.parametrize("where", ["{tmp}/no/such/zaya-folder", "zaya-test-no-such-org/no-such-zaya-model"])
def test_nonexistent_model(where, no_network, tmp_path):
    """Neither a folder nor a cached hub repo: a ZayaError naming it, without touching the network."""
    where = where.format(tmp=tmp_path)
    with pytest.raises(zaya_mlx.ZayaError) as info:
        zaya_mlx.load_model(where)
    assert where in str(info.value) and "\n" not in str(info.value)
    assert no_network == [], f"tried to connect to {no_network}"


# --- files the folder names: inside it, regular ------------------------------------------------------------------


def with_alarm(seconds, fn, *args):
    """fn(*args), failing the test instead of hanging when it blocks (a FIFO opened for reading does)."""
    import signal

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def point_index(folder, shard, target):
    """Make the index name `target` where it named `shard`."""
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (target if v == shard else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("target", ["../outside/{shard}", "{outside}/{shard}", "sub/../../outside/{shard}"])
def test_index_naming_a_file_outside_the_folder(target, copy_checkpoint, tmp_path):
    """A valid shard outside the folder, named by a relative or absolute path: refused, not read."""
    folder = copy_checkpoint()
    shard = "model-00002-of-00002.safetensors"
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(folder / shard, outside / shard)
    point_index(folder, shard, target.format(outside=outside, shard=shard))
    message = load_error(folder)
    assert shard in message and ("outside the model folder" in message or "not a path inside" in message), message


@pytest.mark.parametrize("index", [True, False])
def test_shard_linking_outside_the_folder(index, copy_checkpoint, tmp_path):
    """A shard that is a symbolic link to a file outside the folder: refused."""
    folder = copy_checkpoint(shards=None if index else 1)
    shard = "model-00002-of-00002.safetensors" if index else "model.safetensors"
    (tmp_path / "elsewhere").mkdir()
    shutil.move(folder / shard, tmp_path / "elsewhere" / shard)
    (folder / shard).symlink_to(tmp_path / "elsewhere" / shard)
    assert "outside the model folder" in load_error(folder)


def test_hub_snapshot_links_into_its_blobs_load(tiny_checkpoint, tmp_path):
    """The hub cache's layout (snapshots/<rev>/<file> linking to ../../blobs/<hash>) is inside the model."""
    repo = tmp_path / "models--zyphra--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(tiny_checkpoint("base").iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    zaya_mlx.load_model(str(snapshot), dtype="float32")


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_shard_that_is_not_a_regular_file(kind, copy_checkpoint):
    """A FIFO (whose read would block forever) or a folder in place of a shard: refused at once."""
    import os

    folder = copy_checkpoint()
    shard = folder / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()
    message = with_alarm(20, load_error, folder)
    assert shard.name in message and "not a regular file" in message, message


def test_config_that_is_a_fifo(copy_checkpoint):
    import os

    folder = copy_checkpoint()
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    assert "not a regular file" in with_alarm(20, load_error, folder)


# --- configs that are not what they claim --------------------------------------------------------------------------

DELETE = object()  # a change that removes the key


@pytest.mark.parametrize(
    "layout, changes, setting",
    [
        ("transformers", {"vocab_size": -1}, "vocab_size"),
        ("transformers", {"head_dim": 0}, "head_dim"),
        ("transformers", {"hidden_size": "64"}, "hidden_size"),
        ("transformers", {"num_key_value_heads": 0}, "num_key_value_heads"),
        ("transformers", {"num_attention_heads": None}, "num_attention_heads"),
        ("transformers", {"num_hidden_layers": 2.5}, "num_hidden_layers"),
        ("transformers", {"max_position_embeddings": -5}, "max_position_embeddings"),
        ("transformers", {"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ("transformers", {"cca_time0": 0}, "cca_time0"),
        ("transformers", {"layer_types": 3}, "layer_types"),
        ("transformers", {"sliding_window": -4, "layer_types": ["hybrid_sliding"] * 3}, "sliding_window"),
        ("transformers", {"rope_parameters": ["hybrid"]}, "rope_parameters"),
        ("transformers", {"rope_parameters": {"hybrid": {"partial_rotary_factor": 0.1}}}, "partial_rotary_factor"),
        ("transformers", {"rope_parameters": {"hybrid": {"rope_theta": 0}}}, "rope_theta"),
        ("transformers", {"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ("transformers", {"eos_token_id": "<eos>"}, "eos_token_id"),
        ("transformers", {"quantization": {"bits": 4}}, "quantization"),
        ("legacy", {"ffn_hidden_size": DELETE}, "ffn_hidden_size"),
        ("legacy", {"ffn_hidden_size": 63}, "ffn_hidden_size"),
        ("legacy", {"num_hidden_layers": "6"}, "num_hidden_layers"),
        ("legacy", {"cca_num_q_heads": 0}, "cca_num_q_heads"),
        ("legacy", {"kv_channels": DELETE, "num_attention_heads": DELETE}, "kv_channels"),
    ],
)
def test_invalid_config_values(layout, changes, setting, copy_checkpoint):
    """Values of the wrong kind or range: one line naming the setting (not a ZeroDivisionError, KeyError, ...)."""
    folder = copy_checkpoint(layout)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not DELETE}
    (folder / "config.json").write_text(json.dumps(config))
    assert setting in load_error(folder)


@pytest.mark.parametrize("file, content", [("config.json", [1, 2]), ("model.safetensors.index.json", [1]),
                                           ("model.safetensors.index.json", {"weight_map": ["a"]})])
def test_json_files_of_the_wrong_shape(file, content, copy_checkpoint):
    folder = copy_checkpoint()
    (folder / file).write_text(json.dumps(content))
    assert file in load_error(folder)


# --- safetensors headers, dtypes and values ------------------------------------------------------------------------


def rewrite_header(path, edit):
    """Replace a safetensors file's header by `edit(header)` (any JSON), keeping its data bytes."""
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(edit(json.loads(raw[8 : 8 + n]))).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])


def overlap(header):
    """The last tensor's offsets moved onto the first's bytes: the data no longer tiles the file."""
    names = [k for k in header if k != "__metadata__"]
    first, last = header[names[0]], header[names[-1]]
    if first["dtype"] == last["dtype"] and first["shape"] == last["shape"]:
        last["data_offsets"] = list(first["data_offsets"])
    else:
        last["data_offsets"] = [0, last["data_offsets"][1] - last["data_offsets"][0]]
    return header


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: list(h),
        lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "data_offsets"} if k != "__metadata__" else v)
                   for k, v in h.items()},
        overlap,
        lambda h: {**h, "__metadata__": {"format": 1}},
    ],
    ids=["list", "no-offsets", "overlap", "metadata-not-strings"],
)
def test_bad_safetensors_header(edit, copy_checkpoint):
    """Headers the safetensors library rejects are rejected here too, naming the file."""
    folder = copy_checkpoint()
    shard = folder / "model-00002-of-00002.safetensors"
    rewrite_header(shard, edit)
    assert shard.name in load_error(folder)


@pytest.mark.parametrize("name, dtype", [("model.norm.weight", "int32"), ("model.layers.0.self_attn.o_proj.weight", "int8"),
                                         ("model.embed_tokens.weight", "float64")])
def test_tensor_of_a_dtype_the_model_cannot_use(name, dtype, copy_checkpoint):
    """An integer norm weight (it would load and fail only at generation), or a float64 tensor: refused by name."""
    import torch

    folder = copy_checkpoint()
    edit_tensors(folder, lambda t: {**t, name: t[name].to(getattr(torch, dtype))}, shard_of(folder, name))
    message = load_error(folder)
    assert name in message and "dtype" in message, message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["model.layers.1.mlp.experts.down_proj", "model.norm.weight"])
def test_non_finite_weights(name, value, copy_checkpoint):
    """One NaN or infinity in a tensor (the model would emit token 0 forever): refused, naming the tensor."""
    folder = copy_checkpoint()

    def poison(t):
        t[name].view(-1)[3] = value
        return t

    edit_tensors(folder, poison, shard_of(folder, name))
    message = load_error(folder)
    assert name in message and "NaN or infinite" in message, message


def test_a_tensor_in_two_shards(copy_checkpoint):
    """Without an index, two files holding the same tensor: refused (which copy would win is arbitrary)."""
    folder = copy_checkpoint()
    name = "model.norm.weight"
    holder = shard_of(folder, name)
    other = next(f for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors") if f != holder)
    (folder / "model.safetensors.index.json").unlink()
    value = load_file(str(folder / holder))[name]
    edit_tensors(folder, lambda t: {**t, name: value}, other)
    assert name in load_error(folder)


@pytest.mark.parametrize("file, kind", [("tokenizer.json", "link-out"), ("chat_template.jinja", "fifo"),
                                        ("tokenizer_config.json", "folder")])
def test_tokenizer_files_are_read_only_inside_the_folder(file, kind, copy_checkpoint, tmp_path):
    """The tokenizer's files follow the weights' rule: a link out of the folder, or a FIFO that would hang the
    load, is one line naming the file."""
    import os

    folder = copy_checkpoint()
    path = folder / file
    if kind == "link-out":
        (tmp_path / "elsewhere").mkdir()
        shutil.move(path, tmp_path / "elsewhere" / file)
        path.symlink_to(tmp_path / "elsewhere" / file)
    else:
        path.unlink()
        os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(zaya_mlx.ZayaError) as info:
        with_alarm(20, zaya_mlx.load, str(folder))
    assert file in str(info.value) and "\n" not in str(info.value)
