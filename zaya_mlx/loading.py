"""Find a checkpoint (a local folder or a hub repo id), check it, and read it lazily into the model.

Every problem with the files is a one-line `ZayaError` naming the file or tensor, raised before any weight is
read where possible: the files a folder names must be regular files inside it (a hub snapshot's links into its
repo's blob store included), safetensors headers are validated by the `safetensors` library itself, then names,
dtypes and shapes are checked against the model; values are checked for NaN and infinity as they stream in.
"""

import json
import re
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
from .files import model_file
from .model import Model

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
DTYPES = {"bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float16": mx.float16, "fp16": mx.float16,
          "float32": mx.float32, "fp32": mx.float32}
KEEP_FP32 = ("balancing_biases",)
# safetensors' dtype names -> MLX dtypes, for the ones a checkpoint of this model may hold.
SAFETENSORS_DTYPES = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32, "U32": mx.uint32, "U8": mx.uint8}


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
    """A JSON object from a file of the model folder."""
    path = model_file(path.parent, path.name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZayaError(f"missing {path.name} in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ZayaError(f"{path} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise ZayaError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def read_safetensors_header(path: Path) -> dict:
    """Tensor name -> (shape, dtype), as the `safetensors` library reads the header: it checks the JSON, the
    dtypes, that each tensor's bytes match its shape, and that the offsets tile the data exactly (no overlaps, no
    gaps, nothing missing: a truncated file fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ZayaError(f"{path} is not a valid safetensors file ({_one_line(e)})") from None


def _one_line(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        """(canonical name, array), shard by shard; floats cast to `dtype` except what stays fp32. Each array is
        evaluated as it comes (one source shard resident at most) and refused if it holds NaN or infinity."""

        def shards():
            for shard in self.shards:
                try:
                    yield mx.load(str(shard))
                except Exception as e:
                    raise ZayaError(f"cannot read {shard}: {_one_line(e)}") from None

        for name, array in layouts.iter_canonical(self.mapping, shards()):
            if name.endswith(KEEP_FP32):
                array = array.astype(mx.float32)
            elif dtype is not None and mx.issubdtype(array.dtype, mx.floating) and not name.endswith((".scales", ".biases")):
                array = array.astype(dtype)
            if mx.issubdtype(array.dtype, mx.floating):
                finite = mx.isfinite(array).all()
                mx.eval(array, finite)
                if not finite.item():
                    kind = f" (as {array.dtype})" if dtype is not None else ""
                    raise ZayaError(f"tensor {', '.join(self.mapping[name].names)} has NaN or infinite values{kind}")
            yield name, array


def open_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """Read and check everything but the weights' values: config, index, headers, names, dtypes and shapes."""
    path = Path(path)
    raw = read_json(path / "config.json")
    config = ZayaConfig.from_dict(raw)
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ZayaError(f"{index} has no weight_map of tensor names to file names")
        shards = [model_file(path, f) for f in dict.fromkeys(weight_map.values())]
    else:
        weight_map = None
        shards = [model_file(path, f.name) for f in sorted(path.glob("model*.safetensors"))]
    if not shards:
        raise ZayaError(f"no model*.safetensors weights in {path}")
    tensors = {}
    for shard in shards:
        if not shard.exists():
            raise ZayaError(f"missing weight file {shard.name} named in {index.name}")
        for name, info in read_safetensors_header(shard).items():
            if weight_map is not None and weight_map.get(name) != shard.name:
                raise ZayaError(f"tensor {name} is in {shard.name} but the index says {weight_map.get(name)}")
            if name in tensors:
                raise ZayaError(f"tensor {name} is in more than one weight file ({shard.name} is the second)")
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
    check_against_model(mapping, tensors, empty_model(config, quantization, mapping))
    return Checkpoint(path, raw, config, layout, shards, tensors, mapping, quantization)


def check_against_model(mapping: dict, tensors: dict, model: nn.Module) -> None:
    """Every tensor has the dtype kind and (once fused or stacked) the shape the model's parameter has, and every
    parameter has a tensor; computed from the headers alone (the combines run on unevaluated zeros)."""
    expected = dict(tree_flatten(model.parameters()))
    for name, src in mapping.items():
        want = expected.get(name)
        if want is None:
            raise ZayaError(f"unexpected tensor {', '.join(src.names)}")
        floating = mx.issubdtype(want.dtype, mx.floating)
        for s in src.names:
            have = SAFETENSORS_DTYPES.get(tensors[s][1])
            if have is None or not (mx.issubdtype(have, mx.floating) if floating else have == want.dtype):
                need = "a float16, bfloat16 or float32" if floating else f"a {want.dtype}"
                raise ZayaError(f"tensor {s} has dtype {tensors[s][1]}, expected {need} tensor")
        try:
            shape = tuple(src.combine([mx.zeros(tensors[s][0], dtype=mx.float32) for s in src.names]).shape)
        except ValueError as e:
            raise ZayaError(f"tensors {', '.join(src.names)} do not fit together ({_one_line(e)})") from None
        if shape != tuple(want.shape):
            raise ZayaError(f"tensor {', '.join(src.names)} has shape {shape} (as {name}), expected {tuple(want.shape)}")
    missing = [n for n in expected if n not in mapping]
    if missing:
        raise ZayaError(f"missing tensor {missing[0]}")


def empty_model(config: ZayaConfig, quantization: Optional[dict], names) -> Model:
    """The model with unevaluated parameters, quantized as `quantization` (canonical paths) and the names say."""
    model = Model(config)
    if quantization:
        apply_quantization(model, quantization, names)
    return model


def apply_quantization(model: nn.Module, quantization: dict, names) -> None:
    """mlx-lm's convention: a per-module entry (parameters or False) wins, else the global setting where scales exist."""
    names = set(names)

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in names

    try:
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    mode=quantization.get("mode", "affine"), class_predicate=predicate)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ZayaError(f"config.json has an unusable quantization block ({type(e).__name__}: {_one_line(e)})") from None


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
    model = empty_model(checkpoint.config, checkpoint.quantization, checkpoint.mapping)
    if decode is not None:
        model.decode_options = decode
    model.load_weights(list(checkpoint.iter_tensors(dtype)))
    if decode is not None:
        model.decode_options = decode
    model.eval()
    return model
