"""The model a command runs when none is given, and the quantized copies zaya-mlx keeps in the cache.

Without `--model`, a command runs `Zyphra/ZAYA1-8B`. Where the machine's memory budget (the one the RSA memory
plan uses: `rsa.default_memory_budget`) holds its bf16 weights plus a `FIRST_RUN_CONTEXT`-token conversation
(KV cache and working memory, from `rsa.plan_memory`), that is the hub's checkpoint as it is. Otherwise it is an
MXFP4 copy, made once: the shards are downloaded one at a time (`hf_hub_download`), each is quantized as it
arrives with the recipe `zaya quantize` uses, written, and deleted, so memory and scratch disk stay near one
shard. The copy lives in the cache beside the hub's (`<hub cache>/../zaya-mlx/`); a copy interrupted halfway
resumes at the first shard it had not finished. `zaya models` lists both caches and removes what we wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .config import DEFAULT_MODEL, ZayaConfig
from .errors import ZayaError
from .sizes import format_bytes, kv_bytes_per_token

FIRST_RUN_CONTEXT = 32_768  # tokens a first conversation has room for, whichever weights
COPY_RECIPE = "mxfp4"
SMALL_FILES = ["*.json", "*.jinja", "tokenizer.model", "*.txt"]  # all a checkpoint holds but its weights
MARKER = "zaya-mlx.json"  # in every folder we write: only those are ever removed


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def default_cache() -> Path:
    """`zaya-mlx/` beside the Hugging Face hub cache (`HF_HOME` and `HF_HUB_CACHE` move both)."""
    return hub_cache().parent / "zaya-mlx"


def copy_folder(cache: Path, repo: str, recipe: str = COPY_RECIPE) -> Path:
    return Path(cache) / f"{repo.replace('/', '--')}--{recipe}"


# --- which weights fit ----------------------------------------------------------------------------------------------


@dataclass
class FirstRunPlan:
    """Which weights a machine runs without `--model`, and why. Bytes: weights plus a `context`-token conversation."""

    format: str  # "bf16" or the copy's recipe
    context: int
    bf16_bytes: int
    copy_bytes: int
    budget_bytes: int
    budget_source: str

    def room(self) -> str:
        return (f"bf16 weights with a {self.context:,}-token context need {format_bytes(self.bf16_bytes)}; this "
                f"machine's budget is {format_bytes(self.budget_bytes)} ({self.budget_source})")

    def summary(self) -> str:
        if self.format == "bf16":
            return f"{self.room()}: running bf16"
        return (f"{self.room()}: running an {self.format.upper()} copy ({format_bytes(self.copy_bytes)} with the same "
                f"context)")


def memory_needed(config: ZayaConfig, recipe: Optional[str], context: int) -> int:
    """Weights (bf16, or as `recipe` quantizes them) plus one sequence of `context` tokens, as the memory plan
    counts it (KV cache, conv state, one layer's working copy, activations)."""
    from .quantization import planned_weight_bytes

    return _conversation_bytes(config, *planned_weight_bytes(config, recipe), context)


def _conversation_bytes(config: ZayaConfig, weights: int, layer: int, context: int) -> int:
    from .rsa import RSAParams, plan_memory

    plan = plan_memory(config, RSAParams(rsa_n=1, rsa_t=0, max_tokens=context), prompt_tokens=0, aggregate_tokens=0,
                       weights_bytes=weights, layer_bytes=layer, budget_bytes=1 << 62)
    return plan.peak_bytes


def plan_first_run(config: ZayaConfig, budget_bytes: int, budget_source: str = "given", recipe: str = COPY_RECIPE,
                   weights: Optional[dict] = None) -> FirstRunPlan:
    """bf16 where its weights plus a `FIRST_RUN_CONTEXT`-token conversation fit the budget, else `recipe`; a
    one-line error where neither fits. `weights`: {"bf16" and recipe: (weight bytes, largest layer's bytes)}, when
    already computed."""
    from .quantization import planned_weight_bytes

    weights = weights or {"bf16": planned_weight_bytes(config), recipe: planned_weight_bytes(config, recipe)}
    context = min(FIRST_RUN_CONTEXT, config.max_position_embeddings)
    bf16, copy = (_conversation_bytes(config, *weights[f], context) for f in ("bf16", recipe))
    plan = FirstRunPlan("bf16" if bf16 <= budget_bytes else recipe, context, bf16, copy, int(budget_bytes),
                        budget_source)
    if copy > budget_bytes:
        raise ZayaError(f"{plan.room()}, and even {recipe.upper()} needs {format_bytes(copy)}: pass a smaller "
                        f"quantized model with --model")
    return plan


# --- which model for which Mac ----------------------------------------------------------------------------------------

MAC_SIZES = (16, 24, 36, 64, 128)  # GB of unified memory
TABLE_PROMPT_TOKENS = 512  # an RSA problem
TABLE_FRAMING_TOKENS = 1024  # an aggregation prompt's text besides its tails


def mac_working_set(memory_gb: int) -> int:
    """Metal's recommended working set on a Mac of `memory_gb` GB, as macOS sets it by default: 2/3 of the memory
    up to 36 GB, 3/4 above (on the machine itself zaya reads the real figure from MLX)."""
    return int((memory_gb << 30) * (2 / 3 if memory_gb <= 36 else 3 / 4))


def largest_context(config: ZayaConfig, weights: int, layer: int, budget: int, step: int = 1024) -> int:
    """The longest conversation (a multiple of `step` tokens, at most the model's context) that fits the budget."""
    low, high = 0, config.max_position_embeddings // step
    while low < high:
        mid = (low + high + 1) // 2
        if _conversation_bytes(config, weights, layer, mid * step) <= budget:
            low = mid
        else:
            high = mid - 1
    return low * step


def largest_rsa_population(config: ZayaConfig, weights: int, layer: int, budget: int, preset: str = "laptop",
                           most: int = 256) -> int:
    """The largest N of an RSA `preset` run whose rollouts all decode at once within the budget (0: none fits)."""
    from .rsa import PRESETS, plan_memory
    from .rsa.engine import BOUNDARY_TOKENS

    def fits(n: int) -> bool:
        p = PRESETS[preset].params.replace(rsa_n=n)
        boundary = BOUNDARY_TOKENS if p.tail_unit == "words" else 0
        aggregate = TABLE_PROMPT_TOKENS + TABLE_FRAMING_TOKENS + p.candidates * (p.tail_token_bound + boundary)
        try:
            plan = plan_memory(config, p, prompt_tokens=TABLE_PROMPT_TOKENS, aggregate_tokens=aggregate,
                               weights_bytes=weights, layer_bytes=layer, budget_bytes=budget)
        except ZayaError:
            return False
        return plan.slots == n

    n = 0
    while n < most and fits(n + 1):
        n += 1
    return n


def mac_table(config: Optional[ZayaConfig] = None, sizes=MAC_SIZES, recipe: str = COPY_RECIPE) -> str:
    """README's "which model for which Mac", computed from the memory plan the commands use."""
    from .quantization import planned_weight_bytes
    from .rsa.memory import METAL_BUDGET_SHARE

    config = config or ZayaConfig()
    weights = {"bf16": planned_weight_bytes(config), recipe: planned_weight_bytes(config, recipe)}
    kv = kv_bytes_per_token(config) * 1024
    lines = ["| Mac | budget | model | weights | KV per 1K tokens | longest context | RSA N at once (laptop preset) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for gb in sizes:
        budget = int(mac_working_set(gb) * METAL_BUDGET_SHARE)
        chosen = plan_first_run(config, budget, recipe=recipe, weights=weights).format
        for fmt in ("bf16", recipe):
            w, layer = weights[fmt]
            context = largest_context(config, w, layer, budget)
            if not context:
                continue
            mark = " (first run)" if fmt == chosen else ""
            lines.append(f"| {gb} GB | {budget / 1e9:.1f} GB | {fmt}{mark} | {w / 1e9:.2f} GB | {kv / 1e6:.1f} MB | "
                         f"{context:,} | {largest_rsa_population(config, w, layer, budget)} |")
    return "\n".join(lines)


# --- the default model ----------------------------------------------------------------------------------------------


def default_model(repo: str = DEFAULT_MODEL, *, budget: Optional[tuple] = None, cache: Optional[Path] = None,
                  log: Callable[[str], None] = lambda line: None,
                  progress: Optional[Callable[[str, int, int, str], None]] = None) -> Path:
    """The folder a command runs when no model is given: our copy of `repo` if one was made, else the hub's
    checkpoint where bf16 fits `budget` (`(bytes, source)`, default `rsa.default_memory_budget()`), else a copy
    made now. `log` gets one line a step; `progress(stage, done, total, what)` the download and quantization."""
    from .loading import read_json, resolve_model_path

    cache = Path(cache) if cache is not None else default_cache()
    dest = copy_folder(cache, repo)
    if (dest / MARKER).is_file():
        return dest
    small = _small_files(repo)
    config = ZayaConfig.from_dict(read_json(small / "config.json"))
    if budget is None:
        from .rsa import default_memory_budget

        budget = default_memory_budget()
    plan = plan_first_run(config, *budget)
    log(plan.summary())
    if plan.format == "bf16":
        return resolve_model_path(repo)
    return make_copy(repo, small, dest, plan.format, log=log, progress=progress)


def _small_files(repo: str) -> Path:
    """The checkpoint's config, index and tokenizer files (not its weights): from the hub cache, else downloaded."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, allow_patterns=SMALL_FILES, local_files_only=True))
        if (folder / "config.json").is_file():
            return folder
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=SMALL_FILES))
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ZayaError(f"cannot get {repo} ({reason[:160]}): with no network and no local copy, download it where "
                        f"there is network (`hf download {repo}`) and pass the folder with --model") from None


# --- making a copy shard by shard -----------------------------------------------------------------------------------


def make_copy(repo: str, small: Path, dest: Path, recipe: str = COPY_RECIPE, *,
              log: Callable[[str], None] = lambda line: None,
              progress: Optional[Callable[[str, int, int, str], None]] = None) -> Path:
    """Quantize `repo` into the MLX folder `dest`, downloading and quantizing one shard at a time.

    `small` holds the checkpoint's small files. Work happens in `dest.partial/`: a part file per source shard
    (the canonical tensors whose last source is in it) written whole or not at all, so a rerun skips the parts
    done. The finished folder is checked, then renamed into place."""
    import mlx.core as mx

    from . import layouts
    from .loading import KEEP_FP32, open_checkpoint, read_json, read_safetensors_header
    from .quantization import Format, TensorQuantizer, copy_side_files, write_config

    progress = progress or (lambda stage, done, total, what: None)
    raw = read_json(small / "config.json")
    if "quantization" in raw or "quantization_config" in raw:
        raise ZayaError(f"{repo} is already quantized: run it with --model {repo}")
    config = ZayaConfig.from_dict(raw)
    index = small / "model.safetensors.index.json"
    if not index.is_file():
        raise ZayaError(f"{repo} has no model.safetensors.index.json: download it whole and pass it with --model")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ZayaError(f"{index} has no weight_map")
    shards = list(dict.fromkeys(weight_map.values()))
    if any(Path(s).name != s or not s.endswith(".safetensors") for s in shards):
        raise ZayaError(f"{index} names a weight file outside the checkpoint or not safetensors")
    shard_of = {name: shards.index(f) for name, f in weight_map.items()
                if not (config.tie_word_embeddings and name == "lm_head.weight")}
    layout = layouts.detect_layout(shard_of)
    mapping = layouts.name_map(layout, config, shard_of)
    layouts.check_names(mapping, shard_of)

    # part k: the canonical tensors whose last source is in shard k, and every shard those read
    parts = [[] for _ in shards]
    for canonical, src in mapping.items():
        parts[max(shard_of[s] for s in src.names)].append(canonical)
    needs = [sorted({shard_of[s] for c in part for s in mapping[c].names}) for part in parts]
    last_use = {i: max(k for k, need in enumerate(needs) if i in need) for need in needs for i in need}
    total = int(read_json(index).get("metadata", {}).get("total_size") or 0)

    work = dest.with_name(dest.name + ".partial")
    _check_disk(work, config, recipe, total // len(shards))
    work.mkdir(parents=True, exist_ok=True)
    _take_lock(work)
    _write_json(work / MARKER, {"source": repo, "recipe": recipe, "layout": layout, "complete": False})
    downloads = work / "download"
    quantizer = TensorQuantizer(config, recipe)
    done_bytes = fetched = 0  # source bytes quantized; bytes downloaded (or quantized in an earlier run)
    resumed = sum((work / f"part-{k + 1:05d}.json").is_file() for k in range(len(shards)))
    log(f"making an {recipe.upper()} copy of {repo} in {dest}: {len(shards)} shards"
        + (f" ({format_bytes(total)})" if total else "") + ", each downloaded, quantized and deleted in turn"
        + (f"; resuming after {resumed} done" if resumed else ""))
    for k, part in enumerate(parts):
        record = work / f"part-{k + 1:05d}.json"
        if record.is_file():
            done = json.loads(record.read_text())
            quantizer.chosen.update({m: Format(f["mode"], f["bits"], f["group_size"]) if f else None
                                     for m, f in done["chosen"].items()})
            done_bytes += done["source_bytes"]
            fetched += done["source_bytes"]
            progress("quantize", done_bytes, total, f"shard {k + 1} (done before)")
            continue
        loaded = {}
        for i in needs[k]:
            path = downloads / shards[i]
            if not path.is_file():
                log(f"downloading {shards[i]} ({i + 1} of {len(shards)})")
                path = _download(repo, shards[i], downloads,
                                 lambda got, what: progress("download", fetched + got, total, what))
                fetched += path.stat().st_size
            loaded[i] = mx.load(str(path))
        out, before, part_bytes = {}, dict(quantizer.chosen), 0
        for canonical in part:
            src = mapping[canonical]
            w = src.combine([loaded[shard_of[s]].pop(s) for s in src.names])  # each source serves one tensor
            if canonical.endswith(KEEP_FP32):
                w = w.astype(mx.float32)
            for name, a in quantizer(canonical, w).tensors:
                mx.eval(a)
                out[name] = a
            part_bytes += w.nbytes
            progress("quantize", done_bytes + part_bytes, total, canonical)
        if out:
            tmp = work / f".part-{k + 1:05d}.tmp.safetensors"
            mx.save_safetensors(str(tmp), out, metadata={"format": "mlx"})
            os.replace(tmp, work / f"part-{k + 1:05d}.safetensors")
        chosen = {m: (f.to_config() if f else None) for m, f in quantizer.chosen.items() if m not in before}
        _write_json(record, {"chosen": chosen, "source_bytes": part_bytes})
        done_bytes += part_bytes
        del out, loaded
        for i in needs[k]:
            if last_use[i] == k and (downloads / shards[i]).is_file():
                (downloads / shards[i]).unlink()

    staging = work / "copy"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    files = [work / f"part-{k + 1:05d}.safetensors" for k, part in enumerate(parts) if part]
    names = [f"model-{j + 1:05d}-of-{len(files):05d}.safetensors" for j in range(len(files))]
    weight_map = {}
    for f, name in zip(files, names):
        os.link(f, staging / name)
        weight_map.update({t: name for t in read_safetensors_header(f)})
    _write_json(staging / "model.safetensors.index.json", {"metadata": {"total_size": sum(f.stat().st_size for f in files)},
                                                           "weight_map": dict(sorted(weight_map.items()))})
    write_config(staging, config, quantizer.quantization_block())
    copy_side_files(small, staging)
    _write_json(staging / MARKER, {"source": repo, "recipe": recipe, "layout": layout, "complete": True})
    open_checkpoint(staging)  # names, shapes and headers check out before it is used
    if dest.exists():
        raise ZayaError(f"{dest} appeared while the copy was being made: remove one of them (zaya models --remove)")
    os.rename(staging, dest)
    shutil.rmtree(work)
    log(f"the {recipe.upper()} copy is ready in {dest}; it is used from now on")
    return dest


def _check_disk(work: Path, config: ZayaConfig, recipe: str, shard_bytes: int) -> None:
    """Room for what is left of the copy, a shard being fetched and the part it makes, before anything is fetched."""
    from .quantization import planned_weight_bytes

    work.parent.mkdir(parents=True, exist_ok=True)
    done = sum(f.stat().st_size for f in work.glob("part-*.safetensors")) if work.is_dir() else 0
    need = max(planned_weight_bytes(config, recipe)[0] - done, 0) + 2 * shard_bytes
    free = shutil.disk_usage(work.parent).free
    if free < need:
        raise ZayaError(f"the {recipe.upper()} copy needs about {format_bytes(need)} free in {work.parent} and "
                        f"{format_bytes(free)} are: free some space, or pass a model with --model")


def _take_lock(work: Path) -> None:
    """One process makes a copy at a time: `work/lock` holds its pid; the lock of a process that is gone (an
    interrupted run) is taken over. The lock goes with the work folder when the copy is done."""
    from .quantization import process_alive

    lock = work / "lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                other = int(lock.read_text())
            except (OSError, ValueError):
                other = 0
            if other and process_alive(other) and other != os.getpid():
                raise ZayaError(f"another zaya (process {other}) is making this copy in {work}: wait for it to "
                                f"finish") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return
    raise ZayaError(f"cannot take {lock}: another zaya is starting the same copy; run again")


def _download(repo: str, filename: str, folder: Path, report: Callable[[int, str], None]) -> Path:
    """One file into `folder` (an interrupted download resumes), its bytes so far going to `report`."""
    import inspect

    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import tqdm

    class Report(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.got = kwargs.get("initial") or 0
            report(self.got, filename)

        def update(self, n=1):
            self.got += n or 0
            report(self.got, filename)

    bar = {"tqdm_class": Report} if "tqdm_class" in inspect.signature(hf_hub_download).parameters else {}
    try:
        return Path(hf_hub_download(repo, filename, local_dir=folder, **bar))
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ZayaError(f"cannot download {filename} of {repo} ({reason[:160]}): run again to resume") from None


def _write_json(path: Path, data: dict) -> None:
    from .files import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# --- zaya models ----------------------------------------------------------------------------------------------------


@dataclass
class CachedModel:
    id: str
    format: str
    size: int  # bytes on disk
    path: Path
    ours: bool  # written by zaya-mlx (only these can be removed here)


def list_models(cache: Optional[Path] = None, hub: Optional[Path] = None) -> list:
    """ZAYA checkpoints in the hub cache, and the copies (finished or partial) we made."""
    cache = Path(cache) if cache is not None else default_cache()
    out = []
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir(hub if hub is not None else hub_cache()).repos
    except Exception:  # no hub cache yet
        repos = ()
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        snapshot = max(repo.revisions, key=lambda r: r.last_modified).snapshot_path
        raw = _config(snapshot)
        if raw.get("model_type") == "zaya":
            shards = set(_config(snapshot, "model.safetensors.index.json").get("weight_map", {}).values())
            weights = all((snapshot / f).is_file() for f in shards) if shards else (snapshot / "model.safetensors").is_file()
            fmt = describe_format(raw) + ("" if weights else " (config and tokenizer only)")
            out.append(CachedModel(repo.repo_id, fmt, repo.size_on_disk, snapshot, False))
    if cache.is_dir():
        for folder in sorted(cache.iterdir()):
            marker = _config(folder, MARKER)
            if not marker:
                continue
            name = f"{marker.get('source')}@{marker.get('recipe')}"
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            fmt = describe_format(_config(folder)) if marker.get("complete") else "partial: resumes on the next run"
            out.append(CachedModel(name if marker.get("complete") else name + ".partial", fmt, size, folder, True))
    return out


def remove_model(model_id: str, cache: Optional[Path] = None, hub: Optional[Path] = None) -> CachedModel:
    """Delete a copy we made (by its id in `list_models`); the hub's downloads are the hub's to remove."""
    for entry in list_models(cache, hub):
        if entry.id == model_id:
            if not entry.ours:
                raise ZayaError(f"{model_id} is the hub's download, not ours: remove it with `hf cache delete`")
            shutil.rmtree(entry.path)
            return entry
    raise ZayaError(f"no cached model {model_id!r}: `zaya models` lists them")


def describe_format(raw: dict) -> str:
    """`bf16`, or the quantization: `mxfp4`, `affine 4-bit (+2 modules otherwise)`."""
    q = raw.get("quantization")
    if not q:
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(raw.get("dtype") or raw.get("torch_dtype"),
                                                                               "bf16")
    mode = q.get("mode", "affine")
    text = mode if mode != "affine" else f"affine {q.get('bits')}-bit"
    others = sum(isinstance(v, dict) for v in q.values())
    return text + (f" (+{others} module{'s' if others > 1 else ''} otherwise)" if others else "")


def _config(folder: Path, name: str = "config.json") -> dict:
    try:
        return json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return {}
