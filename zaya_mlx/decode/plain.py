"""The plain decode step: one token per sequence through MLX ops only, every layer in one function.

What the model runs for one-token steps where the fused kernels do not (``DecodeOptions(kernels=False)``, the CPU,
or a GPU where the kernels failed their check). The same function as the plain forward, built for few graph
primitives a layer:

- The two causal CCA convolutions of one new token are linear in the last S+1 q/k inputs, so they fold into one
  matrix per head group (``conv_as_matmul``): the depthwise and grouped convs become one batched matmul.
- One ``in_proj`` gives q, k and both value halves; q and k are normalised, scaled and rotated together.
- The key and value go into the cache's buffers with ``slice_update`` at a position the step takes as an array,
  and attention masks the whole buffer with one mask a layer type, made once a step: nothing in the function
  depends on the step, so one compiled function serves every position until the buffers grow.
- The expert is a quantized (or dense) gather of the one chosen expert, the skip choice a zero weight.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

from ..kernels.experts import gather_matmul
from ..kernels.weights import as_stack


def conv_as_matmul(dw_w, dw_b, gw_w, gw_b, groups: int):
    """The causal depthwise conv (dw_w [C, t0, 1], dw_b [C]) then grouped conv (gw_w [C, t1, C/groups], gw_b [C]),
    evaluated for the last of S+1 = t0+t1-1 inputs, as one matrix a group: returns W [groups, (S+1)*d, d] (d =
    C/groups; rows ordered position-major) and bias [groups, d], both float32, such that the convs' output for
    group g is ``window_g.reshape(-1) @ W[g] + bias[g]``, window_g [S+1, d] being the group's channels."""
    C, t0, _ = dw_w.shape
    t1, d = gw_w.shape[1], gw_w.shape[2]
    dw = dw_w[:, :, 0].astype(mx.float32).reshape(groups, d, t0)  # [g, in, i]
    gw = gw_w.astype(mx.float32).reshape(groups, d, t1, d)  # [g, out, j, in]
    taps = [mx.zeros((groups, d, d), mx.float32) for _ in range(t0 + t1 - 1)]  # [g, in, out] per input position
    for j in range(t1):
        for i in range(t0):
            taps[j + i] = taps[j + i] + (gw[:, :, j, :] * dw[:, None, :, i]).swapaxes(1, 2)
    w = mx.concatenate(taps, axis=1)
    bias = gw_b.astype(mx.float32).reshape(groups, d) + mx.einsum(
        "gojc,gc->go", gw, dw_b.astype(mx.float32).reshape(groups, d))
    mx.eval(w, bias)
    return w, bias


def attention_masks(capacity: int, filled, left_padding, windows) -> dict:
    """Boolean [B, 1, 1, capacity] masks over the KV buffers, one per sliding window size (None: full attention):
    positions [0, filled) less each row's left padding, and for a window the last ``window`` of them."""
    k = mx.arange(capacity)
    seen = (k < filled) & (k[None] >= left_padding[:, None])
    return {w: (seen if w is None else seen & (k > filled - 1 - w))[:, None, None, :] for w in windows}


def residual_mix(n_heads: int, n_kv_heads: int) -> mx.array:
    """[G, G] (G = n_heads + n_kv_heads heads, queries first): the CCA residual path as one matrix over heads.
    A query head gets (q + its KV head's k) / 2, a key head the mean of that over its query heads."""
    rep = n_heads // n_kv_heads
    mix = mx.zeros((n_heads + n_kv_heads, n_heads + n_kv_heads), mx.float32)
    for j in range(n_kv_heads):
        k = n_heads + j
        qs = slice(j * rep, (j + 1) * rep)
        mix[qs, qs] = mx.eye(rep) * 0.5
        mix[qs, k] = 0.5
        mix[k, qs] = 0.5 / rep
        mix[k, k] = 0.5
    return mix


def _transposed(lin):
    """A dense linear layer's weight as [in, out], so a step multiplies by it without a transpose (None where the
    layer is quantized: quantized_matmul reads it transposed as it is)."""
    return None if "scales" in lin else mx.contiguous(lin.weight.T)


def _linear(lin, w_t, x):
    y = lin(x) if w_t is None else x @ w_t
    return y + lin.bias if w_t is not None and "bias" in lin else y


