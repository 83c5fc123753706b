"""A run folder: what an RSA run needs to survive Ctrl-C or a crash and resume where it stopped.

    run.json         the parameters, the seed, the messages, the model's identity, every round's draws
                     (written once, atomically, before the first rollout)
    rates.json       the rates the run measured (tokens/s with its slots), for the next runs' time estimates
    rollouts.jsonl   one line per finished rollout (its tokens, text, candidate, finish reason, the prompt text
                     it was given), appended durably: write, flush, fsync; a torn last line is dropped on read
    result.json      the result, when the run has finished

Every rollout's tokens depend only on its prompt and its own seed, and the draws only on the run's seed, so a
resumed run decodes the rollouts that had not finished and ends exactly as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ZayaError
from ..files import write_text_atomic
from .engine import Rollout, all_draws
from .params import RSAParams

FORMAT = "zaya-rsa-run/1"
RUN, ROLLOUTS, RESULT, RATES = "run.json", "rollouts.jsonl", "result.json", "rates.json"


def clock(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour)."""
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def default_runs_root() -> Path:
    return Path.home() / ".cache" / "zaya-mlx" / "rsa"


def new_run_path(messages: Sequence[dict], root: Optional[Path] = None) -> Path:
    """A fresh folder name under `root`: the time and a short hash of the messages."""
    digest = hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()[:8]
    return (root or default_runs_root()) / f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}"


