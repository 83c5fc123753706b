"""ZAYA1 in MLX, with the semantics of transformers' `ZayaForCausalLM`.

Each layer: RMSNorm -> Compressed Convolutional Attention -> residual scaling -> RMSNorm -> top-1 MoE with an
MLP router (16 experts + a skip choice) -> residual scaling. The residual stream is fp32; logits are fp32.
This file is also mlx-lm's model module for `model_type` "zaya" (`ModelArgs`, `Model`, `sanitize`).
"""

import math
import os
import warnings
import weakref
from typing import Optional

import numpy as np
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import ArraysCache, BatchKVCache, CacheList, KVCache
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from . import kernels, layouts
from .config import ZayaConfig

ModelArgs = ZayaConfig


class ResidualScaling(nn.Module):
    """`(out + b_o) * s_o + (residual + b_r) * s_r`, the sum kept in fp32."""

    def __init__(self, dims: int):
        super().__init__()
        self.hidden_states_scale = mx.ones((dims,))
        self.hidden_states_bias = mx.zeros((dims,))
        self.residual_scale = mx.ones((dims,))
        self.residual_bias = mx.zeros((dims,))

    def __call__(self, out: mx.array, residual: mx.array) -> mx.array:
        out = (out + self.hidden_states_bias) * self.hidden_states_scale
        f32 = mx.float32
        residual = (residual + self.residual_bias.astype(f32)) * self.residual_scale.astype(f32)
        return out.astype(f32) + residual


