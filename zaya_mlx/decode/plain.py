"""The plain decode step: one token per sequence through MLX ops only, every layer in one function.

What the model runs for one-token steps where the fused kernels do not (``DecodeOptions(kernels=False)``, the CPU,
or a GPU where the kernels failed their check). The same function as the plain forward, built for few graph
primitives a layer (docs/PERFORMANCE.md counts them):

- One ``in_proj`` gives q, k and both value halves, split in one op.
- The two causal CCA convolutions of one new token are linear in the last S+1 q/k inputs, so they fold into one
  matrix a head group (``conv_as_matmul``), applied to the whole window in one batched matmul that also passes
  the newest input through; one more matmul (``cca_combine``) sums the positions' shares and adds the residual
  path over heads (query heads ``(q + k) / 2``, key heads their mean) and the conv bias.
- q and k are normalised, scaled and rotated together; the key and value go into the cache's buffers with
  ``slice_update`` at a position the step takes as an array, and attention masks the whole buffer with one mask
  a layer type, made once a step: nothing in the function depends on the step, so one compiled function serves
  every position until the buffers grow.
- Dense linear layers multiply by their weights' transposed views with their biases in the same op (AddMM); the
  expert is a quantized (or dense) gather of the one chosen expert, the skip choice a zero weight.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
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
    seen = (k < filled) & (k >= left_padding.reshape(-1, 1, 1, 1))
    return {w: seen if w is None else seen & (k > filled - 1 - w) for w in windows}


def residual_mix(n_heads: int, n_kv_heads: int) -> np.ndarray:
    """[G, G] (G = n_heads + n_kv_heads heads, queries first): the CCA residual path as one matrix over heads.
    A query head gets (q + its KV head's k) / 2, a key head the mean of that over its query heads."""
    rep = n_heads // n_kv_heads
    mix = np.zeros((n_heads + n_kv_heads, n_heads + n_kv_heads), np.float32)
    for j in range(n_kv_heads):
        k = n_heads + j
        qs = slice(j * rep, (j + 1) * rep)
        mix[qs, qs] = np.eye(rep) * 0.5
        mix[qs, k] = 0.5
        mix[k, qs] = 0.5 / rep
        mix[k, k] = 0.5
    return mix


def cca_combine(n_heads: int, n_kv_heads: int, positions: int) -> np.ndarray:
    """[G, positions * G * 2]: the CCA step's q/k for each head from the window's per-head matmul output, whose rows
    are ordered (position, head, half): half 0 a position's share of the convs, half 1 the raw input passed
    through (the newest position's alone is used). A head sums its own conv shares and takes the residual path
    (``residual_mix``) over the newest raw inputs."""
    G = n_heads + n_kv_heads
    m = np.zeros((G, positions, G, 2), np.float32)
    for g in range(G):
        m[g, :, g, 0] = 1.0
    m[:, -1, :, 1] = residual_mix(n_heads, n_kv_heads)
    return m.reshape(G, -1)


def _rows(a: mx.array, batch: int) -> mx.array:
    """A constant broadcast to ``batch`` leading rows and made contiguous, so the step builds no broadcast."""
    return mx.contiguous(mx.broadcast_to(a, (batch, *a.shape)))


class _Linear:
    """A linear layer as the step calls it. A dense one multiplies by its weight's transposed view, its bias
    broadcast to the step's rows and added in the same op (AddMM, rounded once as an affine layer is): both made
    once, so a step builds no transpose or broadcast. A quantized one runs as the layer itself."""

    def __init__(self, lin: nn.Module, batch: int):
        self.layer = lin if "scales" in lin else None
        if self.layer is None:
            self.w_t = lin.weight.T
            self.bias = _rows(lin.bias, batch) if "bias" in lin else None
            mx.eval(self.w_t, self.bias)

    def __call__(self, x):
        if self.layer is not None:
            return self.layer(x)
        return x @ self.w_t if self.bias is None else mx.addmm(self.bias, x, self.w_t)


class _Experts:
    """An expert stack (mlx-lm SwitchLinear, dense or quantized) as the step gathers from it; a dense stack as its
    evaluated transposed view [E, in, out], so a step builds no transpose."""

    def __init__(self, switch: nn.Module):
        self.stack = as_stack(switch)
        self.transposed = isinstance(self.stack, mx.array)
        if self.transposed:
            self.stack = self.stack.swapaxes(-1, -2)
            mx.eval(self.stack)

    def __call__(self, x, idx, rows):
        return gather_matmul(x, self.stack, idx, rows, transposed=self.transposed)


class _Layer:
    """A decoder layer as the plain step runs it, on [B, H] rows, with the weights it derives once."""

    def __init__(self, layer, window, batch: int):
        attn = layer.self_attn
        proj = attn.qkv_proj
        dw, gw = proj.conv_qk_depthwise, proj.conv_qk_grouped
        self.layer, self.window = layer, window
        nh, nkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
        G = nh + nkv
        P = proj.state_size + 1  # window positions
        self.dtype = dtype = layer.input_layernorm.weight.dtype
        self.in_proj, self.o_proj = _Linear(proj.in_proj, batch), _Linear(attn.o_proj, batch)
        self.splits = [proj.q_dim + proj.k_dim, proj.q_dim + proj.k_dim + proj.v_half]  # qk | current v | delayed v
        w, b = conv_as_matmul(dw.weight, dw.bias, gw.weight, gw.bias, G)
        convs = w.reshape(G, P, d, d).swapaxes(0, 1)  # [P, G, in, out]
        newest = mx.concatenate([mx.zeros((P - 1, G, d, d)), mx.broadcast_to(mx.eye(d), (1, G, d, d))])
        # [B, P, G, d, 2d] (a broadcast view): a window [B, P, G, 1, d] times it gives each position's conv share and
        # the newest position's raw input
        self.conv_w = mx.broadcast_to(mx.concatenate([convs, newest], axis=-1).astype(dtype), (batch, P, G, d, 2 * d))
        self.combine = _rows(mx.array(cca_combine(nh, nkv, P)), batch).astype(dtype)  # [B, G, P * G * 2]
        self.conv_b = _rows(b, batch).astype(dtype)  # [B, G, d]
        # QKNorm scales q and k to norm sqrt(d), x * sqrt(d) / max(|x|, eps): an RMSNorm, x / sqrt(|x|^2 / d + e),
        # with e = eps^2 / d, which differs only where |x| is within a few eps of zero
        self.l2_eps = float(mx.finfo(dtype).eps) ** 2 / d
        # the key temperature as a factor per head: 1 for the query heads
        self.temp = mx.concatenate([mx.ones((nh,), dtype), attn.qk_norm.temp.astype(dtype)])[:, None]
        gate = layer.mlp.gate
        mlp = gate.router_mlp
        self.down, self.fc1, self.fc2, self.out = (_Linear(lin, batch) for lin in
                                                   (gate.down_proj, mlp.fc1, mlp.fc2, mlp.out_proj))
        self.state_scale = gate.router_states_scale if "router_states_scale" in gate else None
        self.gate_up, self.experts_down = _Experts(layer.mlp.experts.gate_up_proj), _Experts(layer.mlp.experts.down_proj)
        self.rows = mx.arange(batch, dtype=mx.uint32)[:, None]  # the gathers' lhs rows: [B, 1] for x [B, 1, 1, H]
        mx.eval(self.conv_w, self.combine, self.conv_b, self.temp, self.rows)

    def attention(self, x, keys, values, state, v_prev, positions, start, mask):
        """CCA, the cache write, attention and o_proj for normed rows x [B, H]. Returns (o_proj's output, keys,
        values, conv state, delayed value)."""
        attn = self.layer.self_attn
        nh, nkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
        B = x.shape[0]
        qk, v_now, v_next = mx.split(self.in_proj(x), self.splits, axis=-1)
        window = mx.concatenate([state, qk[:, None]], axis=1)  # [B, P, C]
        P, G = window.shape[1], self.combine.shape[1]
        shares = window.reshape(B, P, G, 1, d) @ self.conv_w  # [B, P, G, 1, 2d]
        qk = mx.addmm(self.conv_b, self.combine, shares.reshape(B, P * G * 2, d))  # [B, G, d]
        qk = (mx.fast.rms_norm(qk, None, self.l2_eps) * self.temp)[:, :, None]
        if attn.rope.dims > 0:
            qk = attn.rope(qk, offset=positions)
        q, k = mx.split(qk, [nh], axis=1)
        value = mx.concatenate([v_now, v_prev], axis=-1).reshape(B, nkv, 1, d)
        keys = mx.slice_update(keys, k, start, axes=(2,))
        values = mx.slice_update(values, value, start, axes=(2,))
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
        return self.o_proj(out.reshape(B, nh * d)), keys, values, window[:, 1:], v_next

    def moe(self, x, router_state):
        """The router and the chosen expert for normed rows x [B, H]. Returns (the expert's output scaled by its
        weight, router state)."""
        gate = self.layer.mlp.gate
        r = self.down(x)
        if self.state_scale is not None:
            r = r + router_state * self.state_scale
        a = gate.router_mlp.norm(r)
        a = nn.gelu(self.fc2(nn.gelu(self.fc1(a))))
        probs = mx.softmax(self.out(a).astype(mx.float32), axis=-1)
        E = self.layer.mlp.experts.num_experts
        choice = mx.argmax(probs + gate.balancing_biases, axis=-1, keepdims=True)  # [B, 1]
        weight = mx.where(choice < E, mx.take_along_axis(probs, choice, axis=-1), 0.0)  # the skip choice weighs 0
        idx = mx.minimum(choice, E - 1)
        B, H = x.shape
        # the gathers take x as B matrices of one row, [B, 1, 1, H]; at B = 1, x [1, H] is that matrix already
        gate_up = self.gate_up(x if B == 1 else x.reshape(B, 1, 1, H), idx, self.rows)  # [B, 1, 1, 2I]
        y = self.experts_down(swiglu(*mx.split(gate_up, 2, axis=-1)), idx, self.rows).reshape(B, H)
        return y * weight.astype(y.dtype), r

    def __call__(self, h, router_state, cache, positions, start, masks):
        layer = self.layer
        out, *cache = self.attention(layer.input_layernorm(h.astype(self.dtype)), *cache, positions, start,
                                     masks[self.window])
        h = layer.post_attention_residual_scale(out, h)
        y, router_state = self.moe(layer.post_attention_layernorm(h.astype(self.dtype)), router_state)
        return layer.post_mlp_residual_scale(y, h), router_state, cache


def plain_step(model, batch: int, compiled: bool):
    """The plain decode step for the model's current weights and a batch size: a function (tokens [B, 1],
    positions [B] int32, filled [1] int32, left_padding [B] int32, caches: a list per layer of [keys, values, conv
    state, delayed value]) -> (the final normed hidden states [B, 1, H], the new caches), compiled or not."""
    args, inner = model.args, model.model
    layers = [_Layer(layer, args.sliding_window if layer.layer_type == "hybrid_sliding" else None, batch)
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
