"""The KV cache's formats: the activation dtype (bf16), or keys and values quantized as they are written.

A quantized cache is mlx-lm's ``QuantizedKVCache``: each key or value row of ``head_dim`` values is stored as
``bits``-bit integers packed into uint32 words, with a scale and a bias (the activation dtype) for each
``group_size`` values (MLX's affine quantization, ``mx.quantize``); attention reads it without expanding it
(``mx.quantized_matmul``, or the decode kernel's quantized loads; on MLX-CUDA, whose quantized_matmul has no
kernel for attention's shapes, expanded first: ``attend``). At 8 bits a token's KV takes 53% of bf16's
bytes, at 4 bits 28%: the bytes decode reads a step at long context, and the memory that decides how many long
sequences fit. A left-padded batch of such rows (RSA's rollouts under mlx-lm's BatchGenerator) is a
``BatchQuantizedKVCache``. docs/kv-cache.md gives the quality figures.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache, QuantizedKVCache, dynamic_roll

from .errors import ZayaError
from .kernels import backend
from .sizes import KV_GROUP_SIZE  # values sharing a scale and a bias; sizes.py counts the bytes

KV_BITS = (8, 4)  # the quantized formats


def check_kv_bits(kv_bits: Optional[int]) -> Optional[int]:
    """None (the activation dtype) or one of KV_BITS; anything else is a ZayaError."""
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise ZayaError(f"kv_bits {kv_bits!r}: choose {', '.join(map(str, KV_BITS))}, or none for the model's dtype")
    return kv_bits


def check_kv_heads(head_dim: int, kv_bits: Optional[int]) -> None:
    """A quantized cache groups a head's values by KV_GROUP_SIZE: a ZayaError for heads it cannot group."""
    if check_kv_bits(kv_bits) is not None and head_dim % KV_GROUP_SIZE:
        raise ZayaError(f"a quantized KV cache needs heads of a multiple of {KV_GROUP_SIZE} values; this model's "
                        f"have {head_dim}")


def attend(queries, keys, values, cache, *, scale: float, mask):
    """Attention over what ``cache.update_and_fetch`` returned: mlx-lm's ``scaled_dot_product_attention``, which
    reads a quantized cache's keys and values with ``mx.quantized_matmul``. MLX-CUDA's quantized_matmul (0.32) has
    no kernel for attention's shapes (a prompt's queries, or a head's 4 queries a step, against the keys: "No
    implementation for problem shape"), so on CUDA the keys and values are expanded first (``mx.dequantize``: the
    values quantized_matmul multiplies by) and attention runs as over an unquantized cache. The bf16 copy lives
    for one layer's attention."""
    bits = getattr(cache, "bits", None)
    if bits is not None and backend() == "cuda":
        keys, values = (mx.dequantize(*kv, group_size=cache.group_size, bits=bits) for kv in (keys, values))
        cache = None
    return scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask)


def parse_kv(name: str) -> Optional[int]:
    """A command line's KV format: 'bf16' (or 'none') -> None, '8' or '4' -> bits."""
    name = name.strip().lower()
    if name in ("bf16", "none", "16"):
        return None
    try:
        return check_kv_bits(int(name))
    except ValueError:
        raise ZayaError(f"KV format {name!r}: choose bf16, {', '.join(map(str, KV_BITS))}") from None