class CCAProjection(nn.Module):
    """Queries, keys and values of Compressed Convolutional Attention.

    One fused projection gives q, k and both value halves. `[q, k]` runs through a causal depthwise conv and a
    causal grouped conv (one group per head) over the cached previous inputs; q and k also keep a residual
    path through their head means. Half of the value comes from the previous token (`v_delayed`).
    """

    def __init__(self, args: ZayaConfig):
        super().__init__()
        d, nh, nkv = args.head_dim, args.num_attention_heads, args.num_key_value_heads
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, d
        self.q_dim, self.k_dim, self.v_half = nh * d, nkv * d, nkv * d // 2
        self.state_size = args.conv_state_size
        channels = self.q_dim + self.k_dim
        self.in_proj = nn.Linear(args.hidden_size, channels + 2 * self.v_half, bias=args.attention_bias)
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, args.cca_time0, groups=channels, bias=True)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, args.cca_time1, groups=nh + nkv, bias=True)

    def __call__(self, x: mx.array, conv_cache: Optional[ArraysCache], pad_mask: Optional[mx.array]):
        B, L, _ = x.shape
        if pad_mask is not None:  # padding starts the sequence afresh: zero inputs, as for a lone sequence
            x = x * pad_mask[..., None].astype(x.dtype)
        proj = self.in_proj(x)
        q_end, k_end = self.q_dim, self.q_dim + self.k_dim
        qk, v_current, v_delayed = proj[..., :k_end], proj[..., k_end : k_end + self.v_half], proj[..., k_end + self.v_half :]
        if pad_mask is not None and "bias" in self.in_proj:
            qk = qk * pad_mask[..., None].astype(qk.dtype)

        state = conv_cache[0] if conv_cache is not None else None
        v_prev = conv_cache[1] if conv_cache is not None else None
        if state is None:
            state = mx.zeros((B, self.state_size, qk.shape[-1]), qk.dtype)
        if v_prev is None:  # the delayed projection of a zero input
            v_prev = self._delayed_of_zero(B, v_delayed.dtype)
        conv_in = mx.concatenate([state, qk], axis=1)
        if conv_cache is not None and conv_cache.lengths is not None:
            # A right-padded batch (mlx-lm's BatchGenerator): keep each row's state at its own end.
            ends = mx.clip(conv_cache.lengths, 0, L)
            positions = (ends[:, None] + mx.arange(self.state_size))[..., None]
            conv_cache[0] = mx.take_along_axis(conv_in, positions, axis=1)
            last = mx.take_along_axis(v_delayed, mx.maximum(ends - 1, 0)[:, None, None], axis=1)[:, 0]
            conv_cache[1] = mx.where(ends[:, None] > 0, last, v_prev)
            conv_cache.advance(L)
        elif conv_cache is not None:
            conv_cache[0] = conv_in[:, conv_in.shape[1] - self.state_size :]
            conv_cache[1] = v_delayed[:, -1]
        conv = self.conv_qk_grouped(self.conv_qk_depthwise(conv_in))

        nh, nkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = qk[..., :q_end].reshape(B, L, nkv, nh // nkv, d)
        k = qk[..., q_end:].reshape(B, L, nkv, 1, d)
        q_res = (q + k) * 0.5
        k_res = q_res.mean(axis=-2)
        queries = conv[..., :q_end].reshape(B, L, nh, d) + q_res.reshape(B, L, nh, d)
        keys = conv[..., q_end:].reshape(B, L, nkv, d) + k_res
        v_shifted = mx.concatenate([v_prev[:, None], v_delayed[:, :-1]], axis=1)
        values = mx.concatenate([v_current, v_shifted], axis=-1).reshape(B, L, nkv, d)
        return queries, keys, values

    def _delayed_of_zero(self, batch: int, dtype) -> mx.array:
        if "bias" in self.in_proj:
            return mx.broadcast_to(self.in_proj.bias[-self.v_half :], (batch, self.v_half)).astype(dtype)
        return mx.zeros((batch, self.v_half), dtype)


class QKNorm(nn.Module):
    """L2-normalise q and k to norm sqrt(d); scale keys by a learned per-KV-head temperature."""

    def __init__(self, args: ZayaConfig):
        super().__init__()
        self.temp = mx.zeros((args.num_key_value_heads,))
        self.scale = math.sqrt(args.head_dim)

    def __call__(self, queries: mx.array, keys: mx.array):
        eps = mx.finfo(queries.dtype).eps

        def l2(x):
            x32 = x.astype(mx.float32)
            norm = mx.maximum(mx.sqrt(mx.sum(x32 * x32, axis=-1, keepdims=True)), eps)
            return (x32 * (self.scale / norm)).astype(x.dtype)

        return l2(queries), l2(keys) * self.temp[:, None].astype(keys.dtype)


class Attention(nn.Module):
    def __init__(self, args: ZayaConfig, layer_type: str):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.qkv_proj = CCAProjection(args)
        self.qk_norm = QKNorm(args)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.attention_bias)
        self.rope = nn.RoPE(args.rope_dims(layer_type), traditional=False, base=args.rope_theta(layer_type))
        self.scale = args.head_dim**-0.5

    def __call__(self, x, mask, cache: Optional[CacheList], pad_mask):
        B, L, _ = x.shape
        kv_cache, conv_cache = (cache[0], cache[1]) if cache is not None else (None, None)
        queries, keys, values = self.qkv_proj(x, conv_cache, pad_mask)
        queries, keys = self.qk_norm(queries, keys)
        queries, keys, values = (a.transpose(0, 2, 1, 3) for a in (queries, keys, values))
        offset = kv_cache.offset if kv_cache is not None else 0
        queries, keys = self.rope(queries, offset=offset), self.rope(keys, offset=offset)
        if kv_cache is not None:
            keys, values = kv_cache.update_and_fetch(keys, values)
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class RouterMLP(nn.Module):
    def __init__(self, dims: int, classes: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dims, eps=eps)
        self.fc1 = nn.Linear(dims, dims, bias=True)
        self.fc2 = nn.Linear(dims, dims, bias=True)
        self.out_proj = nn.Linear(dims, classes, bias=False)

    def __call__(self, r):
        return self.out_proj(nn.gelu(self.fc2(nn.gelu(self.fc1(self.norm(r))))))


class Router(nn.Module):
    """Top-1 over the experts and a skip choice; the down-projected state also feeds the next layer's router."""

    def __init__(self, args: ZayaConfig, layer_idx: int):
        super().__init__()
        self.down_proj = nn.Linear(args.hidden_size, args.router_hidden_size, bias=True)
        if layer_idx > 0:
            self.router_states_scale = mx.ones((args.router_hidden_size,))
        self.router_mlp = RouterMLP(args.router_hidden_size, args.num_experts + 1, args.rms_norm_eps)
        self.balancing_biases = mx.array([0.0] * args.num_experts + [-1.0], dtype=mx.float32)

    def __call__(self, x, prev_state):
        return self.route(self.down_proj(x), prev_state)

    def kernel_weights(self) -> kernels.RouterWeights:
        """The router MLP as the decode kernels read it (dense weights)."""
        mlp = self.router_mlp
        return kernels.RouterWeights(mlp.norm.weight, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                                     mlp.out_proj.weight, self.balancing_biases, mlp.norm.eps)

    def route(self, r, prev_state):
        """From the down-projected state `r`: (choice, weight, the state the next layer's router gets)."""
        if prev_state is not None and "router_states_scale" in self:
            r = r + prev_state * self.router_states_scale
        probs = mx.softmax(self.router_mlp(r).astype(mx.float32), axis=-1)
        choice = mx.argmax(probs + self.balancing_biases, axis=-1)
        weight = mx.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]
        return choice, weight, r


