"""Save a prompt cache (with the token ids it holds and the model it belongs to) to a file, and load it back.

The cache is mlx-lm's own classes (`CacheList(KVCache, ArraysCache)` per layer), so mlx-lm's
`save_prompt_cache`/`load_prompt_cache` round-trip it; this adds the metadata, trims the KV buffers to what
they hold (mlx-lm keeps 256-token steps), checks the file against the model on load, and writes atomically
(a temporary file in the same folder, then a rename), so an interrupted save never leaves a broken file.

The model a cache belongs to is recorded as a fingerprint of its config and of a fixed sample of every
parameter's values: a cache from another model of the same shapes (a fine-tune, another quantization or
dtype) would load and be reused silently otherwise, giving wrong answers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
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


def model_fingerprint(model) -> str:
    """A hash of the model's config and of 8 evenly spaced values of each parameter (a few thousand numbers)."""
    samples = []
    for _, a in sorted(tree_flatten(model.parameters()), key=lambda item: item[0]):
        flat = a.reshape(-1)
        samples.append(flat[:: max(1, flat.size // 8)][:8].astype(mx.float32))
    args = getattr(model, "args", None)
    digest = hashlib.sha256(json.dumps(args.to_dict() if args is not None else {}, sort_keys=True).encode())
    digest.update(np.array(mx.concatenate(samples)).tobytes())
    return digest.hexdigest()[:32]


def save_prompt_cache(path, cache: list, tokens: Sequence[int], model, *, model_id: Optional[str] = None,
                      metadata: Optional[dict] = None, extra: Optional[list] = None) -> Path:
    """Write `cache` (a B=1 cache of `model` holding exactly `tokens`) to `path` (.safetensors added if missing).

    `model_id`: a label for messages (a path or hub id). `extra`: more state to keep with it, a list of lists of
    arrays (or None), e.g. a chat session's snapshots.
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
    meta.update(format=FORMAT, version=VERSION, model_id=model_id or "", model_fingerprint=model_fingerprint(model),
                tokens=json.dumps(tokens), num_layers=str(len(cache)), num_extra=str(len(extra)))
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
    With `model`, checks that the cache was saved from this very model (and fits it) and raises ZayaError if not.
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
    n_extra = metadata_value(path, meta, "num_extra", lambda v: 0 <= v < len(cache), "a count below the cache's entries")
    if n_extra:
        cache, extras = cache[: len(cache) - n_extra], cache[len(cache) - n_extra :]
        meta["extra"] = [list(e.cache) for e in extras]
    tokens = metadata_value(path, meta, "tokens", lambda v: isinstance(v, list) and all(is_token(t) for t in v),
                       "a list of token ids")
    held = _held(cache)
    if held >= 0 and held != len(tokens):
        raise ZayaError(f"{path} is inconsistent: the cache holds {held} tokens, its metadata lists {len(tokens)}")
    if model is not None:
        check_fits(cache, model, path)
        if meta.get("model_fingerprint") != model_fingerprint(model):
            saved = f" ({meta['model_id']})" if meta.get("model_id") else ""
            raise ZayaError(f"{path} was saved from another model{saved}, or this one at another dtype or "
                            "quantization: its cache does not apply")
    return cache, tokens, meta


def metadata_value(path, meta: dict, key: str, valid, what: str):
    """A JSON value of the file's metadata, checked; a one-line ZayaError if absent, unreadable or invalid."""
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError):
        value = None
    if value is None or not valid(value):
        raise ZayaError(f"{path} has a bad '{key}' entry in its metadata: expected {what}")
    return value


def is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


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


__all__ = ["save_prompt_cache", "load_prompt_cache", "check_fits", "cache_nbytes", "model_fingerprint",
           "metadata_value"]