def model_identity(folder, dtype: Optional[str] = None) -> dict:
    """The model's path and a hash of what decides its outputs: config.json, any weight index, and the weight
    files' names and sizes (not their bytes: hashing gigabytes would take minutes)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.is_file()):
        path = folder / name
        if name == "config.json" or name.endswith(".index.json"):
            h.update(name.encode() + b"\0" + path.read_bytes())
        elif name.endswith(".safetensors"):
            h.update(f"{name}\0{path.stat().st_size}".encode())
    return {"path": str(folder), "hash": h.hexdigest()[:16], "dtype": dtype}


class RunFolder:
    """The run folder the engine journals to (`rsa.run(..., journal=folder)`)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = Path(path), meta
        self._journal = None  # rollouts.jsonl, open and locked while a run appends to it

    def __enter__(self) -> "RunFolder":
        """Hold the folder for one run: a second process that tries to run it is refused."""
        import fcntl

        self.finished()  # a torn last line goes before anything is appended
        handle = open(self.path / ROLLOUTS, "a", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ZayaError(f"the run in {self.path} is being run by another process") from None
        self._journal = handle
        return self

    def __exit__(self, *exc) -> bool:
        if self._journal is not None:
            self._journal.close()  # closing releases the lock
            self._journal = None
        return False

    # --- creating and opening -----------------------------------------------------------------------------------

    @classmethod
    def create(cls, path, *, params: RSAParams, seed: int, messages: Sequence[dict], model: dict) -> "RunFolder":
        """A new run folder; refuses a path that is a file or a folder that already has files."""
        path = Path(path).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ZayaError(f"--run {path}: {'is a file' if not path.is_dir() else 'is not empty'}; give a new "
                            "folder, or --resume it")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ZayaError(f"--run {path}: cannot make the folder: {e.strerror or e}") from None
        meta = {"format": FORMAT, "params": params.to_dict(), "seed": seed, "messages": list(messages),
                "model": model, "draws": {str(r): d for r, d in all_draws(params, seed).items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text_atomic(path / RUN, json.dumps(meta, indent=1) + "\n")
        return cls(path, meta)

    @classmethod
    def open(cls, path) -> "RunFolder":
        path = Path(path).expanduser()
        try:
            meta = json.loads((path / RUN).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ZayaError(f"--resume {path}: no RSA run there ({RUN} is missing)") from None
        except (OSError, ValueError) as e:
            raise ZayaError(f"--resume {path}: {RUN} is unreadable ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ZayaError(f"--resume {path}: {RUN} is not an RSA run of this version ({found!r})")
        wrong = [key for key, kind in (("params", dict), ("seed", int), ("messages", list), ("model", dict),
                                       ("draws", dict)) if not isinstance(meta.get(key), kind) or isinstance(meta[key], bool)]
        if wrong:
            raise ZayaError(f"--resume {path}: {RUN} is damaged ({', '.join(wrong)}: missing or of another type)")
        return cls(path, meta)

    @property
    def params(self) -> RSAParams:
        return RSAParams.from_dict(self.meta["params"])

    @property
    def seed(self) -> int:
        return self.meta["seed"]

    @property
    def messages(self) -> list[dict]:
        return self.meta["messages"]

    @property
    def model(self) -> dict:
        return self.meta["model"]

    def check(self, *, params: Optional[RSAParams] = None, seed: Optional[int] = None,
              messages: Optional[Sequence[dict]] = None, model: Optional[dict] = None) -> None:
        """One-line ZayaError naming the first difference between this run and what is given (None: not given)."""
        where = f"the run in {self.path}"
        if model is not None:
            mine = self.model
            if model["hash"] != mine["hash"]:
                raise ZayaError(f"{where} was made with the model at {mine['path']} (hash {mine['hash']}), not "
                                f"{model['path']} (hash {model['hash']})")
            if model.get("dtype") and model.get("dtype") != mine.get("dtype"):
                raise ZayaError(f"{where} was made with --dtype {mine.get('dtype')}, not {model['dtype']}")
        if params is not None:
            stored = self.params
            for f in dataclasses.fields(RSAParams):
                if getattr(params, f.name) != getattr(stored, f.name):
                    raise ZayaError(f"{where} has {f.name}={getattr(stored, f.name)!r}, not "
                                    f"{getattr(params, f.name)!r}: resume it with its own parameters")
        if seed is not None and seed != self.seed:
            raise ZayaError(f"{where} has seed {self.seed}, not {seed}")
        if messages is not None and list(messages) != self.messages:
            raise ZayaError(f"{where} is for another problem")

    # --- the journal --------------------------------------------------------------------------------------------

    def finished(self) -> list[Rollout]:
        """The finished rollouts on disk, a torn last line dropped (and cut from the file, so appends go on
        cleanly)."""
        path = self.path / ROLLOUTS
        if not path.exists():
            return []
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        params, out = self.params, []
        for number, line in enumerate(data[:end].splitlines(), start=1):
            try:
                rollout = Rollout.from_dict(json.loads(line))
                if rollout.round >= params.rounds or rollout.index >= params.rollouts_in(rollout.round):
                    raise ValueError(f"round {rollout.round} rollout {rollout.index} is not in this run, of "
                                     f"{params.rounds} rounds")
            except (ValueError, TypeError) as e:
                raise ZayaError(f"{path}: line {number} is damaged ({e}); the lines before it are good") from None
            out.append(rollout)
        return out

    def rollout(self, rollout: Rollout) -> None:
        """Append a finished rollout durably (inside `with folder:`)."""
        if self._journal is None:
            raise RuntimeError("RunFolder.rollout outside `with folder:`")
        self._journal.write(json.dumps(dataclasses.asdict(rollout), ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def discard(self) -> None:
        """Remove a folder this process created whose run never finished a rollout (only our own files)."""
        if self.finished():
            return
        for name in (ROLLOUTS, RUN):
            (self.path / name).unlink(missing_ok=True)
        if not any(self.path.iterdir()):
            self.path.rmdir()

    def write_rates(self, *, tokens: int, seconds: float, slots: int, device: str) -> None:
        """What this run measured, for estimates of later runs of the same model on this machine."""
        if tokens <= 0 or seconds <= 0:
            return
        write_text_atomic(self.path / RATES, json.dumps({
            "model_hash": self.model["hash"], "device": device, "slots": slots, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")

    def write_result(self, result) -> None:
        write_text_atomic(self.path / RESULT, json.dumps(dataclasses.asdict(result), indent=1, default=str) + "\n")


def measured_rate(root, model_hash: str, device: str) -> Optional[dict]:
    """The newest rates.json under `root` (one folder a run) of this model on this device, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = []
    for path in root.glob(f"*/{RATES}"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("model_hash") == model_hash and data.get("device") == device and data.get("tokens_per_s", 0) > 0:
            found.append((path.stat().st_mtime, data))
    return max(found, key=lambda x: x[0])[1] if found else None


def estimate_line(plan, rate: Optional[dict], tokens: Optional[int] = None) -> str:
    """The time `tokens` new tokens (default: the plan's worst case, every rollout at its full budget) may take
    at a rate measured before."""
    if rate is None:
        return "time: no rate measured on this machine yet for this model; the view estimates it as the run goes"
    tps = rate["tokens_per_s"]
    tokens = plan.worst_case_tokens if tokens is None else tokens
    return (f"time: at most {clock(tokens / tps)} for {tokens:,} tokens at "
            f"{tps:,.1f} tok/s ({rate['slots']} slots, measured {rate['when'][:10]})")