class Experts(nn.Module):
    """SwiGLU experts stacked as mlx-lm SwitchLinears (quantizable); choice == num_experts is the skip."""

    def __init__(self, args: ZayaConfig):
        super().__init__()
        self.num_experts = args.num_experts
        self.gate_up_proj = SwitchLinear(args.hidden_size, 2 * args.moe_intermediate_size, args.num_experts, bias=False)
        self.down_proj = SwitchLinear(args.moe_intermediate_size, args.hidden_size, args.num_experts, bias=False)

    def __call__(self, x, choice, weight):
        weight = mx.where(choice == self.num_experts, 0.0, weight)
        if self._needs_expert_loop():
            return self._per_expert(x, choice) * weight[..., None].astype(x.dtype)
        idx = mx.minimum(choice, self.num_experts - 1)[..., None]
        h = mx.expand_dims(x, (-2, -3))
        do_sort = idx.size >= 64  # many tokens: group them by expert for contiguous weight reads
        inv_order = None
        if do_sort:
            h, idx, inv_order = _gather_sort(h, idx)
        gate, up = mx.split(self.gate_up_proj(h, idx, sorted_indices=do_sort), 2, axis=-1)
        y = self.down_proj(swiglu(gate, up), idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv_order, x.shape[:-1] + (1,))
        y = y.reshape(x.shape)
        return y * weight[..., None].astype(y.dtype)

    def _needs_expert_loop(self) -> bool:
        """MLX's CPU gather_mm takes only float32: when either projection is dense bf16/fp16 (a quantized folder
        may keep one unquantized), the CPU goes one expert at a time."""
        return mx.default_device() == mx.cpu and any(
            "scales" not in p and p.weight.dtype != mx.float32 for p in (self.gate_up_proj, self.down_proj))

    def _per_expert(self, x, choice):
        """Each used expert on its own rows (as transformers does); skip rows are left at zero."""
        flat, ids = x.reshape(-1, x.shape[-1]), np.array(choice.reshape(-1))
        out = mx.zeros_like(flat)
        for e in np.unique(ids[ids < self.num_experts]):
            rows = mx.array(np.nonzero(ids == e)[0])
            gate, up = mx.split(_one_expert(self.gate_up_proj, flat[rows], int(e)), 2, axis=-1)
            out[rows] = _one_expert(self.down_proj, swiglu(gate, up), int(e))
        return out.reshape(x.shape)


def _one_expert(proj: nn.Module, x: mx.array, e: int) -> mx.array:
    """Rows `x` through expert `e` of a SwitchLinear: a plain matmul when dense, the layer's own gather_qmm
    (which runs on every back end) when quantized."""
    if "scales" not in proj:
        return x @ proj.weight[e].T
    return proj(x[:, None, :], mx.full((x.shape[0],), e, mx.uint32))[:, 0]


class MoE(nn.Module):
    def __init__(self, args: ZayaConfig, layer_idx: int):
        super().__init__()
        self.gate = Router(args, layer_idx)
        self.experts = Experts(args)

    def __call__(self, x, router_state):
        choice, weight, router_state = self.gate(x, router_state)
        return self.experts(x, choice, weight), router_state


class DecoderLayer(nn.Module):
    def __init__(self, args: ZayaConfig, layer_idx: int):
        super().__init__()
        self.layer_type = args.layer_types[layer_idx]
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args, self.layer_type)
        self.post_attention_residual_scale = ResidualScaling(args.hidden_size)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MoE(args, layer_idx)
        self.post_mlp_residual_scale = ResidualScaling(args.hidden_size)

    def __call__(self, h, router_state, mask, cache, pad_mask):
        dtype = self.input_layernorm.weight.dtype
        out = self.self_attn(self.input_layernorm(h.astype(dtype)), mask, cache, pad_mask)
        h = self.post_attention_residual_scale(out, h)
        out, router_state = self.mlp(self.post_attention_layernorm(h.astype(dtype)), router_state)
        return self.post_mlp_residual_scale(out, h), router_state


def attention_mask(L: int, offset: int, left_padding: Optional[mx.array], window: Optional[int]):
    """Boolean [B|1, 1, L, offset+L] mask, or "causal"/None where the fused kernel's own causal mask is exact.

    Padding keys are hidden; a padding query sees only itself, so no row is empty.
    """
    if left_padding is None and (window is None or offset + L <= window):
        return "causal" if L > 1 else None
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset + L)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    if left_padding is not None:
        mask = (mask & (k >= left_padding[:, None, None, None])) | (k == q)
    return mask


