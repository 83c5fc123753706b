"""Tools for measuring the decode step beyond `zaya bench`: another port to compare with, and the host's floor.

- vMLX's ZAYA port (its ``models/zaya.py``, given as a file, or the installed ``vmlx`` package) built with the
  same shapes and random weights, so both ports' decode rates come from one run;
- every custom kernel body emptied (``empty_kernels``): the same graph with no GPU work in our kernels, so a step's
  time is the host's floor (building and encoding the graph) plus MLX's own ops.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx.core as mx  # noqa: E402

from zaya_mlx import benchmark  # noqa: E402
from zaya_mlx.config import ZayaConfig  # noqa: E402
from zaya_mlx.kernels import _build  # noqa: E402
from zaya_mlx.quantization import load_recipe  # noqa: E402
from zaya_mlx.sizes import expert_weight_bytes, kv_bytes_per_token, weight_bytes  # noqa: E402

VMLX_QUANTIZED_PATHS = re.compile(
    r"(switch_mlp|qkv\.linear_q|qkv\.linear_k|qkv\.val_proj|self_attn\.o_proj|embed_tokens|lm_head)")


def load_vmlx_module(path: str | None = None):
    """vMLX's ZAYA model module: from a copy of its models/zaya.py, or from the installed package."""
    if path:
        spec = importlib.util.spec_from_file_location("vmlx_zaya", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["vmlx_zaya"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module("vmlx_engine.models.zaya")


def build_vmlx(mod, config: ZayaConfig, quant: str | None = None, seed: int = 0):
    """vMLX's port (Zyphra's legacy 80-layer layout: attention and MoE alternate) with the same shapes."""
    mx.random.seed(seed)
    args = mod.ModelArgs(
        hidden_size=config.hidden_size, num_hidden_layers=2 * config.num_hidden_layers,
        ffn_hidden_size=2 * config.moe_intermediate_size, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, num_query_groups=config.num_key_value_heads,
        cca_num_q_heads=config.num_attention_heads, kv_channels=config.head_dim, vocab_size=config.vocab_size,
        num_experts=config.num_experts, zaya_mlp_expansion=config.router_hidden_size,
    )
    model = mod.Model(args)
    for layer in model.layers:
        if getattr(layer, "self_attn", None) is not None:
            layer.self_attn.qkv.temp = mx.ones_like(layer.self_attn.qkv.temp)
    benchmark.materialize(model)
    quantize_vmlx(model, quant)
    mx.eval(model.parameters())
    return model


def quantize_vmlx(model, recipe: str | None) -> None:
    """vMLX's port quantized where a recipe quantizes ours (its own module names), in the recipe's expert format."""
    if not recipe or recipe in benchmark.UNQUANTIZED:
        return
    fmt = load_recipe(recipe).format_for("model.layers.0.mlp.experts.gate_up_proj", 1).to_config()

    def pred(path, module):
        return (hasattr(module, "to_quantized") and bool(VMLX_QUANTIZED_PATHS.search(path)) and ".gate." not in path
                and "router" not in path and fmt)

    import mlx.nn as nn

    nn.quantize(model, class_predicate=pred)


def bench_vmlx(config: ZayaConfig, quant: str | None, mod, context: int = 256, steps: int = 16, log=print,
               runs: int = 1, bandwidth: float | None = None) -> benchmark.Result:
    """vMLX's port at batch 1 (its bf16 KV cache), measured as `zaya bench` measures a row."""
    model = build_vmlx(mod, config, quant)
    total, experts = weight_bytes(model), expert_weight_bytes(model)
    read = benchmark.weights_read(total, experts, config.num_experts, 1)
    res = benchmark.Result("vMLX ZAYA port", quant or "bf16", str(mx.default_device()), total / 1e9, read / 1e9)
    kv = res.kv_bytes_per_token["bf16"] = kv_bytes_per_token(config, mx.bfloat16.size)
    row = benchmark.measure_row(model, model.make_cache, 1, context, "bf16", steps=steps, runs=runs,
                                vocab=config.vocab_size, chunk=2048, bytes_per_step=read + context * kv,
                                bandwidth=bandwidth)
    res.rows.append(row)
    log(f"  1 x {context}: {row.line()}")
    del model
    gc.collect()
    mx.clear_cache()
    return res


@contextlib.contextmanager
def empty_kernels(model, bodies=None):
    """Every custom kernel body emptied (or those of ``bodies``, file names in metal/), for the model's fused decode:
    the same graph with no GPU work in those kernels. With all emptied, a step's time is the host's floor (building
    and encoding the graph) plus MLX's own ops; with some, what a step saves without their GPU work."""
    source = _build._source
    # the body stays in the source, out of the compiler's sight: MLX-CUDA hashes a kernel's source at every launch,
    # so the floor's kernels must be as long as the real ones, helpers included
    _build._source = lambda name: (source(name) if name.startswith("prelude") or name == "common.h"
                                   or (bodies is not None and name not in bodies)
                                   else "#if 0\n" + source(name) + "\n#endif\n")
    reset_kernels(model)
    try:
        yield
    finally:
        _build._source = source
        reset_kernels(model)


def reset_kernels(model):
    """Assemble the kernels anew at the next step: drop the built ones and the model's step functions, which hold
    the kernels they traced."""
    _build.get_kernel.cache_clear()
    model.decoder.reset()