class _Layer:
    """A decoder layer as the plain step runs it, on [B, H] rows, with the weights it derives once."""

    def __init__(self, layer, window, rows: mx.array):
        attn = layer.self_attn
        proj = attn.qkv_proj
        dw, gw = proj.conv_qk_depthwise, proj.conv_qk_grouped
        self.layer, self.window, self.rows = layer, window, rows
        self.groups = G = attn.n_heads + attn.n_kv_heads
        d = attn.head_dim
        dtype = layer.input_layernorm.weight.dtype
        w, b = conv_as_matmul(dw.weight, dw.bias, gw.weight, gw.bias, G)
        # per input position and head group: [1, S+1, G, d, d], which a window [B, S+1, G, 1, d] multiplies
        self.conv_w = w.reshape(G, -1, d, d).swapaxes(0, 1)[None].astype(dtype)
        self.conv_b = b[:, None, :].astype(dtype)
        self.mix = residual_mix(attn.n_heads, attn.n_kv_heads).astype(dtype)
        # QKNorm scales q and k to norm sqrt(d), x * sqrt(d) / max(|x|, eps): an RMSNorm, x / sqrt(|x|^2 / d + e),
        # with e = eps^2 / d, which differs only where |x| is within a few eps of zero
        self.l2_eps = float(mx.finfo(dtype).eps) ** 2 / d
        # the key temperature as a factor per head: 1 for the query heads
        self.temp = mx.concatenate([mx.ones((attn.n_heads,), dtype), attn.qk_norm.temp.astype(dtype)])[:, None, None]
        gate = layer.mlp.gate
        mlp = gate.router_mlp
        self.router = [(lin, _transposed(lin)) for lin in (gate.down_proj, mlp.fc1, mlp.fc2, mlp.out_proj)]
        self.state_scale = gate.router_states_scale if "router_states_scale" in gate else None
        mx.eval(self.conv_w, self.conv_b, self.mix, self.temp, [t for _, t in self.router if t is not None])

    def attention(self, x, keys, values, state, v_prev, positions, start, mask):
        """CCA, the cache write, attention and o_proj for normed rows x [B, H]. Returns (o_proj's output, keys,
        values, conv state, delayed value)."""
        attn = self.layer.self_attn
        proj = attn.qkv_proj
        nh, nkv, d, G = attn.n_heads, attn.n_kv_heads, attn.head_dim, self.groups
        B = x.shape[0]
        qkv = proj.in_proj(x)  # [B, C + 2 * v_half]: q, k, then both value halves
        C, vh = proj.q_dim + proj.k_dim, proj.v_half
        qk = qkv[:, :C]
        window = mx.concatenate([state, qk[:, None]], axis=1)  # [B, S+1, C]
        conv = (window.reshape(B, window.shape[1], G, 1, d) @ self.conv_w).sum(axis=1)  # [B, G, 1, d]
        qk = conv + self.conv_b + (self.mix @ qk.reshape(B, G, d))[:, :, None]
        qk = mx.fast.rms_norm(qk, None, self.l2_eps) * self.temp
        if attn.rope.dims > 0:
            qk = attn.rope(qk, offset=positions)
        value = mx.concatenate([qkv[:, C : C + vh], v_prev], axis=-1).reshape(B, nkv, 1, d)
        keys = mx.slice_update(keys, qk[:, nh:], start, axes=(2,))
        values = mx.slice_update(values, value, start, axes=(2,))
        out = mx.fast.scaled_dot_product_attention(qk[:, :nh], keys, values, scale=attn.scale, mask=mask)
        return attn.o_proj(out.reshape(B, nh * d)), keys, values, window[:, 1:], qkv[:, C + vh :]

    def moe(self, x, router_state):
        """The router and the chosen expert for normed rows x [B, H]. Returns (the expert's output, router state)."""
        gate, experts = self.layer.mlp.gate, self.layer.mlp.experts
        (down, down_t), (fc1, fc1_t), (fc2, fc2_t), (out, out_t) = self.router
        r = _linear(down, down_t, x)
        if self.state_scale is not None:
            r = r + router_state * self.state_scale
        a = gate.router_mlp.norm(r)
        a = nn.gelu(_linear(fc2, fc2_t, nn.gelu(_linear(fc1, fc1_t, a))))
        probs = mx.softmax(_linear(out, out_t, a).astype(mx.float32), axis=-1)
        E = experts.num_experts
        choice = mx.argmax(probs + gate.balancing_biases, axis=-1, keepdims=True)
        weight = mx.where(choice < E, mx.take_along_axis(probs, choice, axis=-1), 0.0)  # the skip choice weighs 0
        idx = mx.minimum(choice[:, 0], E - 1)
        gate_up = gather_matmul(x[:, None], as_stack(experts.gate_up_proj), idx, self.rows)
        y = gather_matmul(swiglu(*mx.split(gate_up, 2, axis=-1)), as_stack(experts.down_proj), idx, self.rows)
        return y[:, 0] * weight.astype(y.dtype), r

    def __call__(self, h, router_state, cache, positions, start, masks):
        layer = self.layer
        dtype = layer.input_layernorm.weight.dtype
        out, *cache = self.attention(layer.input_layernorm(h.astype(dtype)), *cache, positions, start,
                                     masks[self.window])
        h = layer.post_attention_residual_scale(out, h)
        y, router_state = self.moe(layer.post_attention_layernorm(h.astype(dtype)), router_state)
        return layer.post_mlp_residual_scale(y, h), router_state, cache


def plain_step(model, batch: int, compiled: bool):
    """The plain decode step for the model's current weights and a batch size: a function (tokens [B, 1],
    positions [B] int32, filled [1] int32, left_padding [B] int32, caches: a list per layer of [keys, values, conv
    state, delayed value]) -> (the final normed hidden states [B, 1, H], the new caches), compiled or not."""
    args, inner = model.args, model.model
    rows = mx.arange(batch, dtype=mx.uint32)
    layers = [_Layer(layer, args.sliding_window if layer.layer_type == "hybrid_sliding" else None, rows)
              for layer in model.layers]
    windows = {layer.window for layer in layers}

    def step(tokens, positions, filled, left_padding, caches):
        h = inner.embed_tokens(tokens[:, 0])
        h = ((h + inner.input_hidden_states_bias) * inner.input_hidden_states_scale).astype(mx.float32)
        masks = attention_masks(caches[0][0].shape[2], filled, left_padding, windows)
        start = filled - 1
        router_state, new = None, []
        for layer, cache in zip(layers, caches):
            h, router_state, cache = layer(h, router_state, cache, positions, start, masks)
            new.append(cache)
        return inner.norm(h.astype(inner.norm.weight.dtype))[:, None], new

    return mx.compile(step) if compiled else step
