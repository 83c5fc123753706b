"""`zaya quantize`: turn a checkpoint in any layout the loader reads into a quantized MLX folder.

The folder follows mlx-lm's conventions so both `zaya_mlx.load_model` and `mlx_lm.load` read it: canonical MLX
names, `.weight` / `.scales` (/ `.biases` for affine) per quantized module, and a `quantization` block in
config.json with the most common format as the global default, a dict for each module quantized differently, and
`False` for each quantizable module that stays unquantized (the loader passes that block to `nn.quantize` as its
`class_predicate`).

What gets which format is data: a recipe in `quantize/` (installed as `zaya_mlx.recipes`), or any JSON file:

    {"description": "...",
     "default": "keep",                       # format of quantizable modules no rule names
     "dtype": "bfloat16",                     # quantize in this dtype (affine scales/biases are stored in it)
     "rules": [                               # first match wins; matched against module paths
       {"match": "model.layers.*.mlp.gate.*", "format": "keep"},          # glob ...
       {"regex": "model\\.layers\\.\\d+\\.mlp\\.experts\\..*", "layers": ["0:4", "-4:"], "format": "affine8"},
       {"match": "model.layers.*.mlp.experts.*", "format": "mxfp4"}]}

A module path is a canonical tensor name without `.weight` (`model.layers.3.mlp.experts.gate_up_proj`).
`layers` (optional) restricts a rule to decoder layers: ints, or "start:stop" slices with negative indices counted
from the last layer. Formats: "keep", "mxfp4", "nvfp4", "mxfp8", "affine<bits>" or "affine<bits>-g<group>"
(bits 2..8, group 64 unless given), or {"mode": ..., "bits": ..., "group_size": ...}. Only modules the model can
quantize (its Linear, Embedding and SwitchLinear layers) are ever quantized; norms, convolutions, QK temperature,
residual scales and balancing biases are copied bit for bit whatever a rule says.

The run streams: tensors arrive one at a time from the loader (one source shard resident at most), are quantized
in row chunks and appended straight to the output shard on disk, so peak memory stays near one source shard.
Everything goes to a temporary folder beside OUT (`.OUT.zaya-tmp-PID-...`) that is renamed into place at the end;
a failure, Ctrl-C or SIGTERM removes it, and a later run removes one that a killed process (SIGKILL) left. `--force`
replaces only a folder that looks like one `quantize` wrote, never one holding the source, the current folder or a
home folder.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .errors import ZayaError
from .sizes import format_bytes, format_count

__all__ = [
    "Format",
    "Recipe",
    "QuantizeReport",
    "GroupStats",
    "SkippedTensor",
    "available_recipes",
    "load_recipe",
    "quantize",
]

DEFAULT_RECIPE = "mxfp4"
Progress = Callable[[str, int, int], None]  # (what is being done, source bytes done, source bytes in all)
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
_CHUNK_ELEMENTS = 1 << 20  # quantized (and compared) at a time: CPU mxfp4/nvfp4 need ~100 B an element of temporaries

# mode -> (allowed bits, allowed group sizes, bits of one scale, has an affine bias)
_MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), None, True),
    "mxfp4": ((4,), (32,), 8, False),
    "mxfp8": ((8,), (32,), 8, False),
    "nvfp4": ((4,), (16,), 8, False),
}
_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# Files copied from SRC besides the weights and config: tokenizer, chat template, generation defaults.
_COPY_PATTERNS = ("*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl")
_NO_COPY = {"config.json", "model.safetensors.index.json"}


# --- recipes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One quantization format of `mx.quantize`: mode, bits, group size."""

    mode: str
    bits: int
    group_size: int

    @classmethod
    def parse(cls, spec) -> "Format | None":
        """A recipe's format: a shorthand string, "keep" (None) or a {mode, bits, group_size} dict."""
        if spec == "keep":
            return None
        if isinstance(spec, str):
            if spec in ("mxfp4", "mxfp8", "nvfp4"):
                bits, groups, _, _ = _MODES[spec]
                return cls(spec, bits[0], groups[0])
            m = re.fullmatch(r"affine(\d)(?:-g(\d+))?", spec)
            if m:
                return cls("affine", int(m.group(1)), int(m.group(2) or 64)).validated()
            raise ValueError(f"unknown format {spec!r} (keep, mxfp4, nvfp4, mxfp8, affine4, affine8, affine4-g32, ...)")
        if isinstance(spec, dict):
            unknown = set(spec) - {"mode", "bits", "group_size"}
            if unknown or "mode" not in spec:
                raise ValueError(f"a format dict needs mode (and optionally bits, group_size), got {spec}")
            mode = spec["mode"]
            if mode not in _MODES:
                raise ValueError(f"unknown mode {mode!r} (one of {', '.join(_MODES)})")
            bits, groups, _, _ = _MODES[mode]
            default_bits, default_group = (4, 64) if mode == "affine" else (bits[0], groups[0])
            return cls(mode, int(spec.get("bits", default_bits)), int(spec.get("group_size", default_group))).validated()
        raise ValueError(f"a format is a string or a dict, got {spec!r}")

    def validated(self) -> "Format":
        bits, groups, _, _ = _MODES[self.mode]
        if self.bits not in bits or self.group_size not in groups:
            raise ValueError(f"{self.mode} supports bits {bits} and group sizes {groups}, got {self.bits} / {self.group_size}")
        return self

    @property
    def name(self) -> str:
        if self.mode == "affine":
            return f"affine{self.bits} g{self.group_size}"
        return self.mode

    def to_config(self) -> dict:
        """The entry mlx-lm's loader passes to `to_quantized`."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """Stored bits per weight: the packed value plus its share of the group's scale (and bias, for affine).
        `scale_bits` is the bit width of the quantization dtype, which holds affine scales and biases."""
        _, _, fixed_scale_bits, has_bias = _MODES[self.mode]
        per_group = (fixed_scale_bits or scale_bits) + (scale_bits if has_bias else 0)
        return self.bits + per_group / self.group_size


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    source: str
    layers: tuple | None  # raw layer spec; resolved against the layer count when matching
    format: Format | None

    def matches(self, path: str, num_layers: int) -> bool:
        if not self.pattern.fullmatch(path):
            return False
        if self.layers is None:
            return True
        m = _LAYER.search(path)
        return m is not None and int(m.group(1)) in _layer_set(self.layers, num_layers)


def _layer_set(spec: tuple, num_layers: int) -> set[int]:
    out: set[int] = set()
    for item in spec:
        if isinstance(item, int):
            out.add(item % num_layers if item < 0 else item)
        else:
            start, _, stop = item.partition(":")
            out.update(range(num_layers)[slice(int(start) if start else None, int(stop) if stop else None)])
    return out


@dataclass(frozen=True)
class Recipe:
    """Which module gets which format: ordered rules, first match wins, `default` for the rest."""

    name: str
    description: str
    rules: tuple[Rule, ...]
    default: Format | None = None
    dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, data: dict, name: str) -> "Recipe":
        if not isinstance(data, dict):
            raise ValueError("a recipe is a JSON object")
        unknown = set(data) - {"description", "default", "dtype", "rules"}
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}")
        dtype = data.get("dtype", "bfloat16")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        rules = []
        for i, r in enumerate(data.get("rules", [])):
            if not isinstance(r, dict):
                raise ValueError(f"rule {i} is not an object")
            unknown = set(r) - {"match", "regex", "layers", "format", "note"}
            if unknown:
                raise ValueError(f"rule {i}: unknown keys {sorted(unknown)}")
            if ("match" in r) == ("regex" in r):
                raise ValueError(f"rule {i}: give exactly one of match (glob) or regex")
            if "format" not in r:
                raise ValueError(f"rule {i}: no format")
            source = r.get("match") or r["regex"]
            try:
                pattern = re.compile(fnmatch.translate(r["match"]) if "match" in r else r["regex"])
            except re.error as e:
                raise ValueError(f"rule {i}: bad regex {source!r}: {e}") from None
            layers = r.get("layers")
            if layers is not None:
                layers = tuple(layers) if isinstance(layers, list) else (layers,)
                for item in layers:
                    if not (isinstance(item, int) or (isinstance(item, str) and re.fullmatch(r"-?\d*:-?\d*", item))):
                        raise ValueError(f"rule {i}: layers are ints or 'start:stop' slices, got {item!r}")
            try:
                fmt = Format.parse(r["format"])
            except ValueError as e:
                raise ValueError(f"rule {i}: {e}") from None
            rules.append(Rule(pattern, source, layers, fmt))
        default = Format.parse(data.get("default", "keep"))
        return cls(name, data.get("description", ""), tuple(rules), default, dtype)

    def format_for(self, path: str, num_layers: int) -> Format | None:
        """The format of a quantizable module (None: keep as is)."""
        for rule in self.rules:
            if rule.matches(path, num_layers):
                return rule.format
        return self.default


def _recipes_dir():
    try:
        from importlib.resources import files

        return files("zaya_mlx.recipes")
    except ModuleNotFoundError:  # a source checkout that is not installed: recipes live in quantize/
        return Path(__file__).resolve().parent.parent / "quantize"


def available_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.name[: -len(".json")] for p in _recipes_dir().iterdir() if p.name.endswith(".json"))


def load_recipe(recipe: "str | os.PathLike | dict | Recipe") -> Recipe:
    """A built-in recipe by name, a recipe JSON file, a recipe dict, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        name, data = "custom", recipe
    else:
        text = str(recipe)
        builtin = _recipes_dir() / f"{text}.json"
        if "/" not in text and not text.endswith(".json") and builtin.is_file():
            name, raw = text, builtin.read_text()
        elif Path(text).is_file():
            name, raw = Path(text).stem, Path(text).read_text()
        else:
            raise ZayaError(f"unknown recipe {text!r}: use one of {', '.join(available_recipes())} or a recipe JSON file")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ZayaError(f"recipe {text}: not valid JSON ({e})") from None
    try:
        return Recipe.from_dict(data, name)
    except ValueError as e:
        raise ZayaError(f"recipe {name}: {e}") from None


