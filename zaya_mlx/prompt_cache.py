"""Save a prompt cache (with the token ids it holds and the model it belongs to) to a file, and load it back.

The cache is mlx-lm's own classes (`CacheList(KVCache, ArraysCache)` per layer), so mlx-lm's
`save_prompt_cache`/`load_prompt_cache` round-trip it; this adds the metadata, trims the KV buffers to what
they hold (mlx-lm keeps 256-token steps), checks the file against the model on load, and writes atomically
(a temporary file in the same folder, then a rename), so an interrupted save never leaves a broken file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from mlx_lm.models.cache import ArraysCache, CacheList, KVCache
from mlx_lm.models.cache import load_prompt_cache as _mlx_lm_load
from mlx_lm.models.cache import save_prompt_cache as _mlx_lm_save

from .errors import ZayaError
from .files import atomic_path

FORMAT = "zaya-prompt-cache"
VERSION = "1"


def _compact(cache: list) -> list:
    """Copies of the per-layer caches whose KV buffers hold only the used positions."""

    def compact_one(c):
        if isinstance(c, CacheList):
            return CacheList(*(compact_one(x) for x in c.caches))
        if type(c) is KVCache and c.keys is not None and c.keys.shape[2] > c.offset:
            k = KVCache()
            k.keys = c.keys[..., : c.offset, :]
            k.values = c.values[..., : c.offset, :]
            k.offset = c.offset
            return k
        return c

    return [compact_one(c) for c in cache]


def _held(cache: list) -> int:
    first = cache[0][0] if isinstance(cache[0], CacheList) else cache[0]
    return int(first.offset) if isinstance(first, KVCache) else -1


def save_prompt_cache(path, cache: list, tokens: Sequence[int], *, model_id: Optional[str] = None,
                      metadata: Optional[dict] = None, extra: Optional[list] = None) -> Path:
    """Write `cache` (a B=1 model cache holding exactly `tokens`) to `path` (.safetensors added if missing).

    `extra`: more state to keep with it, a list of lists of arrays (or None), e.g. a chat session's snapshots.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    tokens = [int(t) for t in tokens]
    held = _held(cache)
    if held >= 0 and held != len(tokens):
        raise ZayaError(f"the cache holds {held} tokens but {len(tokens)} token ids were given")
    extra = list(extra or [])
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, version=VERSION, model_id=model_id or "", tokens=json.dumps(tokens),
                num_layers=str(len(cache)), num_extra=str(len(extra)))
    states = []
    for arrays in extra:
        state = ArraysCache(len(arrays))
        state.cache = list(arrays)
        states.append(state)
    with atomic_path(path) as tmp:
        _mlx_lm_save(str(tmp), _compact(cache) + states, meta)
    return path


def load_prompt_cache(path, model=None) -> tuple[list, list[int], dict]:
    """`(cache, tokens, metadata)` from a file written by `save_prompt_cache`.

    metadata holds the strings saved (model_id, ...), and under "extra" the `extra` array lists, if any.
    With `model`, checks that the cache fits it (layers, KV heads and head size) and raises ZayaError if not.
    """
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".safetensors").exists():
        path = path.with_name(path.name + ".safetensors")
    if not path.exists():
        raise ZayaError(f"no prompt cache at {path}")
    try:
        cache, meta = _mlx_lm_load(str(path), return_metadata=True)
    except Exception as e:
        raise ZayaError(f"{path} is not a readable prompt cache ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise ZayaError(f"{path} is not a zaya prompt cache (no '{FORMAT}' metadata)")
    meta = dict(meta)
    n_extra = int(meta.get("num_extra", 0) or 0)
    if n_extra:
        cache, extras = cache[: len(cache) - n_extra], cache[len(cache) - n_extra :]
        meta["extra"] = [list(e.cache) for e in extras]
    tokens = [int(t) for t in json.loads(meta.get("tokens", "[]"))]
    held = _held(cache)
    if held >= 0 and held != len(tokens):
        raise ZayaError(f"{path} is inconsistent: the cache holds {held} tokens, its metadata lists {len(tokens)}")
    if model is not None:
        check_fits(cache, model, path)
    return cache, tokens, meta


def check_fits(cache: list, model, where="the prompt cache") -> None:
    layers = len(model.layers)
    if len(cache) != layers:
        raise ZayaError(f"{where} has {len(cache)} layers; this model has {layers}")
    args = getattr(model, "args", None)
    kv = cache[0][0] if isinstance(cache[0], CacheList) else cache[0]
    if args is not None and getattr(kv, "keys", None) is not None:
        _, heads, _, dim = kv.keys.shape
        if (heads, dim) != (args.num_key_value_heads, args.head_dim):
            raise ZayaError(f"{where} has {heads} KV heads of size {dim}; this model has "
                            f"{args.num_key_value_heads} of size {args.head_dim}")


def cache_nbytes(cache: Optional[list]) -> int:
    """Bytes the cache's arrays take (KV buffers, conv states)."""
    return sum(int(c.nbytes) for c in cache or ())


__all__ = ["save_prompt_cache", "load_prompt_cache", "check_fits", "cache_nbytes"]