class ZayaModel(nn.Module):
    def __init__(self, args: ZayaConfig):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.input_hidden_states_scale = mx.ones((args.hidden_size,))
        self.input_hidden_states_bias = mx.zeros((args.hidden_size,))
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def update(self, parameters: dict, strict: bool = True):
        _drop_fused_state(self)
        return super().update(parameters, strict)

    def update_modules(self, modules: dict, strict: bool = True):
        _drop_fused_state(self)
        return super().update_modules(modules, strict)

    def __call__(self, tokens: mx.array, cache=None, fused: Optional[bool] = None):
        """fused: whether a one-token step with a cache runs the fused decode step (default: use_fused_decode())."""
        B, L = tokens.shape
        if L == 1 and cache is not None and (use_fused_decode() if fused is None else fused):
            return fused_decode(self, tokens, cache)
        h = self.embed_tokens(tokens)
        h = ((h + self.input_hidden_states_bias) * self.input_hidden_states_scale).astype(mx.float32)

        kv = cache[0][0] if cache is not None else None
        offset, left_padding = 0, None
        if isinstance(kv, BatchKVCache):
            offset, left_padding = kv.size(), kv.left_padding
        elif kv is not None:
            offset = kv.offset
        masks = {t: attention_mask(L, offset, left_padding, self.args.sliding_window if t == "hybrid_sliding" else None)
                 for t in set(self.args.layer_types)}
        pad_mask = None
        if left_padding is not None and L > 1:
            pad_mask = mx.arange(offset, offset + L)[None] >= left_padding[:, None]

        router_state = None
        for i, layer in enumerate(self.layers):
            c = cache[i] if cache is not None else None
            h, router_state = layer(h, router_state, masks[layer.layer_type], c, pad_mask)
        return self.norm(h.astype(self.norm.weight.dtype))


class Model(nn.Module):
    def __init__(self, args: ZayaConfig):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = ZayaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.lm_head_bias)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        fused = use_fused_decode(self)
        h = self.model(tokens, cache, fused=fused)
        logits = kernels.lm_head(h, self.head) if fused else kernels.lm_head_reference(h, self.head)
        return logits.astype(mx.float32)

    @property
    def head(self) -> nn.Module:
        """The LM head: its own linear layer, or the tied embedding."""
        return self.lm_head if "lm_head" in self else self.model.embed_tokens

    @property
    def layers(self):
        return self.model.layers

    def update(self, parameters: dict, strict: bool = True):
        _drop_fused_state(self.model)
        return super().update(parameters, strict)

    def update_modules(self, modules: dict, strict: bool = True):
        _drop_fused_state(self.model)
        return super().update_modules(modules, strict)

    def make_cache(self, batch_left_padding: Optional[list] = None) -> list:
        """One mlx-lm `CacheList(kv, conv)` per layer; a left-padded batch gets a `BatchKVCache`."""
        def kv():
            return KVCache() if batch_left_padding is None else BatchKVCache(list(batch_left_padding))

        return [CacheList(kv(), ArraysCache(2)) for _ in self.layers]

    def sanitize(self, weights: dict) -> dict:
        """Any supported checkpoint layout -> canonical MLX names (mlx-lm calls this on load)."""
        return layouts.to_canonical(weights, self.args)


# --- the fused decode step (one token per sequence) ----------------------------------------------------------
#
# The same function as ZayaModel.__call__ for L == 1, with each layer in 4 graph primitives instead of ~100,
# one launch each: residual scaling + RMSNorm + the router's down-projection (plus the previous layer's router
# state), the router MLP and the expert MLP, residual scaling + RMSNorm + the next layer's in_proj, and the CCA
# decode step (which also writes the key and value into the cache) with attention and o_proj (zaya_mlx/kernels,
# sources in metal/; shapes that launch does not cover take one more, the CCA step on its own). On the CPU the
# kernels' plain-MLX references run in their place.

FUSED_DECODE = "auto"  # "auto": on a Metal or CUDA GPU; "on": everywhere (the CPU runs the references); "off"

# The fused step's KV buffers grow to powers of two from KV_MIN_POSITIONS to KV_GROWTH, then by KV_GROWTH: a new
# buffer size retraces the compiled step functions (one per layer), so sizes should be few; doubling wastes at
# most half the buffer, and past KV_GROWTH positions at most KV_GROWTH.
KV_MIN_POSITIONS = 256
KV_GROWTH = 4096


def _fused_mode() -> str:
    mode = os.environ.get("ZAYA_FUSED", FUSED_DECODE).lower()
    if mode in ("1", "on", "true"):
        return "on"
    if mode in ("0", "off", "false"):
        return "off"
    return "auto"


