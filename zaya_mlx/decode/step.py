"""The fused decode step: one token per sequence, each layer in 4 graph primitives instead of ~100.

The same function as the plain model's forward for one token, one launch each for: residual scaling + RMSNorm +
the router's down-projection (plus the previous layer's router state), the router MLP and the expert MLP, residual
scaling + RMSNorm + the next layer's in_proj, and the CCA decode step (which also writes the key and value into the
cache) with attention and o_proj (zaya_mlx/kernels, sources in metal/; shapes that launch does not cover take one
more, the CCA step on its own). On the CPU, or with ``DecodeOptions(kernels=False)``, the kernels' plain-MLX
references run in their place. docs/PERFORMANCE.md says why the step is built this way.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from .. import kernels
from .cache import StepCache, positions_held
from .options import DecodeOptions
from .plain import plain_step

# The fused step rounds differently from the plain ops: ~1e-2 of the largest logit at full size
# (docs/PERFORMANCE.md); a kernel that fails computes garbage, far above this.
CHECK_TOLERANCE = 0.1


class FusedDecoder:
    """A model's fused decode step: its options, the step functions built for the model's current weights, whether
    the step passed its check on each back end, and a StepCache for each model cache it has stepped (dropped with
    the cache)."""

    def __init__(self, options: DecodeOptions):
        self.options = options
        self._steps: dict = {}  # (back end, compiled, kernels, group_experts_from) -> the step functions
        self._checked: dict = {}  # back end -> whether the step passed its check
        self._caches = weakref.WeakKeyDictionary()  # a cache's first KV cache -> its StepCache

    def reset(self) -> None:
        """Drop what was built or checked for the model's weights and kernels, once either changes: the compiled
        steps (which hold the weights as constants, and the kernels they traced) and the check (another weight
        format runs other kernel variants)."""
        self._steps.clear()
        self._checked.clear()

    @property
    def checked(self) -> dict:
        """Back end -> whether the fused step passed its check there, for the checks run so far."""
        return dict(self._checked)

    def enabled(self, model) -> bool:
        """Whether one-token steps run fused: as the options say, or (fused=None) on a GPU back end with the kernels
        on, once the check passes (``works``)."""
        o = self.options
        if o.fused is not None:
            return o.fused
        return o.kernels and kernels.backend() != "cpu" and self.works(model)

    def works(self, model) -> bool:
        """Whether the fused step and the LM head kernel pass their check on this back end, run once for the model's
        weights on the first call that would use them: two tokens through them on a throwaway cache against the
        plain ops. Their CUDA twins are tested on NVIDIA GPUs, but a kernel that fails to build on another GPU, or
        computes garbage, would end or corrupt a generation. Where the check fails, this warns once and the model
        decodes through the plain ops."""
        back = kernels.backend()
        if back not in self._checked:
            why = self.check(model)
            if why is not None:
                warnings.warn(f"zaya-mlx: the fused decode kernels failed their check on this {back} GPU ({why}); "
                              "decoding through plain MLX ops instead, which is slower (ZAYA_FUSED=1 forces them)",
                              RuntimeWarning, stacklevel=4)
            self._checked[back] = why is None
        return self._checked[back]

    def check(self, model) -> Optional[str]:
        """None if two decode steps through the fused step and the LM head kernel give the plain ops' logits (after a
        short prompt through the plain ops), else why not."""
        vocab = model.args.vocab_size
        prompt = mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32) % vocab
        tok = mx.array([[6]], dtype=mx.int32) % vocab
        impl = self.options.impl
        try:
            fused_cache, plain_cache = model.make_cache(), model.make_cache()
            for cache in (fused_cache, plain_cache):
                mx.eval(model.model(prompt, cache))
            for _ in range(2):
                fused = kernels.lm_head(self(model, tok, fused_cache), model.head, impl=impl).astype(mx.float32)
                plain = kernels.lm_head_reference(model.model(tok, plain_cache), model.head).astype(mx.float32)
                err = (mx.abs(fused - plain).max() / mx.maximum(mx.abs(plain).max(), 1e-30)).item()
                if not err <= CHECK_TOLERANCE:  # NaN too
                    return f"its logits differ from the plain ops' by {err:.3g} of the largest"
                tok = mx.argmax(plain[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)
        except RuntimeError as e:  # how MLX reports a kernel that does not build or launch
            message = str(e).strip()
            return message.splitlines()[0][:200] if message else "RuntimeError"
        return None

    def step_cache(self, cache: list) -> StepCache:
        """The StepCache of a model cache, made at its first fused step."""
        key = cache[0][0]
        state = self._caches.get(key)
        if state is None:
            state = self._caches[key] = StepCache()
        return state

    def __call__(self, model, tokens: mx.array, cache: list, fused: bool = True) -> mx.array:
        """One decode step for tokens [B, 1]: the normalised last hidden states [B, 1, H], caches updated; through
        the fused step, or (fused=False) the plain one (decode/plain.py), which the same buffers serve.

        The step is one function per layer boundary (the previous layer's residual + norm + router down-projection,
        router and experts, residual + next norm + the next layer's in_proj, then its CCA step with the cache write,
        attention and o_proj), compiled once per batch size and KV buffer size: the write position and the
        attention length are an array the kernels read on the GPU, so nothing in a function depends on the step.
        """
        B = tokens.shape[0]
        kv0 = cache[0][0]
        held = positions_held(kv0)
        if isinstance(kv0, BatchKVCache):
            lpad = kv0.left_padding.astype(mx.int32)
        else:
            lpad = kernels.constant((0,) * B, mx.int32)
        positions = kernels.offset_array(kv0.offset, B)
        filled = mx.array([held + 1], dtype=mx.int32)

        layers = model.layers
        dtype = layers[0].input_layernorm.weight.dtype
        attn = layers[0].self_attn
        state = self.step_cache(cache)
        pairs = [(c[0], c[1]) for c in cache]  # (KV cache, conv cache) a layer: each c[i] is a Python call
        for i, (layer, (kv, conv)) in enumerate(zip(layers, pairs)):
            state.own_kv_buffers(i, kv, held, (B, attn.n_kv_heads, attn.head_dim), dtype)
            if conv[0] is None or conv[1] is None:  # a cache that has seen no token yet
                proj = layer.self_attn.qkv_proj
                if conv[0] is None:
                    conv[0] = mx.zeros((B, proj.state_size, proj.q_dim + proj.k_dim), dtype)
                if conv[1] is None:
                    conv[1] = proj.delayed_of_zero(B, dtype)

        if fused:
            h = self._fused(model, tokens, state, pairs, positions, filled, lpad)
        else:
            h = self._plain(model, tokens, pairs, positions, filled, lpad)
        offset = kv0.offset + 1
        for i, (kv, _) in enumerate(pairs):
            state.advance(i, kv, held, offset)
        return h

    def _fused(self, model, tokens, state: StepCache, pairs, positions, filled, lpad) -> mx.array:
        args, layers = model.args, model.layers
        B = tokens.shape[0]
        attn = layers[0].self_attn
        steps = self._step_functions(model)
        bufs = state.step_buffers(B, args.hidden_size, args.router_hidden_size, attn.n_heads, attn.head_dim,
                                  layers[0].input_layernorm.weight.dtype)
        kv, conv = pairs[0]
        h, out, kv.keys, kv.values, conv[0], conv[1] = steps[0](tokens, bufs.q, bufs.last, conv[0], conv[1],
                                                                positions, kv.keys, kv.values, filled, lpad)
        r = bufs.no_state
        for i in range(1, len(layers)):
            kv, conv = pairs[i]
            h, r, out, kv.keys, kv.values, conv[0], conv[1] = steps[i](out, h, r, bufs.last, *bufs.mlp_into(i - 1),
                                                                       bufs.q, conv[0], conv[1], positions, kv.keys,
                                                                       kv.values, filled, lpad)
        bufs.last = steps[-1](out, h, r, bufs.last, *bufs.mlp_into(len(layers) - 1))
        return bufs.last

    def _plain(self, model, tokens, pairs, positions, filled, lpad) -> mx.array:
        """The plain step (decode/plain.py). The cache's arrays are handed over, not kept here, so the step's slice
        updates may write into their buffers rather than copy them."""
        key = ("plain", self.options.compile, tokens.shape[0])
        if key not in self._steps:
            self._steps[key] = plain_step(model, tokens.shape[0], self.options.compile)
        caches = []
        for kv, conv in pairs:
            caches.append([kv.keys, kv.values, conv[0], conv[1]])
            kv.keys = kv.values = None
        h, caches = self._steps[key](tokens, positions, filled, lpad, caches)
        for (kv, conv), (keys, values, conv_state, v_prev) in zip(pairs, caches):
            kv.keys, kv.values, conv[0], conv[1] = keys, values, conv_state, v_prev
        return h

    def _step_functions(self, model) -> list:
        """The step's functions, one per layer boundary: [from the token ids, after layer 0, ..., after the last].

        Built once per back end and options for the model's weights. A compiled function holds the weights it
        closed over as constants, so replacing weights through the model's ``update`` or ``update_modules``
        (``load_weights``, ``nn.quantize``) drops them (``reset``); weights assigned to a submodule's
        attribute directly are not seen.
        """
        o = self.options
        key = (kernels.backend(), o.compile, o.kernels, o.group_experts_from)
        if key not in self._steps:
            self._steps[key] = [_step_function(model, i, o) for i in range(-1, len(model.layers))]
        return self._steps[key]


def _step_function(model, i: int, options: DecodeOptions):
    """The function from layer i's attention output to layer i+1's (i = -1: from the token ids; the last layer:
    to the final norm)."""
    layers, inner, impl = model.layers, model.model, options.impl
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    cur = layers[i] if i >= 0 else None
    window = None
    if nxt is not None and nxt.layer_type == "hybrid_sliding":
        window = model.args.sliding_window
    if i < 0:
        def fn(tokens, q_into, last, state, v_prev, positions, keys, values, filled, lpad):
            h = inner.embed_tokens(tokens)
            h = ((h + inner.input_hidden_states_bias) * inner.input_hidden_states_scale).astype(mx.float32)
            qkv = nxt.self_attn.qkv_proj.in_proj(nxt.input_layernorm(h.astype(nxt.input_layernorm.weight.dtype)))
            return (h, *_attention(nxt, qkv, state, v_prev, positions, keys, values, filled, lpad, window, impl,
                                   q_into, last))
    elif nxt is None:
        def fn(out, h, r, last, *into):
            h, x, r = _mlp_block(cur, out, h, r, into, inner.norm, impl=impl, after=last if i == 0 else None,
                                 grouped=options.groups_experts(h.shape[0]))
            return x
    else:
        def fn(out, h, r, last, h_attn, h_mlp, r_into, zeros, q_into, state, v_prev, positions, keys, values, filled,
               lpad):
            into = (h_attn, h_mlp, r_into, zeros)
            h, qkv, r = _mlp_block(cur, out, h, r, into, nxt.input_layernorm, nxt.self_attn.qkv_proj.in_proj,
                                   impl=impl, after=last if i == 0 else None,
                                   grouped=options.groups_experts(h.shape[0]))
            return (h, r, *_attention(nxt, qkv, state, v_prev, positions, keys, values, filled, lpad, window, impl,
                                      q_into))
    return mx.compile(fn) if options.compile else fn


def _attention(layer, qkv, state, v_prev, positions, keys, values, filled, lpad, window, impl="auto", q_into=None,
               after=None):
    """From in_proj's output: the CCA step (which writes the new key and value into the cache), attention and
    o_proj, in one launch where the kernel covers the shapes (kernels.cca_decode_attention). q_into: an array the
    CCA step may write the query into (StepBuffers.q), or None; after: an array the CCA step must run after.
    Returns (o_proj's output as partial sums [B, P, H] float32 (see kernels.decode_attention), the keys and values
    buffers, the new conv state, the new delayed value)."""
    attn = layer.self_attn
    proj = attn.qkv_proj
    dw, gw = proj.conv_qk_depthwise, proj.conv_qk_grouped
    return kernels.cca_decode_attention(
        qkv, state, v_prev, dw.weight, dw.bias, gw.weight, gw.bias, attn.qk_norm.temp, positions, keys, values, filled,
        n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, rope_dims=attn.rope.dims,
        rope_base=attn.rope.base, scale=attn.scale, left_padding=lpad, window=window, o_proj=attn.o_proj,
        q_into=q_into, after=after, impl=impl,
    )


def _mlp_block(layer, o, h, router_state, into, next_norm, next_proj=None, impl="auto", after=None, grouped=False):
    """From o_proj's output (partial sums, see _attention): residual, MoE, residual, then next_norm (the next
    layer's input norm or the final norm) and next_proj (the next layer's in_proj, or None), in kernels. A dense
    router runs inside the expert kernel, or (grouped: the expert kernel's grouped form, for a batch) in its own
    launch before it; a quantized one through its plain ops. into: the arrays the kernels write
    in place (StepBuffers.mlp_into): the residual stream after attention and after the MoE, this layer's router
    state, and the expert kernel's zero row; after: an array the first of them must run after (layer 0: the last
    step's output). Returns (h, next_proj(next_norm(h)) or next_norm(h), router state)."""
    h_attn, h_mlp, r_into, z_into = into
    gate, experts = layer.mlp.gate, layer.mlp.experts
    res, norm = layer.post_attention_residual_scale, layer.post_attention_layernorm
    prev = (router_state, gate.router_states_scale) if "router_states_scale" in gate else None
    mlp = gate.router_mlp
    router = None if any("scales" in lin for lin in (mlp.fc1, mlp.fc2, mlp.out_proj)) else gate.kernel_weights()
    # The router state is written in place only where the expert kernel routes: that kernel also takes x, which orders
    # it after this launch. The router's own kernel or ops would take the state alone, and could run before it.
    if r_into is not None and (impl == "reference" or router is None or grouped or not kernels.routed_kernel_supported(
            h, r_into, router, experts.gate_up_proj, experts.down_proj)):
        r_into = None
    # r: the router's down-projection plus the previous layer's state; dtype: the activation dtype (the step casts)
    # zeros: the row the expert kernel adds its sum into, in place (no fill of a new output)
    h, x, r, zeros = kernels.residual_norm(
        o, h, res.hidden_states_scale, res.hidden_states_bias, res.residual_scale, res.residual_bias, norm.weight,
        norm.eps, gate.down_proj, dtype=norm.weight.dtype, prev_state=prev, zeros=True, into=(h_attn, r_into, z_into),
        after=after, impl=impl,
    )

    if router is None:  # quantized router: its plain ops
        choice, weight, _ = gate.route(r, None)
        y, after = kernels.expert_gather(x, choice, weight, experts.gate_up_proj, experts.down_proj, into=zeros,
                                         grouped=grouped, impl=impl)
    else:
        y, after = kernels.routed_expert_gather(x, r, router, experts.gate_up_proj, experts.down_proj, into=zeros,
                                                grouped=grouped, impl=impl)

    res = layer.post_mlp_residual_scale
    h, x, qkv = kernels.residual_norm(  # y: the expert kernel's float32 sum; after: runs this after its adds
        y, h, res.hidden_states_scale, res.hidden_states_bias, res.residual_scale, res.residual_bias,
        next_norm.weight, next_norm.eps, next_proj, dtype=x.dtype, after=after, normed=next_proj is None,
        into=(h_mlp, None, None), impl=impl,
    )
    return h, (x if qkv is None else qkv), r
