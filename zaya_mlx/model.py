"""ZAYA1 in MLX, with the semantics of transformers' `ZayaForCausalLM`.

Each layer: RMSNorm -> Compressed Convolutional Attention -> residual scaling -> RMSNorm -> top-1 MoE with an
MLP router (16 experts + a skip choice) -> residual scaling. The residual stream is fp32; logits are fp32.
This file is also mlx-lm's model module for `model_type` "zaya" (`ModelArgs`, `Model`, `sanitize`).
"""

import math
from typing import Optional

import numpy as np
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import ArraysCache, BatchKVCache, CacheList, KVCache, QuantizedKVCache
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from . import kernels, layouts
from .config import ZayaConfig
from .kv_cache import KV_GROUP_SIZE, BatchQuantizedKVCache, attend, check_kv_heads
from .decode import DecodeOptions, FusedDecoder

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
            v_prev = self.delayed_of_zero(B, v_delayed.dtype)
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

    def delayed_of_zero(self, batch: int, dtype) -> mx.array:
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
        out = attend(queries, keys, values, kv_cache, scale=self.scale, mask=mask)
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

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        """The normalised hidden states [B, L, H] of the tokens, through the plain ops; caches updated."""
        B, L = tokens.shape
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


def _steppable(cache: list, fused: bool) -> bool:
    """Whether the decode step (fused or not) takes this cache: mlx-lm's KVCache or BatchKVCache, or for the fused
    step alone a QuantizedKVCache or BatchQuantizedKVCache (its attention kernel reads the packed keys and values;
    the plain step writes unquantized buffers, so a quantized cache's plain steps take the plain forward, whose
    attention reads it with quantized_matmul); and no right-padded prefill under way (an ArraysCache with lengths,
    which only the plain forward follows)."""
    kv, conv = cache[0][0], cache[0][1]
    kinds = (KVCache, BatchKVCache, QuantizedKVCache, BatchQuantizedKVCache) if fused else (KVCache, BatchKVCache)
    return type(kv) in kinds and conv.lengths is None


class Model(nn.Module):
    def __init__(self, args: ZayaConfig, decode: Optional[DecodeOptions] = None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.decoder = FusedDecoder(decode or DecodeOptions())  # a plain attribute: not a parameter
        self.model = ZayaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.lm_head_bias)

    @property
    def decode_options(self) -> DecodeOptions:
        """How one-token steps run (see DecodeOptions); assign new options to change it."""
        return self.decoder.options

    @decode_options.setter
    def decode_options(self, options: DecodeOptions) -> None:
        self.decoder.options = options

    def prepare_decode(self) -> bool:
        """Make the decision the model's first call makes, ahead of that call: on a GPU the fused step's kernels
        compile (on CUDA in every process, seconds a kernel) and run their check against the plain ops. Returns
        whether one-token steps run fused. For a program that waits for input before its first request."""
        return self.decoder.enabled(self)

    def __call__(self, tokens: mx.array, cache=None, last_only: bool = False) -> mx.array:
        """float32 logits [B, L, V]; last_only: of the last position alone ([B, 1, V]), as generation needs after a
        prompt (the logits of a long prompt, B x L x 262,272 floats, would not fit in memory, nor in one kernel's
        index range). A one-token step with a cache of ours (``make_cache``) runs the fused decode step where the
        options say so, else the plain decode step (zaya_mlx/decode); a quantized KV cache's steps run fused, or
        else through the plain forward (see _steppable); everything else, the plain forward."""
        fused = self.decoder.enabled(self)
        if tokens.shape[1] == 1 and cache is not None and _steppable(cache, fused):
            h = self.decoder(self, tokens, cache, fused=fused)
        else:
            h = self.model(tokens, cache)
        if last_only:
            h = h[:, -1:]
        if fused:
            logits = kernels.lm_head(h, self.head, impl=self.decode_options.impl)
        else:
            logits = kernels.lm_head_reference(h, self.head)
        return logits.astype(mx.float32)

    @property
    def head(self) -> nn.Module:
        """The LM head: its own linear layer, or the tied embedding."""
        return self.lm_head if "lm_head" in self else self.model.embed_tokens

    @property
    def layers(self):
        return self.model.layers

    def update(self, parameters: dict, strict: bool = True):
        self.decoder.reset()
        return super().update(parameters, strict)

    def update_modules(self, modules: dict, strict: bool = True):
        self.decoder.reset()
        return super().update_modules(modules, strict)

    def make_cache(self, batch_left_padding: Optional[list] = None, kv_bits: Optional[int] = None) -> list:
        """One mlx-lm `CacheList(kv, conv)` per layer; a left-padded batch gets a `BatchKVCache`. kv_bits: keys and
        values quantized to 8 or 4 bits as they are written (mlx-lm's `QuantizedKVCache`, or for a left-padded batch
        a `BatchQuantizedKVCache`; zaya_mlx/kv_cache.py)."""
        check_kv_heads(self.args.head_dim, kv_bits)

        def kv():
            if batch_left_padding is not None:
                if kv_bits is not None:
                    return BatchQuantizedKVCache(list(batch_left_padding), KV_GROUP_SIZE, kv_bits)
                return BatchKVCache(list(batch_left_padding))
            return KVCache() if kv_bits is None else QuantizedKVCache(KV_GROUP_SIZE, kv_bits)

        return [CacheList(kv(), ArraysCache(2)) for _ in self.layers]

    def sanitize(self, weights: dict) -> dict:
        """Any supported checkpoint layout -> canonical MLX names (mlx-lm calls this on load)."""
        return layouts.to_canonical(weights, self.args)
