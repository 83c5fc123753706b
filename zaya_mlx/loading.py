"""Find a checkpoint (a local folder or a hub repo id), check it, and read it lazily into the model.

Every problem with the files is a one-line `ZayaError` naming the file or tensor, raised before any weight is
read where possible: headers are checked first (a truncated shard is caught by its declared sizes).
"""

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import layouts
from .config import DEFAULT_MODEL, ZayaConfig
from .decode import DecodeOptions
from .errors import ZayaError
from .model import Model

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
DTYPES = {"bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float16": mx.float16, "fp16": mx.float16,
          "float32": mx.float32, "fp32": mx.float32}
KEEP_FP32 = ("balancing_biases",)


def resolve_model_path(path_or_repo: Union[str, Path]) -> Path:
    """A local folder as is; a hub id from the local cache, else downloaded (only the files a model needs)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ZayaError(f"{path} is not a model folder")
        return path
    repo = str(path_or_repo)
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
        raise ZayaError(f"no model folder at {repo}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ZayaError(
            f"cannot get {repo} ({reason[:160]}): with no network and no local copy, download it where there is "
            f"network (`hf download {repo}`) and pass the folder as the model"
        ) from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ZayaError(f"missing {path.name} in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZayaError(f"{path} is not valid JSON ({e})") from None


def read_safetensors_header(path: Path) -> dict:
    """Tensor name -> (shape, dtype), checking that the file holds all the bytes its header declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ZayaError(f"{path} is truncated (no safetensors header)")
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            raise ZayaError(f"{path} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ZayaError(f"{path} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ZayaError(f"{path} is truncated: {8 + n + end} bytes declared, {size} present")
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


@dataclass
class Checkpoint:
    """A checked checkpoint folder: config, layout, shards and the map to canonical names."""

    path: Path
    raw_config: dict
    config: ZayaConfig
    layout: str
    shards: list
    tensors: dict  # source name -> (shape, dtype)
    mapping: dict  # canonical name -> layouts.Source
    quantization: Optional[dict]  # config's quantization block, per-module entries under canonical paths

    def iter_tensors(self, dtype: Optional[mx.Dtype] = None) -> Iterator[tuple]:
        """(canonical name, lazy array), shard by shard; floats cast to `dtype` except what stays fp32."""

        def shards():
            for shard in self.shards:
                try:
                    yield mx.load(str(shard))
                except Exception as e:
                    raise ZayaError(f"cannot read {shard}: {e}") from None

        for name, array in layouts.iter_canonical(self.mapping, shards()):
            if name.endswith(KEEP_FP32):
                array = array.astype(mx.float32)
            elif dtype is not None and mx.issubdtype(array.dtype, mx.floating) and not name.endswith((".scales", ".biases")):
                array = array.astype(dtype)
            yield name, array


def open_checkpoint(path: Union[str, Path]) -> Checkpoint:
    path = Path(path)
    raw = read_json(path / "config.json")
    config = ZayaConfig.from_dict(raw)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ZayaError(f"{index} has no weight_map")
        shards = [path / f for f in dict.fromkeys(weight_map.values())]
    else:
        weight_map = None
        shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        raise ZayaError(f"no model*.safetensors weights in {path}")
    tensors = {}
    for shard in shards:
        if not shard.exists():
            raise ZayaError(f"missing weight file {shard.name} named in {index.name}")
        for name, info in read_safetensors_header(shard).items():
            if weight_map is not None and weight_map.get(name) != shard.name:
                raise ZayaError(f"tensor {name} is in {shard.name} but the index says {weight_map.get(name)}")
            tensors[name] = info
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise ZayaError(f"tensor {absent[0]} is in the index but not in {weight_map[absent[0]]}")
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    layout = layouts.detect_layout(tensors)
    mapping = layouts.name_map(layout, config, tensors)
    layouts.check_names(mapping, tensors)
    quantization = layouts.canonical_quantization(mapping, config.quantization, tensors)
    return Checkpoint(path, raw, config, layout, shards, tensors, mapping, quantization)


def apply_quantization(model: nn.Module, quantization: dict, names) -> None:
    """mlx-lm's convention: a per-module entry (parameters or False) wins, else the global setting where scales exist."""
    names = set(names)

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in names

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def to_dtype(dtype) -> mx.Dtype:
    if dtype is None:
        return mx.bfloat16
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ZayaError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def load_model(path_or_repo: Union[str, Path] = DEFAULT_MODEL, dtype=None, decode: Optional[DecodeOptions] = None) -> Model:
    """Load ZAYA1 from a folder or hub id in any supported layout; bf16 unless `dtype` says otherwise.
    decode: the model's `DecodeOptions` (default: the fused decode step on a GPU, once checked)."""
    dtype = to_dtype(dtype)
    checkpoint = open_checkpoint(resolve_model_path(path_or_repo))
    model = Model(checkpoint.config, decode)
    if checkpoint.quantization:
        apply_quantization(model, checkpoint.quantization, checkpoint.mapping)
    expected = dict(tree_flatten(model.parameters()))
    weights = dict(checkpoint.iter_tensors(dtype))
    for name, array in weights.items():
        if name not in expected:
            raise ZayaError(f"unexpected tensor {name}")
        if tuple(array.shape) != tuple(expected[name].shape):
            sources = ", ".join(checkpoint.mapping[name].names)
            raise ZayaError(f"tensor {sources} has shape {tuple(array.shape)} (as {name}), expected {tuple(expected[name].shape)}")
    missing = [n for n in expected if n not in weights]
    if missing:
        raise ZayaError(f"missing tensor {missing[0]}")
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    model.eval()
    return model