def use_fused_decode(model: Optional["Model"] = None) -> bool:
    """ZAYA_FUSED on: yes; off: no; auto: on a GPU back end, and, given the model, once its check passes
    (fused_decode_works)."""
    mode = _fused_mode()
    if mode != "auto":
        return mode == "on"
    return kernels.backend() != "cpu" and (model is None or fused_decode_works(model))


# The fused step rounds differently from the plain ops: ~1e-2 of the largest logit (bench/RESULTS.md, full size).
FUSED_CHECK_TOLERANCE = 0.1


def fused_decode_works(model: "Model") -> bool:
    """Whether the fused decode step and the LM head kernel pass their check on this back end, run once a model
    (weights replaced: again) on the first call that would use them, with ``ZAYA_FUSED`` auto: two tokens through
    them on a throwaway cache against the plain ops. Their CUDA twins are tested on NVIDIA GPUs, but no Mac has
    compiled the Metal ones; a kernel that fails to build, or computes garbage, would end or corrupt a generation.
    Where the check fails, this warns once and the model decodes through the plain ops."""
    back = kernels.backend()
    checked = model.model.__dict__.setdefault("_fused_checked", {})  # a plain attribute: not a parameter
    if back not in checked:
        why = _check_fused_decode(model)
        if why is not None:
            warnings.warn(f"zaya-mlx: the fused decode kernels failed their check on this {back} GPU ({why}); "
                          "decoding through plain MLX ops instead, which is slower (ZAYA_FUSED=1 forces them)",
                          RuntimeWarning, stacklevel=3)
        checked[back] = why is None
    return checked[back]