class BatchQuantizedKVCache(BatchKVCache):
    """mlx-lm's ``BatchKVCache`` (left-padded rows, each with its own RoPE offset; merged, filtered and extended as
    mlx-lm's ``BatchGenerator`` runs sequences in and out) with keys and values stored as ``QuantizedKVCache`` stores
    them: each a tuple (packed uint32 words, scales, biases), quantized as they are written.

    ``bits`` and ``group_size`` make mlx-lm's ``scaled_dot_product_attention`` attend through its quantized path,
    and the fused decode step reads and writes the tuples in place as it does a ``QuantizedKVCache``'s. Every
    operation is the parent's applied to each of the three arrays; padding positions (zeros, or the tokens a
    right-padded prefill rolled to the left) are hidden by the mask, as the parent's are. ``merge`` takes caches of
    this class (a rollout's cache is a one-row batch from the start); ``extract`` gives a row back as a
    ``QuantizedKVCache``.
    """

    def __init__(self, left_padding: list, group_size: int = KV_GROUP_SIZE, bits: int = 8):
        super().__init__(left_padding)
        self.group_size, self.bits = group_size, check_kv_bits(bits)

    def _empty_parts(self, rows: int, heads: int, positions: int, head_dim: int, dtype) -> tuple:
        """Zeros for the packed words, the scales and the biases of ``positions`` rows of ``head_dim`` values."""
        groups = head_dim // self.group_size
        return (mx.zeros((rows, heads, positions, head_dim * self.bits // 32), mx.uint32),
                mx.zeros((rows, heads, positions, groups), dtype), mx.zeros((rows, heads, positions, groups), dtype))

    def update_and_fetch(self, keys, values):
        prev, L = self._idx, keys.shape[2]
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            B, H, _, D = keys.shape
            grow = (self.step + L - 1) // self.step * self.step
            new_k = self._empty_parts(B, H, grow, D, keys.dtype)
            new_v = self._empty_parts(B, H, grow, values.shape[3], values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys, self.values = (tuple(mx.concatenate([a[..., :prev, :], b], axis=2) for a, b in zip(old, new))
                                          for old, new in ((self.keys, new_k), (self.values, new_v)))
        self.offset = self.offset + L
        self._idx += L
        for stored, new in ((self.keys, keys), (self.values, values)):
            for a, q in zip(stored, mx.quantize(new, group_size=self.group_size, bits=self.bits)):
                a[..., prev : self._idx, :] = q
        return self.keys_and_values()

    def keys_and_values(self):
        return tuple(tuple(a[..., : self._idx, :] for a in parts) for parts in (self.keys, self.values))

    def finalize(self):
        if self._right_padding is not None:
            shift = self._right_padding[:, None]
            self.keys, self.values = (tuple(dynamic_roll(a, shift, axis=2) for a in parts)
                                      for parts in (self.keys, self.values))
            self.offset = self.offset - self._right_padding
            self.left_padding += self._right_padding
            self._right_padding = None

    def filter(self, batch_indices):
        if self.keys is not None:
            self.keys, self.values = (tuple(a[batch_indices] for a in parts) for parts in (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())  # positions every row pads: dropped
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = (tuple(a[..., shift:, :] for a in parts) for parts in (self.keys, self.values))
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other):
        """Append ``other``'s rows: both right-aligned at the later write position, so each row keeps its tokens
        just before the next write; the shorter side gains left padding."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)
        ref = self if self.keys is not None else other
        _, H, _, _ = ref.keys[0].shape

        def aligned(c):
            if c.keys is None:
                rows = c.offset.shape[0]
                keys = tuple(mx.zeros((rows, H, 0, a.shape[3]), a.dtype) for a in ref.keys)
                values = tuple(mx.zeros((rows, H, 0, a.shape[3]), a.dtype) for a in ref.values)
            else:
                keys, values = c.keys, c.values
            left = idx - c._idx
            right = max(size - keys[0].shape[2] - left, 0)
            keep = size - left  # positions of c's buffers that fit after the left padding

            def pad(a):
                return mx.pad(a[..., :keep, :], [(0, 0), (0, 0), (left, right), (0, 0)])

            return tuple(map(pad, keys)), tuple(map(pad, values)), c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = aligned(self), aligned(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2))
        self.offset, self.left_padding = mx.concatenate([o1, o2]), mx.concatenate([p1, p2])
        self._idx = idx

    def extract(self, idx):
        cache = QuantizedKVCache(self.group_size, self.bits)
        padding = self.left_padding.tolist()[idx]
        cache.keys, cache.values = (tuple(mx.contiguous(a[idx : idx + 1, :, padding : self._idx]) for a in parts)
                                    for parts in (self.keys, self.values))
        cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches):
        """One batch of the rows of ``caches`` (batch caches of one format), in order; the inputs are unchanged."""
        first = caches[0]
        merged = cls([], first.group_size, first.bits)
        merged.left_padding = merged.offset = mx.zeros((0,), mx.int32)
        for c in caches:
            if (c.bits, c.group_size) != (first.bits, first.group_size):
                raise ValueError(f"cannot merge {c.bits}-bit KV rows into a {first.bits}-bit batch")
            merged.extend(c)
        return merged

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return sum(a.nbytes for parts in (self.keys, self.values) for a in parts)