# --- report -------------------------------------------------------------------------------------------------------


@dataclass
class GroupStats:
    """One tensor group (a module path with the layer index as *), accumulated over layers."""

    name: str
    formats: list[str] = field(default_factory=list)  # distinct formats its tensors got, in order
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    err2: float = 0.0
    norm2: float = 0.0
    quantized: bool = False  # at least one tensor quantized

    @property
    def format(self) -> str:
        return " + ".join(self.formats)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0

    @property
    def rel_error(self) -> float | None:
        """||W - deq(q(W))|| / ||W|| over the whole group (None when kept)."""
        if not self.quantized:
            return None
        return math.sqrt(self.err2 / self.norm2) if self.norm2 > 0 else 0.0


@dataclass
class SkippedTensor:
    name: str
    shape: tuple
    format: str
    reason: str


@dataclass
class QuantizeReport:
    """What `quantize` wrote: per group sizes and reconstruction errors, and the tensors left unquantized."""

    out: Path
    recipe: str
    source: str
    layout: str
    groups: list[GroupStats]
    skipped: list[SkippedTensor]
    params: int
    bytes: int
    source_bytes: int
    shards: int
    seconds: float
    quantization: dict = field(repr=False, default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Bits per parameter of the whole folder (all tensors, as mlx-lm's `compute_bits_per_weight`)."""
        return 8 * self.bytes / self.params if self.params else 0.0

    def table(self):
        from rich import box
        from rich.table import Table

        t = Table(title=f"zaya quantize: {self.recipe} -> {self.out}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
        t.add_column("tensor group", overflow="fold", min_width=24)
        t.add_column("format", no_wrap=True)
        for col in ("params", "size", "bits/w", "rel err"):
            t.add_column(col, justify="right", no_wrap=True)
        for g in self.groups:
            err = "-" if g.rel_error is None else f"{g.rel_error:.4f}"
            t.add_row(g.name, g.format, format_count(g.params), format_bytes(g.bytes), f"{g.bits_per_weight:.2f}", err)
        t.add_section()
        t.add_row(f"total ({self.shards} shard{'s' if self.shards > 1 else ''})", "", format_count(self.params),
                  format_bytes(self.bytes), f"{self.bits_per_weight:.2f}", "", style="bold")
        if self.skipped:
            by_group: dict[tuple, int] = {}
            for s in self.skipped:
                key = (_group_name(s.name.removesuffix(".weight")), s.format, s.reason)
                by_group[key] = by_group.get(key, 0) + 1
            t.caption = "left unquantized: " + "; ".join(
                f"{g} x{n} ({fmt}: {why})" for (g, fmt, why), n in by_group.items())
            t.caption_justify = "left"
        return t

    def __rich__(self):
        return self.table()


# --- streaming safetensors writer ---------------------------------------------------------------------------------

_ST_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64", mx.int8: "I8",
    mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
    mx.float64: "F64",
}


def _tensor_bytes(a: mx.array) -> memoryview:
    import numpy as np

    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: same bits as uint16
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.array(a))).cast("B")


