"""The plain decode step's graph: its size a layer, counted as `zaya bench` counts it, against the design's budget.

Parity of the step with transformers is in test_parity.py (token-by-token decode runs it) and with the fused step
in test_kernels.py; here, the invariant that makes it fast: few graph primitives a layer.
"""

from dataclasses import replace

import mlx.core as mx
import pytest

from zaya_mlx.benchmark import build_zaya, count_primitives, graph_primitives, small_config
from zaya_mlx.decode import DecodeOptions

# Graph primitives a layer of the plain step, with each mx.fast op (RMSNorm, RoPE, attention) one primitive as on a
# GPU, by the design (decode/plain.py), before compile fuses elementwise neighbours:
#   CCA and attention 28: in_proj; the window (slice, expand, concatenate); the convs as one matmul a head group
#     (reshape, matmul, sum, squeeze); the residual as one matrix over heads (reshape, broadcast, matmul, expand);
#     add, RMSNorm, temperature, RoPE, q and k slices; the value (slice, concatenate, reshape); two cache writes;
#     attention; reshape and o_proj; the new conv state and delayed value (two slices)
#   the two residuals and their norms 4
#   router 15: down-projection and the previous state, RMSNorm, fc1 and fc2 (matmul, bias + gelu), out_proj,
#     float32, softmax, balancing biases, argmax, squeeze, the expert index; the row's expand for the gather
#   expert 8: gather, split, SwiGLU, gather, squeeze, the choice's weight (broadcast, gather, skip + scale)
# = 55. On the CPU, MLX's gather_mm of a dense float32 stack runs as take + matmul (3 more primitives a gather).
LAYER_BUDGET = 56
FAST_OPS_A_LAYER = {"rms_norm": 4, "rope": 1, "sdpa": 1}


def _model(layers: int, quant):
    config = small_config()
    config = replace(config, num_hidden_layers=layers, layer_types=(config.layer_types * layers)[:layers])
    model = build_zaya(config, quant, seed=1, dtype=mx.bfloat16 if quant else mx.float32)
    model.decode_options = DecodeOptions(fused=False)
    return model


def _fallback_primitives(model) -> dict:
    """Primitives each mx.fast op of a layer takes on this back end (1 on a GPU; on the CPU, its fallback ops),
    at the layer's shapes, inputs evaluated."""
    a = model.args
    dtype = model.layers[0].input_layernorm.weight.dtype
    x, w = mx.ones((1, a.hidden_size), dtype), mx.ones((a.hidden_size,), dtype)
    heads = mx.ones((1, a.num_attention_heads + a.num_key_value_heads, 1, a.head_dim), dtype)
    q = mx.ones((1, a.num_attention_heads, 1, a.head_dim), dtype)
    kv = mx.ones((1, a.num_key_value_heads, 256, a.head_dim), dtype)
    mask, offset = mx.arange(256)[None, None, None] < 9, mx.array([8], mx.int32)
    mx.eval(x, w, heads, q, kv, mask, offset)
    rope_dims = a.rope_dims(model.layers[0].layer_type)
    ops = {
        "rms_norm": (lambda x, w: mx.fast.rms_norm(x, w, 1e-5), x, w),
        "rope": (lambda t, o: mx.fast.rope(t, rope_dims, traditional=False, base=1e4, scale=1.0, offset=o), heads,
                 offset),
        "sdpa": (lambda q, k, m: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1, mask=m), q, kv, mask),
    }
    return {name: graph_primitives(mx.compile(f)(*args))[0] for name, (f, *args) in ops.items()}


@pytest.mark.parametrize("quant", [None, "mxfp4"])
def test_plain_step_stays_within_its_primitive_budget_a_layer(quant):
    counts = {}
    for layers in (2, 3):
        model = _model(layers, quant)
        counts[layers], kinds, _ = count_primitives(model, model.make_cache, batch=1)
        assert not any("Conv" in k for k in kinds), kinds  # the convs run as one matmul
    fallback = _fallback_primitives(model)
    per_layer = counts[3] - counts[2] - sum(n * (fallback[op] - 1) for op, n in FAST_OPS_A_LAYER.items())
    assert 0 < per_layer <= LAYER_BUDGET, (per_layer, counts, fallback)

