"""The plain decode step's graph: its size a decoded token, counted as `zaya bench` counts it on a GPU, against the
design's budget.

Parity of the step with transformers is in test_parity.py (token-by-token decode runs it) and with the fused step
in test_kernels.py; here, the invariant that makes it fast: few graph primitives a layer. The count is the nodes
`mx.export_to_dot` writes for one step (benchmark.count_primitives), with each mx.fast op (RMSNorm, RoPE,
attention) one node as on a GPU: on this CPU MLX expands them into their fallback ops, so the test stands a
one-node op in for each while the step is traced. A count of nodes does not depend on the machine, nor on the
model's width: a small model with ZAYA1-8B's layer structure gives ZAYA1-8B's count a layer.
"""

from dataclasses import replace

import mlx.core as mx
import pytest

from zaya_mlx.benchmark import build_zaya, count_primitives, small_config
from zaya_mlx.decode import DecodeOptions

# Graph primitives a layer of the plain step at batch 1 (decode/plain.py), each mx.fast op one:
#   attention 24: the bf16 cast and RMSNorm; in_proj and its split into q/k and the value halves; the window
#     (expand, concatenate, the new conv state's slice); the convs' matmul on the window and the matmul that sums
#     the positions' shares with the residual path and the bias (two reshapes, Matmul, AddMM); RMSNorm, the key
#     temperature and an expand; RoPE and the q/k split; the key's cache write; the value (concatenate, reshape)
#     and its write; attention; reshape and o_proj; the residual scaling
#   MoE 22: the bf16 cast and RMSNorm; the router's down-projection (AddMM) and the previous state; RMSNorm, fc1
#     and fc2 (AddMM, GELU), out_proj; float32, softmax, balancing biases, argmax, the expert index, the choice's
#     probability; gather, split, SwiGLU, gather, reshape; the residual scaling with the choice's weight
# = 46 at MXFP4 (43 with float32 weights, where the casts are no-ops). ZAYA1-8B has 40 layers; once a token
# (embedding, masks, final norm, LM head) comes to ~26 more.
LAYER_BUDGET = 46
LAYERS = 40
TOKEN_BUDGET = 1_870


def _model(layers: int, quant, hidden: int = 256):
    config = small_config()
    config = replace(config, num_hidden_layers=layers, layer_types=(config.layer_types * layers)[:layers],
                     hidden_size=hidden)
    model = build_zaya(config, quant, seed=1, dtype=mx.bfloat16 if quant else mx.float32)
    model.decode_options = DecodeOptions(fused=False)
    return model


@pytest.fixture
def fast_ops_as_one_node(monkeypatch):
    """mx.fast.rms_norm, rope and scaled_dot_product_attention as one graph node each (mx.depends of their inputs;
    the values are wrong, the graph's shape is the GPU's)."""

    def one_node(x, *inputs):
        inputs = [a for a in inputs if isinstance(a, mx.array)]
        return mx.depends([x], inputs or [x])[0]

    monkeypatch.setattr(mx.fast, "rms_norm", lambda x, weight, eps: one_node(x, weight))
    monkeypatch.setattr(mx.fast, "rope", lambda x, dims, **kw: one_node(x, kw.get("offset")))
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention",
                        lambda q, k, v, scale, mask=None, **kw: one_node(q, k, v, mask))


def _counts(quant, hidden=256):
    """(primitives a layer, primitives once a token, their kinds a layer) of the plain step at batch 1."""
    counts = {}
    for layers in (2, 3):
        model = _model(layers, quant, hidden)
        counts[layers] = count_primitives(model, model.make_cache, batch=1)
    per_layer = counts[3][0] - counts[2][0]
    kinds = {k: n - counts[2][1].get(k, 0) for k, n in counts[3][1].items() if n != counts[2][1].get(k, 0)}
    return per_layer, counts[2][0] - 2 * per_layer, kinds


@pytest.mark.parametrize("quant", [None, "mxfp4"])
def test_plain_step_stays_within_its_primitive_budget_a_token(quant, fast_ops_as_one_node):
    per_layer, once, kinds = _counts(quant)
    assert not any("Conv" in k for k in kinds), kinds  # the convs run as one matmul
    assert kinds.get("GatherQMM" if quant else "GatherMM") == 2, kinds  # the experts: one gather a projection
    assert kinds.get("Depends") == 6, kinds  # the stand-ins: 4 RMSNorms, RoPE, attention
    assert 0 < per_layer <= LAYER_BUDGET, (per_layer, kinds)
    assert LAYERS * per_layer + once <= TOKEN_BUDGET, (per_layer, once)


def test_plain_step_primitives_do_not_depend_on_width(fast_ops_as_one_node):
    assert _counts("mxfp4", hidden=128)[:2] == _counts("mxfp4")[:2]