class _ShardWriter:
    """Appends tensors to safetensors shards of at most `max_bytes` of data, without holding them in memory.

    Each shard's data goes to a scratch file as tensors arrive; closing a shard writes the header and then the
    data (a file copy). `finish` names the shards model-0000k-of-0000n.safetensors and writes mlx-lm's index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.shards: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total = 0
        self._data = None
        self._header: dict = {}
        self._size = 0

    def add(self, name: str, a: mx.array) -> None:
        if a.dtype not in _ST_DTYPES:
            raise ZayaError(f"cannot write {name}: dtype {a.dtype} has no safetensors type")
        if self._data is not None and self._size + a.nbytes > self.max_bytes:
            self._close()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self.shards) + 1}.data", "wb")
            self._header, self._size = {}, 0
        buf = _tensor_bytes(a)
        assert len(buf) == a.nbytes
        self._data.write(buf)
        self._header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                              "data_offsets": [self._size, self._size + a.nbytes]}
        self._size += a.nbytes
        self.total += a.nbytes
        self.weight_map[name] = len(self.shards)

    def _close(self) -> None:
        data_path = Path(self._data.name)
        self._data.close()
        self._data = None
        header = json.dumps({"__metadata__": {"format": "mlx"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the spec allows trailing spaces; keeps the data 8-byte aligned
        path = self.folder / f".shard-{len(self.shards) + 1}.safetensors"
        with open(path, "wb") as f, open(data_path, "rb") as d:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            shutil.copyfileobj(d, f, 16 << 20)
        data_path.unlink()
        self.shards.append(path)

    def finish(self, total_parameters: int) -> list[str]:
        if self._data is not None:
            self._close()
        n = len(self.shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for path, name in zip(self.shards, names):
            path.rename(self.folder / name)
        index = {
            "metadata": {"total_size": self.total, "total_parameters": total_parameters},
            "weight_map": {k: names[self.weight_map[k]] for k in sorted(self.weight_map)},
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")
        return names

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None


# --- quantizing one tensor ----------------------------------------------------------------------------------------


def _fits(shape: tuple, fmt: Format) -> str | None:
    """Why a weight cannot take `fmt` (None if it can)."""
    if len(shape) < 2:
        return "fewer than 2 dims"
    if shape[-1] % fmt.group_size:
        return f"last dim {shape[-1]} not a multiple of group size {fmt.group_size}"
    return None


def _quantize_tensor(w: mx.array, fmt: Format, dtype) -> tuple[list[mx.array], float, float]:
    """Quantize `w` in row chunks: ([weight, scales(, biases)], squared error, squared norm).

    Rows are independent under every mode (groups run along the last dim), so chunks concatenate exactly. The
    error is measured against the source values, in fp32."""
    shape = w.shape
    rows = w.reshape(-1, shape[-1])
    step = max(1, _CHUNK_ELEMENTS // shape[-1])
    parts: list[list[mx.array]] = []
    err2 = norm2 = 0.0
    for start in range(0, rows.shape[0], step):
        x = rows[start : start + step]
        q = mx.quantize(x.astype(dtype), group_size=fmt.group_size, bits=fmt.bits, mode=fmt.mode)
        deq = mx.dequantize(*q[:2], q[2] if len(q) > 2 else None, group_size=fmt.group_size, bits=fmt.bits,
                            mode=fmt.mode, dtype=mx.float32)
        x32 = x.astype(mx.float32)
        e, n = mx.sum(mx.square(x32 - deq)), mx.sum(mx.square(x32))
        mx.eval(*q, e, n)
        err2 += e.item()
        norm2 += n.item()
        parts.append(list(q))
    out = [p[0] if len(parts) == 1 else mx.concatenate(p, axis=0) for p in zip(*parts)]
    out = [a.reshape(*shape[:-1], a.shape[-1]) for a in out]
    mx.eval(*out)
    return out, err2, norm2


# --- config -------------------------------------------------------------------------------------------------------


def write_config(folder: Path, config, quantization: dict) -> None:
    """The MLX folder's config.json: transformers-style keys whatever the source layout (a legacy 80-layer config
    comes out as the 40-layer one), model_type zaya, the model file that mlx-lm's commands build the model from
    (written into `folder`), and the quantization block under both names mlx-lm writes."""
    from .mlx_lm_registry import write_model_file

    out = config.to_dict()
    for key in ("quantization", "quantization_config"):
        out.pop(key, None)
    out["model_type"] = "zaya"
    out.update(write_model_file(folder))
    if quantization:
        out["quantization"] = out["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(dict(sorted(out.items())), indent=4) + "\n")


def _quantizable_modules(config) -> dict[str, str]:
    """Module path -> class name for every module the model can quantize (it has `to_quantized`)."""
    from .model import Model

    model = Model(config)  # parameters are lazy random inits: nothing is computed or allocated
    return {p: type(m).__name__ for p, m in model.named_modules() if hasattr(m, "to_quantized")}


def planned_weight_bytes(config, recipe=None) -> tuple[int, int]:
    """Bytes of the model's weights in bf16, or as `recipe` quantizes them, and of its largest decoder layer: from
    the shapes alone (the model's parameters stay lazy, nothing is allocated)."""
    from mlx.utils import tree_flatten

    from .model import Model

    rec = load_recipe(recipe) if recipe is not None else None
    model = Model(config)
    quantizable = {p for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    total, layers = 0, {}
    for name, w in tree_flatten(model.parameters()):
        module = name.removesuffix(".weight")
        fmt = rec.format_for(module, config.num_hidden_layers) if rec and module in quantizable else None
        if fmt is not None and _fits(w.shape, fmt) is None:
            size = math.ceil(w.size * fmt.bits_per_weight() / 8)
        else:
            size = w.size * (4 if name.endswith("balancing_biases") else 2)
        total += size
        if m := _LAYER.search(name):
            layers[m.group(1)] = layers.get(m.group(1), 0) + size
    return total, max(layers.values(), default=0)


def _group_name(path: str) -> str:
    """`model.layers.3.mlp.experts.down_proj` -> `mlp.experts.down_proj`; `model.embed_tokens` -> `embed_tokens`."""
    path = path.removeprefix("model.")
    return re.sub(r"^layers\.\d+\.", "", path)


# --- the command --------------------------------------------------------------------------------------------------


def quantize(src, out, recipe="mxfp4", force: bool = False, progress: Optional[Progress] = None,
             max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> QuantizeReport:
    """Quantize checkpoint `src` (hub id or folder, any layout) into the MLX folder `out` following `recipe`.

    `recipe`: a built-in name (see `available_recipes()`), a recipe JSON path, a dict or a `Recipe`. Refuses an
    existing `out` unless `force` (then replaces it atomically). `progress(what, done, total)`: called as the run
    goes, with the tensor being written (then "writing") and the source bytes done of the total.
    `max_shard_size`: bytes of tensor data per output shard. Returns a `QuantizeReport` (rich-printable table)."""
    from .loading import open_checkpoint, resolve_model_path

    t0 = time.perf_counter()
    rec = load_recipe(recipe)
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ZayaError(f"{out} already exists: choose another OUT or pass --force to replace it")
    src_path = resolve_model_path(src)
    if out.exists() or out.is_symlink():
        _check_replaceable(out, Path(src_path))
    ckpt = open_checkpoint(src_path)
    if "quantization" in ckpt.raw_config or "quantization_config" in ckpt.raw_config:
        raise ZayaError(f"{src} is already quantized: quantize the unquantized checkpoint instead")

    _remove_abandoned(out)
    tmp = _own_folder(out, "tmp")
    writer = _ShardWriter(tmp, max_shard_size)
    try:
        with _sigterm_unwinds():
            report = _run(ckpt, src, rec, writer, tmp, progress, t0)
            copy_side_files(Path(src_path), tmp)
            _replace(tmp, out, force)
    except BaseException as e:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only folder: nothing was written
            raise ZayaError(f"cannot write {out}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; "
                            "nothing was written") from None
        raise
    report.out = out
    report.seconds = time.perf_counter() - t0
    return report


# --- where the output goes: never over what we did not write ---------------------------------------------------------

_OWN = re.compile(r"\.(?P<name>.+)\.zaya-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+")


def _own_folder(out: Path, kind: str) -> Path:
    """A new hidden folder beside OUT that names this process (`.OUT.zaya-tmp-PID-XXXX`), so a later run can tell
    an abandoned one (its process gone, e.g. after SIGKILL) from one in use. Made with the usual mode (umask)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = f"{out.parent} is a file" if out.parent.is_file() else e.strerror or e
        raise ZayaError(f"cannot write {out}: {reason}") from None
    while True:
        path = out.parent / f".{out.name}.zaya-{kind}-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise ZayaError(f"cannot write {out}: {e.strerror or e}") from None


def _remove_abandoned(out: Path) -> None:
    """Remove temporary folders of OUT that earlier runs left when they were killed (their process is gone)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.zaya-*-*"):
        match = _OWN.fullmatch(path.name)
        if match and match["name"] == out.name and path.is_dir() and not path.is_symlink() \
                and not process_alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (ours counts): a folder it marked as its own is still in use."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _check_replaceable(out: Path, src: Path) -> None:
    """--force replaces OUT only when it is a model folder of ours, and holds nothing else we must keep."""
    real = out.resolve()
    if real.parent == real:
        raise ZayaError(f"--force would delete {out}, a filesystem root: choose another OUT")
    keep = {"the source folder": src.resolve(), "the current folder": Path.cwd().resolve(),
            "your home folder": Path.home().resolve()}
    for what, path in keep.items():
        if path.is_relative_to(real):
            raise ZayaError(f"--force would delete {out}, which is or holds {what}: choose another OUT")
    why = _not_a_model_folder(out)
    if why:
        raise ZayaError(f"--force would delete {out}, which does not look like a model folder zaya wrote ({why}): "
                        "remove it yourself or choose another OUT")


def _not_a_model_folder(folder: Path) -> str | None:
    """Why `folder` is not what `quantize` writes (config.json of a zaya model, safetensors weights, only files)."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder"
    entries = list(folder.iterdir())
    sub = next((e.name for e in entries if e.is_dir() or not e.is_file()), None)
    if sub:
        return f"it holds {sub}, which is not a plain file"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "no readable config.json"
    if not isinstance(config, dict) or config.get("model_type") != "zaya":
        return "its config.json is not a zaya model's"
    if not any(e.name.endswith(".safetensors") for e in entries):
        return "no safetensors weights"
    return None


@contextlib.contextmanager
def _sigterm_unwinds():
    """While quantizing, SIGTERM exits as Ctrl-C does (SystemExit(143) through the cleanup), not abruptly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_term(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Quantized:
    """What a recipe makes of one canonical tensor: the tensors to write, and for a quantizable module's weight the
    module and the format it got (None: kept), with the squared error and norm of the quantization."""

    tensors: list
    module: str | None = None
    format: Format | None = None
    err2: float = 0.0
    norm2: float = 0.0


class TensorQuantizer:
    """A recipe applied tensor by tensor, in canonical names; remembers each module's format for the config block."""

    def __init__(self, config, recipe):
        self.recipe = load_recipe(recipe)
        self.num_layers = int(config.num_hidden_layers)
        self.quantizable = _quantizable_modules(config)
        self.dtype = _DTYPES[self.recipe.dtype]
        self.chosen: dict[str, Format | None] = {}  # quantizable module -> format it got (None: kept)
        self.skipped: list[SkippedTensor] = []

    def __call__(self, name: str, w: mx.array) -> Quantized:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module not in self.quantizable:
            return Quantized([(name, w)])
        fmt = self.recipe.format_for(module, self.num_layers)
        if fmt is not None and (why := _fits(w.shape, fmt)):
            self.skipped.append(SkippedTensor(name, tuple(w.shape), fmt.name, why))
            fmt = None
        self.chosen[module] = fmt
        if fmt is None:
            return Quantized([(name, w)], module)
        arrays, err2, norm2 = _quantize_tensor(w, fmt, self.dtype)
        return Quantized([(f"{module}.{suffix}", a) for suffix, a in zip(("weight", "scales", "biases"), arrays)],
                         module, fmt, err2, norm2)

    def quantization_block(self) -> dict:
        return _quantization_block(self.chosen)


def _run(ckpt, src, rec: Recipe, writer: _ShardWriter, tmp: Path, progress: Optional[Progress],
         t0: float) -> QuantizeReport:
    quantizer = TensorQuantizer(ckpt.config, rec)
    groups: dict[str, GroupStats] = {}
    other = GroupStats("other: norms, convs, scales...", ["kept"])
    params = 0
    source_bytes = sum(os.path.getsize(s) for s in ckpt.shards)
    done = 0
    tell = progress or (lambda what, done, total: None)

    tell("quantizing", 0, source_bytes)
    for name, w in ckpt.iter_tensors():
        tell(name, done, source_bytes)
        params += w.size
        out = quantizer(name, w)
        if out.module is None:
            g = other
        else:
            key = _group_name(out.module)
            g = groups.setdefault(key, GroupStats(key))
            label = out.format.name if out.format else f"kept {_SHORT.get(w.dtype, _dtype_name(w.dtype))}"
            if label not in g.formats:
                g.formats.append(label)
            g.quantized |= out.format is not None
            g.err2 += out.err2
            g.norm2 += out.norm2
        g.tensors += 1
        g.params += w.size
        for n, a in out.tensors:
            writer.add(n, a)
            g.bytes += a.nbytes
        del out
        done += w.nbytes
        del w
    tell("writing", source_bytes, source_bytes)

    shards = writer.finish(params)
    quantization = quantizer.quantization_block()
    write_config(tmp, ckpt.config, quantization)

    rows = sorted(groups.values(), key=lambda g: (not g.quantized, g.name))
    if other.tensors:
        rows.append(other)
    return QuantizeReport(out=tmp, recipe=rec.name, source=str(src), layout=ckpt.layout, groups=rows,
                          skipped=quantizer.skipped, params=params, bytes=writer.total, source_bytes=source_bytes,
                          shards=len(shards), seconds=time.perf_counter() - t0, quantization=quantization)


_SHORT = {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}


def _dtype_name(d) -> str:
    return str(d).rsplit(".", 1)[-1]


def _quantization_block(chosen: dict[str, Format | None]) -> dict:
    """mlx-lm's `quantization` block: the format covering most modules as the global default, a dict for every
    module quantized otherwise, and False for every quantizable module left as is."""
    counts: dict[Format, int] = {}
    for fmt in chosen.values():
        if fmt is not None:
            counts[fmt] = counts.get(fmt, 0) + 1
    if not counts:
        return {}
    default = max(counts, key=lambda f: counts[f])
    block: dict = default.to_config()
    for module in sorted(chosen):
        fmt = chosen[module]
        if fmt is None:
            block[module] = False
        elif fmt != default:
            block[module] = fmt.to_config()
    return block


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, chat template and generation config, as mlx-lm's `save` keeps them."""
    for pattern in _COPY_PATTERNS:
        for f in src.glob(pattern):
            if f.is_file() and f.name not in _NO_COPY and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temp folder to OUT; with force, swap out an existing OUT (old aside, new in, old gone)."""
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    if not force:
        raise ZayaError(f"{out} already exists: choose another OUT or pass --force to replace it")
    old = _own_folder(out, "old")
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
