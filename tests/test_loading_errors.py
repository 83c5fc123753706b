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
