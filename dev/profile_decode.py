"""Where one decode step's time goes, op by op, on full-size ZAYA1-8B shapes with random weights.

    python dev/profile_decode.py --quant mxfp4 --batch 1 [--copies 200] [--json out.json]

Each op of a decode layer (in_proj, the CCA kernel, KV-cache update, attention (and mx.fast's for
comparison), o_proj, residual + norm, router, the experts with and without their router, the LM head) is built
N times on distinct inputs and evaluated as one graph, and three times are taken per op: building the graph in
Python, encoding it (``mx.async_eval`` returns once every node is encoded and submitted) and waiting for the
GPU (``mx.synchronize``). Divided by N, encode + wait is what one node costs when nodes run back to back, so an
op far above the others' few microseconds is bound by its GPU work, not by the host. The whole step is split the
same way.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx.core as mx  # noqa: E402

from zaya_mlx import kernels  # noqa: E402
from zaya_mlx.benchmark import build_zaya, full_config, small_config  # noqa: E402
from zaya_mlx.decode import kv_capacity  # noqa: E402
from zaya_mlx.decode.step import _attention, _mlp_block  # noqa: E402


def timed(make, copies: int) -> dict:
    """µs per copy: build, encode (async_eval), GPU wait, and their sum past the build."""
    mx.eval(make(0))  # compile kernels, warm caches
    mx.synchronize()
    t0 = time.perf_counter()
    outs = [make(i) for i in range(copies)]
    t1 = time.perf_counter()
    mx.async_eval(outs)
    t2 = time.perf_counter()
    mx.synchronize()
    t3 = time.perf_counter()
    us = 1e6 / copies
    return {"build": (t1 - t0) * us, "encode": (t2 - t1) * us, "wait": (t3 - t2) * us, "run": (t3 - t1) * us}


def profile(quant: str, batch: int, copies: int, context: int, small: bool = False) -> dict:
    config = small_config() if small else full_config()
    model = build_zaya(config, quant)
    layer, nxt = model.layers[1], model.layers[0]  # layer 1: its router reads the previous state
    attn = layer.self_attn
    B, H = batch, config.hidden_size
    dtype = mx.bfloat16

    def many(shape, dt=dtype):
        a = [mx.random.normal(shape).astype(dt) for _ in range(copies)]
        mx.eval(a)
        return a

    x, h = many((B, 1, H)), many((B, 1, H), mx.float32)
    proj = attn.qkv_proj
    qkv = many((B, 1, proj.q_dim + proj.k_dim + 2 * proj.v_half))
    state = many((B, proj.state_size, proj.q_dim + proj.k_dim))
    vprev = many((B, proj.v_half))
    out = many((B, 1, attn.n_heads * attn.head_dim))  # attention's output, o_proj's input
    q = many((B, attn.n_heads, 1, attn.head_dim))
    capacity = kv_capacity(context + 1)  # as the fused step sizes its buffers
    kv = [mx.random.normal((B, attn.n_kv_heads, capacity, attn.head_dim)).astype(dtype) for _ in range(2)]
    mx.eval(kv)
    positions = kernels.offset_array(context, B)
    filled, lpad = mx.array([context], mx.int32), kernels.constant((0,) * B, mx.int32)
    gate, experts = layer.mlp.gate, layer.mlp.experts
    r_prev = many((B, 1, config.router_hidden_size))
    r_state = many((B, 1, config.router_hidden_size))
    choice = [mx.array([[i % config.num_experts] * 1] * B, mx.int32) for i in range(copies)]
    weight = [mx.full((B, 1), 0.5, mx.float32) for _ in range(copies)]
    mx.eval(choice, weight)
    res, norm, down = layer.post_attention_residual_scale, layer.post_attention_layernorm, gate.down_proj
    router = gate.kernel_weights()
    embed = model.model.embed_tokens
    tokens = [mx.array([[i * 97 % config.vocab_size]] * B, mx.int32) for i in range(copies)]
    mx.eval(tokens)

    ops = {
        "in_proj": lambda i: proj.in_proj(x[i]),
        "cca_kernel": lambda i: kernels.cca_decode_step(
            qkv[i], state[i], vprev[i], proj.conv_qk_depthwise.weight, proj.conv_qk_depthwise.bias,
            proj.conv_qk_grouped.weight, proj.conv_qk_grouped.bias, attn.qk_norm.temp, positions, kv[0], kv[1],
            filled, n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, rope_dims=attn.rope.dims,
            rope_base=attn.rope.base),
        "cca+attention": lambda i: _attention(nxt, qkv[i], state[i], vprev[i], positions, kv[0], kv[1], filled,
                                              lpad, None)[0],
        f"attention ctx{context}": lambda i: kernels.decode_attention(q[i], kv[0], kv[1], filled, scale=attn.scale),
        f"sdpa ctx{context} (mx.fast)": lambda i: mx.fast.scaled_dot_product_attention(
            q[i], kv[0][..., :context, :], kv[1][..., :context, :], scale=attn.scale),
        "o_proj": lambda i: attn.o_proj(out[i]),
        "residual_norm+router_down": lambda i: kernels.residual_norm(
            x[i], h[i], res.hidden_states_scale, res.hidden_states_bias, res.residual_scale, res.residual_bias,
            norm.weight, norm.eps, down, prev_state=(r_prev[i], gate.router_states_scale)),
        "residual_norm+in_proj": lambda i: kernels.residual_norm(
            x[i], h[i], res.hidden_states_scale, res.hidden_states_bias, res.residual_scale, res.residual_bias,
            norm.weight, norm.eps, proj.in_proj),
        "residual_norm": lambda i: kernels.residual_norm(
            x[i], h[i], res.hidden_states_scale, res.hidden_states_bias, res.residual_scale, res.residual_bias,
            norm.weight, norm.eps),
        "router_mlp": lambda i: kernels.router_mlp(r_state[i], router),
        "experts (kernels)": lambda i: kernels.expert_gather(x[i], choice[i], weight[i], experts.gate_up_proj,
                                                             experts.down_proj),
        "router+experts (kernel)": lambda i: kernels.routed_expert_gather(
            x[i], r_state[i], router, experts.gate_up_proj, experts.down_proj),
        "experts (gather_qmm)": lambda i: kernels.expert_gather(x[i], choice[i], weight[i], experts.gate_up_proj,
                                                                experts.down_proj, impl="reference"),
        "mlp_block (compiled)": None,
        "embedding": lambda i: embed(tokens[i]),
        "lm_head": lambda i: embed.as_linear(x[i]),
        "lm_head+argmax": lambda i: mx.argmax(embed.as_linear(x[i]), axis=-1),
    }
    # into: nothing; each call makes new outputs
    block = mx.compile(lambda o, hh, r: _mlp_block(layer, o, hh, r, (None,) * 4, nxt.input_layernorm))
    ops["mlp_block (compiled)"] = lambda i: block(out[i], h[i], r_prev[i])
    results = {}
    for name, make in ops.items():
        results[name] = timed(make, copies)
        r = results[name]
        print(f"{name:28s} build {r['build']:7.1f}  encode {r['encode']:7.1f}  wait {r['wait']:7.1f}  "
              f"run {r['run']:7.1f} µs/op", flush=True)

    # the whole step, split the same way
    cache = model.make_cache()
    tok = mx.argmax(model(mx.random.randint(0, config.vocab_size, (B, context)).astype(mx.int32), cache)[:, -1:],
                    axis=-1).astype(mx.int32)
    mx.eval(tok)
    steps = []
    for _ in range(8):
        mx.synchronize()
        t0 = time.perf_counter()
        tok = mx.argmax(model(tok, cache), axis=-1).astype(mx.int32)
        t1 = time.perf_counter()
        mx.async_eval(tok)
        t2 = time.perf_counter()
        mx.synchronize()
        t3 = time.perf_counter()
        steps.append({"build": 1e3 * (t1 - t0), "encode": 1e3 * (t2 - t1), "wait": 1e3 * (t3 - t2)})
    best = min(steps[3:], key=lambda s: s["build"] + s["encode"] + s["wait"])
    print(f"{'whole step':28s} build {best['build']:7.2f}  encode {best['encode']:7.2f}  wait {best['wait']:7.2f} ms",
          flush=True)
    results["whole step (ms)"] = best
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quant", default="mxfp4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--copies", type=int, default=200)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--json")
    p.add_argument("--small", action="store_true", help="a few-MB model (a smoke run on the CPU)")
    a = p.parse_args()
    print("mlx", mx.__version__, mx.default_device(), "kernels:", kernels.backend(), flush=True)
    results = profile(a.quant, a.batch, a.copies, a.context, a.small)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
