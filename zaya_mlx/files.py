"""Files of a model folder read only inside it, and files written so that a reader never sees half of one (a
temporary file beside the target, then a rename)."""

import os
from contextlib import contextmanager
from pathlib import Path

from .errors import ZayaError


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on any failure it is removed. The folder
    must exist: a mistyped folder is an error, not a new folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text: str) -> None:
    """Write `text` to `path` whole or not at all; a path the system refuses (a folder, no permission, a full disk)
    is a ZayaError that names it."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        reason = "its folder does not exist" if not Path(path).parent.is_dir() else e.strerror or e
        raise ZayaError(f"cannot write {path}: {reason}") from None


def model_file(folder: Path, name) -> Path:
    """`folder / name` for a file the folder names (config, index, shard): a relative path that resolves, links
    followed, to a regular file inside the folder (or inside the hub repo cache a snapshot folder links into)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ZayaError(f"{folder} names the file {name!r}, which is not a path inside the folder")
    path = folder / name
    real, root = path.resolve(), folder.resolve()
    if root.parent.name == "snapshots":  # hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
        root = root.parent.parent
    if not real.is_relative_to(root):
        raise ZayaError(f"{path} resolves to {real}, outside the model folder")
    if real.exists() and not real.is_file():
        raise ZayaError(f"{path} is not a regular file")
    return path
