"""What the fused decode step keeps beside a model's cache: the KV buffers it made, and the arrays its kernels write.

A model's cache stays mlx-lm's own (a list of `CacheList(KVCache or BatchKVCache, ArraysCache)`), so mlx-lm's
generate, batch merging, filtering, trimming and prompt-cache files work on it unchanged. The step's own state for
one such cache is a `StepCache`, which the model's `FusedDecoder` keeps for as long as the cache lives.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

# The fused step's KV buffers grow to powers of two from KV_MIN_POSITIONS to KV_GROWTH, then by KV_GROWTH: a new
# buffer size retraces the compiled step functions (one per layer), so sizes should be few; doubling wastes at
# most half the buffer, and past KV_GROWTH positions at most KV_GROWTH.
KV_MIN_POSITIONS = 256
KV_GROWTH = 4096


def kv_capacity(needed: int) -> int:
    """The positions of KV buffers that must hold ``needed`` (see KV_GROWTH)."""
    cap = KV_MIN_POSITIONS
    while cap < needed and cap < KV_GROWTH:
        cap *= 2
    return cap if cap >= needed else -(-needed // KV_GROWTH) * KV_GROWTH


def positions_held(kv) -> int:
    """Positions written into a layer's KV buffers (a BatchKVCache's rows share one write position)."""
    return kv._idx if isinstance(kv, BatchKVCache) else kv.offset


class StepBuffers:
    """Arrays the fused step's kernels write in place rather than as new outputs, which cost the host ~4 us each a
    step (kernels._build.launch): the residual stream after attention and after the MoE, two router states (a
    layer's, and the previous layer's that it reads), the row the expert kernel adds into, and the query (where the
    CCA step runs in its own launch); then the last step's output; and the first layer's router input, which has
    no previous state (a constant zero row, read only). None is seen outside the step. MLX orders launches only by
    the arrays they take: within a step each launch takes an output of the one before it, and the step's first
    writers (layer 0's CCA step, and its post-attention norm, in case the CCA step runs plain ops) take the last
    step's output, whose launch read them last, so a step whose token does not come from the last one's logits
    cannot overtake it."""

    def __init__(self, batch: int, hidden: int, router_width: int, heads: int, head_dim: int, dtype):
        row = (batch, 1, hidden)
        self.h_attn, self.h_mlp, self.zeros = (mx.zeros(row, mx.float32) for _ in range(3))
        self.states = (mx.zeros((batch, 1, router_width), dtype), mx.zeros((batch, 1, router_width), dtype))
        self.no_state = mx.zeros((batch, 1, router_width), dtype)
        self.q = mx.zeros((batch, heads, 1, head_dim), dtype)
        self.last = mx.zeros(row, dtype)
        mx.eval(self.h_attn, self.h_mlp, self.zeros, self.states, self.no_state, self.q, self.last)

    def fits(self, batch: int, dtype) -> bool:
        return self.q.shape[0] == batch and self.q.dtype == dtype

    def mlp_into(self, i: int) -> tuple:
        """What layer i's residual norms and expert kernel write into (see step._mlp_block)."""
        return self.h_attn, self.h_mlp, self.states[i % 2], self.zeros


class StepCache:
    """The fused step's state for one model cache: the KV buffers it made and alone holds (layer -> keys, values,
    positions held when it left them), and its StepBuffers. Two caches' steps, which nothing orders, never share
    buffers."""

    def __init__(self):
        self.owned: dict[int, tuple] = {}
        self.buffers: StepBuffers | None = None

    def step_buffers(self, batch: int, hidden: int, router_width: int, heads: int, head_dim: int, dtype) -> StepBuffers:
        if self.buffers is None or not self.buffers.fits(batch, dtype):
            self.buffers = StepBuffers(batch, hidden, router_width, heads, head_dim, dtype)
        return self.buffers

    def own_kv_buffers(self, layer: int, kv, held: int, shape: tuple, dtype) -> None:
        """Give a layer's KVCache or BatchKVCache buffers that no other array shares, with room for the step's write.

        The CCA step's kernel writes each new key and value into the buffers in place, at position ``held``.
        Buffers the fused step did not make (from a prefill that grew them, a deepcopy, a loaded prompt cache, a
        view) may share memory with arrays elsewhere, which that write would change; so they are copied once, with
        the first ``held`` positions, into new ones (``kv_capacity`` positions). So are the step's own buffers after
        a trim below where it left them, since a view taken before the trim (``KVCache.state``) shows those
        positions. Prefill through mlx-lm's ``update_and_fetch`` without growing keeps the same array objects,
        whose slice updates never write into memory another array holds.
        """
        owned = self.owned.get(layer)
        if (owned is not None and owned[0] is kv.keys and owned[1] is kv.values and held >= owned[2]
                and kv.keys.shape[2] > held):
            return
        B, nkv, d = shape
        pad = (B, nkv, kv_capacity(held + 1) - held, d)

        def fresh(a):
            if held == 0:
                return mx.zeros(pad, dtype)
            return mx.concatenate([a[..., :held, :], mx.zeros(pad, a.dtype)], axis=2)

        kv.keys, kv.values = fresh(kv.keys), fresh(kv.values)  # recorded by advance() after the step

    def advance(self, layer: int, kv, held: int, offset) -> None:
        """After a step wrote position ``held``: record the buffers as the step's own and move the cache on.
        offset: the cache's new offset (a BatchKVCache's per-row offsets, one array for every layer)."""
        self.owned[layer] = (kv.keys, kv.values, held + 1)
        if isinstance(kv, BatchKVCache):
            kv._idx, kv.offset = held + 1, offset
        else:
            kv.offset = held + 1