def _check_fused_decode(model: "Model") -> Optional[str]:
    """None if two decode steps through the fused step and the LM head kernel give the plain ops' logits (after a
    short prompt through the plain ops), else why not."""
    vocab = model.args.vocab_size
    prompt = mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32) % vocab
    tok = mx.array([[6]], dtype=mx.int32) % vocab
    try:
        fused_cache, plain_cache = model.make_cache(), model.make_cache()
        for cache in (fused_cache, plain_cache):
            mx.eval(model.model(prompt, cache, fused=False))
        for _ in range(2):
            fused = kernels.lm_head(model.model(tok, fused_cache, fused=True), model.head).astype(mx.float32)
            plain = kernels.lm_head_reference(model.model(tok, plain_cache, fused=False), model.head)
            plain = plain.astype(mx.float32)
            err = (mx.abs(fused - plain).max() / mx.maximum(mx.abs(plain).max(), 1e-30)).item()
            if not err <= FUSED_CHECK_TOLERANCE:  # NaN too
                return f"its logits differ from the plain ops' by {err:.3g} of the largest"
            tok = mx.argmax(plain[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)
    except RuntimeError as e:  # how MLX reports a kernel that does not build or launch
        message = str(e).strip()
        return message.splitlines()[0][:200] if message else "RuntimeError"
    return None


def _drop_fused_state(model: "ZayaModel") -> None:
    """Forget what was built or checked for the old weights: the compiled steps (which hold them as constants) and
    the check (another weight format runs other kernel variants)."""
    model.__dict__.pop("_fused_steps", None)
    model.__dict__.pop("_fused_checked", None)


def _switched_on(name: str) -> bool:
    """An environment switch that is on unless set to 0, off or false."""
    return os.environ.get(name, "1").lower() not in ("0", "off", "false")


def use_compiled_decode() -> bool:
    """Whether the fused step's fixed-shape parts run as mx.compile'd functions (``ZAYA_COMPILE=0``: not)."""
    return _switched_on("ZAYA_COMPILE")


def use_in_place_outputs() -> bool:
    """Whether the fused step's residual norms write into arrays it keeps (_step_buffers) rather than new outputs
    (``ZAYA_IN_PLACE=0``); the step functions are built for each setting, so one process can time both
    (bench/ab_one_process.py --what in-place)."""
    return _switched_on("ZAYA_IN_PLACE")


def kv_capacity(needed: int) -> int:
    """The positions of KV buffers that must hold ``needed`` (see KV_GROWTH)."""
    cap = KV_MIN_POSITIONS
    while cap < needed and cap < KV_GROWTH:
        cap *= 2
    return cap if cap >= needed else -(-needed // KV_GROWTH) * KV_GROWTH


def fused_decode(model: "ZayaModel", tokens: mx.array, cache: list) -> mx.array:
    """One decode step for tokens [B, 1]: the normalised last hidden states [B, 1, H], caches updated.

    The step is one function per layer boundary (the previous layer's residual + norm + router down-projection,
    router and experts, residual + next norm + the next layer's in_proj, then its CCA step with the cache write,
    attention and o_proj), compiled once per batch size and KV buffer size: the write position and the
    attention length are an array the kernels read on the GPU, so nothing in a function depends on the step.
    """
    args = model.args
    B = tokens.shape[0]
    kv0 = cache[0][0]
    if isinstance(kv0, BatchKVCache):
        held, lpad, positions = kv0._idx, kv0.left_padding.astype(mx.int32), kv0.offset
    else:
        held, lpad, positions = kv0.offset, kernels.constant((0,) * B, mx.int32), kv0.offset
    positions = kernels.offset_array(positions, B)
    filled = mx.array([held + 1], dtype=mx.int32)

    layers = model.layers
    dtype = layers[0].input_layernorm.weight.dtype
    attn = layers[0].self_attn
    pairs = [(c[0], c[1]) for c in cache]  # (KV cache, conv cache) a layer: each c[i] is a Python call
    for layer, (kv, conv) in zip(layers, pairs):
        _own_kv_buffers(kv, held, (B, attn.n_kv_heads, attn.head_dim), dtype)
        if conv[0] is None or conv[1] is None:  # a cache that has seen no token yet
            proj = layer.self_attn.qkv_proj
            if conv[0] is None:
                conv[0] = mx.zeros((B, proj.state_size, proj.q_dim + proj.k_dim), dtype)
            if conv[1] is None:
                conv[1] = proj._delayed_of_zero(B, dtype)

    steps = _step_functions(model, kernels.backend())
    bufs = _step_buffers(kv0, B, args, dtype)
    kv, conv = pairs[0]
    h, out, kv.keys, kv.values, conv[0], conv[1] = steps[0](tokens, bufs.q, bufs.last, conv[0], conv[1], positions,
                                                            kv.keys, kv.values, filled, lpad)
    r = _zeros_like_router_state(B, args.router_hidden_size, dtype)
    for i in range(1, len(layers)):
        kv, conv = pairs[i]
        h, r, out, kv.keys, kv.values, conv[0], conv[1] = steps[i](out, h, r, bufs.last, *bufs.mlp_into(i - 1), bufs.q,
                                                                   conv[0], conv[1], positions, kv.keys, kv.values,
                                                                   filled, lpad)
    bufs.last = steps[-1](out, h, r, bufs.last, *bufs.mlp_into(len(layers) - 1))

    offset = kv0.offset + 1  # a BatchKVCache's per-row offsets: one array for every layer
    for kv, _ in pairs:
        _OWNED_KV[kv] = (kv.keys, kv.values, held + 1)
        if isinstance(kv, BatchKVCache):
            kv._idx, kv.offset = held + 1, offset
        else:
            kv.offset = held + 1
    return bufs.last


# a KV cache -> (keys, values, positions held) as the fused step left them: buffers it made and alone holds
_OWNED_KV = weakref.WeakKeyDictionary()


def _own_kv_buffers(kv, held: int, shape: tuple, dtype) -> None:
    """Give a KVCache or BatchKVCache buffers that no other array shares, with room for the step's write.

    The CCA step's kernel writes each new key and value into the buffers in place, at position ``held``. Buffers the
    fused step did not make (from a prefill that grew them, a deepcopy, a loaded prompt cache, a view) may share
    memory with arrays elsewhere, which that write would change; so they are copied once, with the first
    ``held`` positions, into new ones (``kv_capacity`` positions). So are the step's own buffers after a trim
    below where it left them, since a view taken before the trim (``KVCache.state``) shows those positions.
    Prefill through mlx-lm's ``update_and_fetch`` without growing keeps the same array objects, whose slice
    updates never write into memory another array holds.
    """
    owned = _OWNED_KV.get(kv)
    if (owned is not None and owned[0] is kv.keys and owned[1] is kv.values and held >= owned[2]
            and kv.keys.shape[2] > held):
        return
    B, nkv, d = shape
    pad = (B, nkv, kv_capacity(held + 1) - held, d)

    def fresh(a):
        if held == 0:
            return mx.zeros(pad, dtype)
        return mx.concatenate([a[..., :held, :], mx.zeros(pad, a.dtype)], axis=2)

    kv.keys, kv.values = fresh(kv.keys), fresh(kv.values)  # recorded in _OWNED_KV after the step


class _StepBuffers:
    """Arrays the fused step's kernels write in place rather than as new outputs, which cost the host ~4 us each a
    step (kernels._build.launch): the residual stream after attention and after the MoE, two router states (a
    layer's, and the previous layer's that it reads), the row the expert kernel adds into, and the query (where the
    CCA step runs in its own launch); then the last step's output. None is seen outside the step. MLX orders
    launches only by the arrays they take: within a step each launch takes an output of the one before it, and the
    step's first writers (layer 0's CCA step, and its post-attention norm, in case the CCA step runs plain ops) take
    the last step's output, whose launch read them last, so a step whose token does not come from the last one's
    logits cannot overtake it."""

    def __init__(self, batch: int, args: ZayaConfig, dtype):
        H, R = args.hidden_size, args.router_hidden_size
        row = (batch, 1, H)
        self.h_attn, self.h_mlp, self.zeros = (mx.zeros(row, mx.float32) for _ in range(3))
        self.states = (mx.zeros((batch, 1, R), dtype), mx.zeros((batch, 1, R), dtype))
        self.q = mx.zeros((batch, args.num_attention_heads, 1, args.head_dim), dtype)
        self.last = mx.zeros(row, dtype)
        mx.eval(self.h_attn, self.h_mlp, self.zeros, self.states, self.q, self.last)

    def fits(self, batch: int, dtype) -> bool:
        return self.q.shape[0] == batch and self.q.dtype == dtype

    def mlp_into(self, i: int) -> tuple:
        """What layer i's residual norms and expert kernel write into (see _mlp_block)."""
        return self.h_attn, self.h_mlp, self.states[i % 2], self.zeros


# a KV cache of a step's first layer -> its _StepBuffers: two caches' steps, which nothing orders, get their own
_STEP_BUFFERS = weakref.WeakKeyDictionary()


def _step_buffers(kv, batch: int, args: ZayaConfig, dtype) -> _StepBuffers:
    bufs = _STEP_BUFFERS.get(kv)
    if bufs is None or not bufs.fits(batch, dtype):
        bufs = _STEP_BUFFERS[kv] = _StepBuffers(batch, args, dtype)
    return bufs


_ZEROS = {}


def _zeros_like_router_state(batch, width, dtype):
    """The first layer's router has no previous state: a constant placeholder (no graph primitive per step)."""
    key = (batch, width, dtype)
    if key not in _ZEROS:
        _ZEROS[key] = mx.zeros((batch, 1, width), dtype)
        mx.eval(_ZEROS[key])
    return _ZEROS[key]


def _step_functions(model: "ZayaModel", back: str) -> list:
    """The step's functions, one per layer boundary: [from the token ids, after layer 0, ..., after the last].

    Built once per model, back end, compile mode and in-place setting (use_in_place_outputs). A compiled function
    holds the weights it closed over as constants, so replacing weights through ``update`` or ``update_modules``
    (``load_weights``, ``nn.quantize``) drops them; weights assigned to a submodule's attribute directly are not
    seen.
    """
    key = (use_compiled_decode(), back, use_in_place_outputs())
    steps = model.__dict__.setdefault("_fused_steps", {})  # a plain attribute: not a parameter
    if key not in steps:
        steps[key] = [_step_function(model, i, key[0], key[2]) for i in range(-1, len(model.layers))]
    return steps[key]


def _step_function(model: "ZayaModel", i: int, compiled: bool, in_place: bool):
    """The function from layer i's attention output to layer i+1's (i = -1: from the token ids; the last layer:
    to the final norm). in_place: whether its kernels write into the step's buffers (else they are ignored)."""
    layers = model.layers
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    cur = layers[i] if i >= 0 else None
    window = None
    if nxt is not None and nxt.layer_type == "hybrid_sliding":
        window = model.args.sliding_window
    if i < 0:
        def fn(tokens, q_into, last, state, v_prev, positions, keys, values, filled, lpad):
            h = model.embed_tokens(tokens)
            h = ((h + model.input_hidden_states_bias) * model.input_hidden_states_scale).astype(mx.float32)
            qkv = nxt.self_attn.qkv_proj.in_proj(nxt.input_layernorm(h.astype(nxt.input_layernorm.weight.dtype)))
            if not in_place:
                q_into = last = None
            return (h, *_attention(nxt, qkv, state, v_prev, positions, keys, values, filled, lpad, window, q_into,
                                   last))
    elif nxt is None:
        def fn(out, h, r, last, *into):
            if not in_place:
                into, last = (None,) * 4, None
            h, x, r = _mlp_block(cur, out, h, r, into, model.norm, after=last if i == 0 else None)
            return x
    else:
        def fn(out, h, r, last, h_attn, h_mlp, r_into, zeros, q_into, state, v_prev, positions, keys, values, filled,
               lpad):
            if not in_place:
                h_attn = h_mlp = r_into = zeros = last = q_into = None
            into = (h_attn, h_mlp, r_into, zeros)
            h, qkv, r = _mlp_block(cur, out, h, r, into, nxt.input_layernorm, nxt.self_attn.qkv_proj.in_proj,
                                   after=last if i == 0 else None)
            return (h, r, *_attention(nxt, qkv, state, v_prev, positions, keys, values, filled, lpad, window, q_into))
    return mx.compile(fn) if compiled else fn


def _attention(layer: DecoderLayer, qkv, state, v_prev, positions, keys, values, filled, lpad, window, q_into=None,
               after=None):
    """From in_proj's output: the CCA step (which writes the new key and value into the cache), attention and
    o_proj, in one launch where the kernel covers the shapes (kernels.cca_decode_attention). q_into: an array the
    CCA step may write the query into (_StepBuffers.q), or None; after: an array the CCA step must run after.
    Returns (o_proj's output as partial sums [B, P, H] float32 (see kernels.decode_attention), the keys and values
    buffers, the new conv state, the new delayed value)."""
    attn = layer.self_attn
    proj = attn.qkv_proj
    dw, gw = proj.conv_qk_depthwise, proj.conv_qk_grouped
    return kernels.cca_decode_attention(
        qkv, state, v_prev, dw.weight, dw.bias, gw.weight, gw.bias, attn.qk_norm.temp, positions, keys, values, filled,
        n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, rope_dims=attn.rope.dims,
        rope_base=attn.rope.base, scale=attn.scale, left_padding=lpad, window=window, o_proj=attn.o_proj,
        q_into=q_into, after=after,
    )


def _mlp_block(layer: DecoderLayer, o, h, router_state, into, next_norm, next_proj=None, after=None):
    """From o_proj's output (partial sums, see _attention): residual, MoE, residual, then next_norm (the next
    layer's input norm or the final norm) and next_proj (the next layer's in_proj, or None), in kernels. A dense
    router runs inside the expert kernel; a quantized one through its plain ops. into: the arrays the kernels write
    in place (_StepBuffers.mlp_into): the residual stream after attention and after the MoE, this layer's router
    state, and the expert kernel's zero row, or Nones; after: an array the first of them must run after (layer 0:
    the last step's output). Returns (h, next_proj(next_norm(h)) or next_norm(h), router state)."""
    h_attn, h_mlp, r_into, z_into = into
    gate, experts = layer.mlp.gate, layer.mlp.experts
    res, norm = layer.post_attention_residual_scale, layer.post_attention_layernorm
    prev = (router_state, gate.router_states_scale) if "router_states_scale" in gate else None
    mlp = gate.router_mlp
    router = None if any("scales" in lin for lin in (mlp.fc1, mlp.fc2, mlp.out_proj)) else gate.kernel_weights()
    # The router state is written in place only where the expert kernel routes: that kernel also takes x, which orders
    # it after this launch. The router's own kernel or ops would take the state alone, and could run before it.
    if r_into is not None and not (router is not None and kernels.routed_kernel_supported(
            h, r_into, router, experts.gate_up_proj, experts.down_proj)):
        r_into = None
    # r: the router's down-projection plus the previous layer's state; dtype: the activation dtype (the step casts)
    # zeros: the row the expert kernel adds its sum into, in place (no fill of a new output)
    h, x, r, zeros = kernels.residual_norm(
        o, h, res.hidden_states_scale, res.hidden_states_bias, res.residual_scale, res.residual_bias, norm.weight,
        norm.eps, gate.down_proj, dtype=norm.weight.dtype, prev_state=prev, zeros=True, into=(h_attn, r_into, z_into),
        after=after,
    )

    if router is None:  # quantized router: its plain ops
        choice, weight, _ = gate.route(r, None)
        y, after = kernels.expert_gather(x, choice, weight, experts.gate_up_proj, experts.down_proj, into=zeros)
    else:
        y, after = kernels.routed_expert_gather(x, r, router, experts.gate_up_proj, experts.down_proj, into=zeros)

    res = layer.post_mlp_residual_scale
    h, x, qkv = kernels.residual_norm(  # y: the expert kernel's float32 sum; after: runs this after its adds
        y, h, res.hidden_states_scale, res.hidden_states_bias, res.residual_scale, res.residual_bias,
        next_norm.weight, next_norm.eps, next_proj, dtype=x.dtype, after=after, normed=next_proj is None,
        into=(h_mlp, None, None),
    )
    return h, (x if qkv is None else qkv), r
