"""Tiny random ZAYA checkpoints, written at test time, in every layout the loader reads.

Plain helpers (no pytest here) so any test file can import them:

- `TINY`: transformers `ZayaConfig` kwargs per variant.
- `make_reference(variant, seed)`: transformers' `ZayaForCausalLM` in fp32 with every parameter moved off its
  trivial init (norms, residual scales, key temperatures, conv, router biases), so a port that ignores any of
  them fails parity.
- `write_transformers_checkpoint`, `write_legacy_checkpoint`, `write_tokenizer`, `write_fixture_model`.
- `load_reference(folder)`: the torch reference rebuilt from a transformers-layout folder with `load_state_dict`
  (never `from_pretrained`, which resets `balancing_biases`).
- `route_counts(model, ids)`: how the reference routes each token (expert index, or `num_experts` for skip).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import ZayaConfig, ZayaForCausalLM

PAD_ID, EOS_TOKEN_ID, BOS_ID, IM_END_ID = 0, 1, 2, 106

_BASE = dict(
    vocab_size=384,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=1,
    moe_intermediate_size=32,
    router_hidden_size=16,
    cca_time0=2,
    cca_time1=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=IM_END_ID,
    layer_types=["hybrid"] * 3,
)

# transformers ZayaConfig kwargs per variant. "mqa" also has num_heads * head_dim != hidden_size, so the legacy
# config's `num_attention_heads` (hidden // head_dim) differs from `cca_num_q_heads`: a loader that reads the
# wrong one fails.
TINY = {
    "base": dict(_BASE),
    "sliding": dict(_BASE, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"], sliding_window=5),
    "cca3": dict(_BASE, cca_time0=3, cca_time1=2),
    "cca3t1": dict(_BASE, cca_time0=2, cca_time1=3),
    "mqa": dict(_BASE, num_key_value_heads=1, head_dim=8),
    "skipheavy": dict(_BASE),
    # For the quantizer: every quantized dim fits group sizes 16..64 (the base expert intermediate, 32, does not
    # fit group 64, which the skipped-tensor test relies on).
    "quant": dict(_BASE, moe_intermediate_size=128),
    # For partly quantized folders: the expert down projection's last dim (40) fits no group size (16, 32, 64), so
    # every recipe keeps it unquantized beside quantized gate/up projections.
    "ragged": dict(_BASE, moe_intermediate_size=40),
    # For the quantized KV cache: heads of 64 values, one quantization group each.
    "kvheads": dict(_BASE, head_dim=64),
}
# The variants the parity suite runs over ("quant" only changes a size).
VARIANTS = ("base", "sliding", "cca3", "cca3t1", "mqa", "skipheavy")

# Balancing bias of the skip class per variant (the expert entries get small random values). With the router
# weights below, 0.0 sends roughly a fifth of tokens to skip; 0.15 sends most but not all.
SKIP_BIAS = {"skipheavy": 0.15}

# The transformers-layout names that are not written because embeddings are tied.
TIED = ("lm_head.weight",)


def make_config(variant: str) -> ZayaConfig:
    """The transformers config of a tiny variant (eager attention: the simplest reference path)."""
    config = ZayaConfig(**copy.deepcopy(TINY[variant]))
    config._attn_implementation = "eager"
    return config


def _perturb(model: ZayaForCausalLM, variant: str, seed: int) -> None:
    """Give every parameter a random, non-trivial value with O(1) activations throughout."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name == "lm_head.weight":
                continue  # tied to the embedding
            if name.endswith("embed_tokens.weight"):
                p.copy_(randn(*p.shape))
            elif "norm" in name and leaf == "weight" and p.ndim == 1:
                p.copy_(1.0 + 0.1 * randn(*p.shape))  # RMSNorm weights
            elif leaf in ("hidden_states_scale", "residual_scale", "input_hidden_states_scale"):
                p.copy_(1.0 + 0.1 * randn(*p.shape))
            elif leaf in ("hidden_states_bias", "residual_bias", "input_hidden_states_bias"):
                p.copy_(0.1 * randn(*p.shape))
            elif leaf == "temp":
                p.copy_(0.5 + 1.5 * torch.rand(*p.shape, generator=gen))  # init is 0, which kills the keys
            elif leaf == "router_states_scale":
                p.copy_(1.0 + 0.2 * randn(*p.shape))
            elif leaf == "gate_up_proj":
                p.copy_(randn(*p.shape) / math.sqrt(cfg.hidden_size))
            elif leaf == "down_proj" and p.ndim == 3:
                p.copy_(randn(*p.shape) / math.sqrt(cfg.moe_intermediate_size))
            elif leaf == "bias":
                p.copy_(0.1 * randn(*p.shape))
            elif leaf == "weight" and "conv_qk" in name:
                fan_in = p.shape[1] * p.shape[2]  # torch conv layout [out, in/groups, kernel]
                p.copy_(randn(*p.shape) / math.sqrt(fan_in))
            elif leaf == "weight" and p.ndim == 2:
                p.copy_(randn(*p.shape) / math.sqrt(p.shape[1]))  # Linear [out, in]
            else:
                raise AssertionError(f"fixture does not know how to perturb {name}")
        skip_bias = SKIP_BIAS.get(variant, 0.0)
        for layer in model.model.layers:
            biases = layer.mlp.gate.balancing_biases
            biases.copy_(0.02 * randn(*biases.shape))
            biases[-1] = skip_bias


def make_reference(variant: str = "base", seed: int = 0) -> ZayaForCausalLM:
    """transformers' ZayaForCausalLM for a tiny variant, fp32, eval mode, random non-trivial weights."""
    torch.manual_seed(seed)
    model = ZayaForCausalLM(make_config(variant)).float().eval()
    _perturb(model, variant, seed)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def reference_state_dict(model: ZayaForCausalLM) -> dict[str, torch.Tensor]:
    """The tensors a transformers checkpoint holds: every state-dict entry except the tied lm_head."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in TIED}


def _cast(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Cast to the checkpoint dtype; balancing biases stay fp32 as in the real checkpoints."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return {
        k: (v.float() if k.endswith("balancing_biases") else v.to(torch_dtype)).contiguous()
        for k, v in tensors.items()
    }


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, shards: int) -> list[str]:
    """One `model.safetensors` when shards == 1, else n shards and `model.safetensors.index.json`."""
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    per = math.ceil(len(names) / shards)
    files, weight_map = [], {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s * per : (s + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_transformers_checkpoint(model: ZayaForCausalLM, folder, shards: int = 2, dtype: str = "float32") -> Path:
    """transformers' layout: config.json as save_pretrained writes it, sharded safetensors with an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = ["ZayaForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(folder)
    _write_safetensors(_cast(reference_state_dict(model), dtype), folder, shards)
    return folder


def legacy_name_map(config: ZayaConfig) -> dict[str, str]:
    """transformers name -> Zyphra legacy name (ZAYA1-8B-legacy: 2L alternating attention/MoE layers)."""
    names = {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.final_norm.weight",
        "model.input_hidden_states_scale": "model.layers.0.res_scale.hidden_states_scale",
        "model.input_hidden_states_bias": "model.layers.0.res_scale.hidden_states_bias",
    }
    n = config.num_hidden_layers
    rs = ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")
    for k in range(n):
        t, a, m = f"model.layers.{k}.", f"model.layers.{2 * k}.", f"model.layers.{2 * k + 1}."
        after_mlp = f"model.layers.{2 * k + 2}.res_scale." if k + 1 < n else "model.res_scale."
        names[t + "input_layernorm.weight"] = a + "input_norm.weight"
        for src, dst in (
            ("q_proj", "linear_q"),
            ("k_proj", "linear_k"),
            ("v_proj_current", "val_proj1"),
            ("v_proj_delayed", "val_proj2"),
        ):
            names[t + f"self_attn.qkv_proj.{src}.weight"] = a + f"self_attn.qkv.{dst}.weight"
        for src, dst in (("conv_qk_depthwise", "conv_qk.0"), ("conv_qk_grouped", "conv_qk.1")):
            for leaf in ("weight", "bias"):
                names[t + f"self_attn.qkv_proj.{src}.{leaf}"] = a + f"self_attn.qkv.{dst}.{leaf}"
        names[t + "self_attn.qk_norm.temp"] = a + "self_attn.qkv.temp"
        names[t + "self_attn.o_proj.weight"] = a + "self_attn.o_proj.weight"
        names[t + "post_attention_layernorm.weight"] = m + "input_norm.weight"
        g, r = t + "mlp.gate.", m + "zaya_block.router."
        for leaf in ("weight", "bias"):
            names[g + f"down_proj.{leaf}"] = r + f"down_proj.{leaf}"
            names[g + f"router_mlp.fc1.{leaf}"] = r + f"router_mlp.0.{leaf}"
            names[g + f"router_mlp.fc2.{leaf}"] = r + f"router_mlp.2.{leaf}"
        names[g + "router_mlp.norm.weight"] = r + "rmsnorm_eda.weight"
        names[g + "router_mlp.out_proj.weight"] = r + "router_mlp.4.weight"
        names[g + "balancing_biases"] = r + "balancing_biases"
        if k > 0:
            names[g + "router_states_scale"] = r + "router_states_scale"
        for leaf in rs:
            names[t + f"post_attention_residual_scale.{leaf}"] = m + f"res_scale.{leaf}"
            names[t + f"post_mlp_residual_scale.{leaf}"] = after_mlp + leaf
    return names


def legacy_config(config: ZayaConfig) -> dict:
    """Zyphra's original config.json for the same model (80-layer style: attention and MoE as separate layers)."""
    sliding = [k for k, t in enumerate(config.layer_types) if t == "hybrid_sliding"]
    # One entry per original layer (attention, then MoE): the window minus one where attention slides, else 0.
    swa = []
    for t in config.layer_types:
        swa += [config.sliding_window - 1 if t == "hybrid_sliding" else 0, 0]
    rope = config.rope_parameters
    out = {
        "model_type": "zaya",
        "architectures": ["ZayaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": 2 * config.num_hidden_layers,
        "num_attention_heads": config.hidden_size // config.head_dim,
        "cca_num_q_heads": config.num_attention_heads,
        "num_query_groups": config.num_key_value_heads,
        "kv_channels": config.head_dim,
        "ffn_hidden_size": 2 * config.moe_intermediate_size,
        "num_experts": config.num_experts,
        "moe_router_topk": config.num_experts_per_tok,
        "zaya_mlp_expansion": config.router_hidden_size,
        "zaya_use_mod": True,
        "zaya_use_eda": True,
        "cca_time0": config.cca_time0,
        "cca_time1": config.cca_time1,
        "norm_epsilon": config.rms_norm_eps,
        "rope_theta": rope["hybrid"]["rope_theta"],
        "partial_rotary_factor": rope["hybrid"]["partial_rotary_factor"],
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": True,
        "swa_layers": swa,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }
    if sliding:
        out["swa_rotary_base"] = rope["hybrid_sliding"]["rope_theta"]
    return out


def write_legacy_checkpoint(model: ZayaForCausalLM, folder, shards: int = 1, dtype: str = "float32") -> Path:
    """Zyphra's original layout: legacy config.json and names; experts split per expert."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = reference_state_dict(model)
    names = legacy_name_map(model.config)
    tensors = {}
    for name, value in state.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            k = int(name.split(".")[2])
            fc = "linear_fc1" if name.endswith("gate_up_proj") else "linear_fc2"
            for e in range(value.shape[0]):
                tensors[f"model.layers.{2 * k + 1}.zaya_block.experts.local_experts.{e}.{fc}.weight"] = value[e].clone()
        else:
            tensors[names[name]] = value
    (folder / "config.json").write_text(json.dumps(legacy_config(model.config), indent=2) + "\n")
    _write_safetensors(_cast(tensors, dtype), folder, shards)
    return folder


# The MLX bundles in Zyphra's names: where their stacked experts live, and what their converters quantize.
STACKED_EXPERTS = {"vmlx": "zaya_block.experts.switch_mlp.", "mlx-lm-zaya": "zaya_block.experts."}
QUANT_GROUP = 64


def bundle_quantization(layout: str) -> dict:
    """The config block each converter writes: vMLX bundles (OsaurusAI) 4-bit affine with an 8-bit embedding;
    mlx_lm.convert -q 4-bit affine."""
    block = {"group_size": QUANT_GROUP, "bits": 4, "mode": "affine"}
    if layout == "vmlx":
        block["model.embed_tokens"] = {"group_size": QUANT_GROUP, "bits": 8, "mode": "affine"}
    return block


def _bundle_format(layout: str, name: str, shape) -> dict | None:
    """Whether a converter quantizes a tensor (in Zyphra's names): every Linear, Embedding and SwitchLinear weight
    whose input dim fits the group (mlx_lm.convert's rule), but mlx-lm's own model keeps its router."""
    if not name.endswith(".weight") or len(shape) < 2 or "conv_qk" in name or shape[-1] % QUANT_GROUP:
        return None
    if layout == "mlx-lm-zaya" and ".router." in name:
        return None
    block = bundle_quantization(layout)
    return block.get(name[: -len(".weight")], {k: block[k] for k in ("group_size", "bits", "mode")})


def write_bundle_checkpoint(model: ZayaForCausalLM, folder, layout: str, quantized: bool, shards: int = 2
                            ) -> ZayaForCausalLM:
    """A vMLX (OsaurusAI) or mlx-lm `zaya.py` bundle: Zyphra's 80-layer config and names, the experts stacked by
    projection, fp32; quantized as its converter does when `quantized`. Returns the fp32 torch reference of the
    weights as stored (dequantized where quantized: quantization is per row, so quantizing a transformers tensor
    and cutting it into Zyphra's pieces gives the converter's result)."""
    import mlx.core as mx
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    names = legacy_name_map(cfg)
    inter = cfg.moe_intermediate_size
    tensors, stored_state = {}, {}
    for name, value in reference_state_dict(model).items():
        w = mx.array(value.float().numpy())
        if ".mlp.experts." in name:
            p = f"model.layers.{2 * int(name.split('.')[2]) + 1}.{STACKED_EXPERTS[layout]}"
            if name.endswith("gate_up_proj"):
                pieces = [(p + "gate_proj.weight", slice(0, inter)), (p + "up_proj.weight", slice(inter, 2 * inter))]
            else:
                pieces = [(p + "down_proj.weight", slice(None))]
        else:
            pieces = [(names[name], slice(None))]
        fmt = _bundle_format(layout, pieces[0][0], w.shape) if quantized else None
        if fmt is None:
            parts = {"": w}
            stored_state[name] = value.float()
            if layout == "mlx-lm-zaya" and "conv_qk" in pieces[0][0] and name.endswith(".weight"):
                parts[""] = w.swapaxes(1, 2)  # mlx_lm.convert saves after its sanitize: MLX's conv layout
        else:
            q = mx.quantize(w, group_size=fmt["group_size"], bits=fmt["bits"], mode=fmt["mode"])
            parts = dict(zip(("", ".scales", ".biases"), q))
            stored = mx.dequantize(*q, group_size=fmt["group_size"], bits=fmt["bits"], mode=fmt["mode"])
            stored_state[name] = torch.from_numpy(np.array(stored))
        for piece, rows in pieces:
            for suffix, a in parts.items():
                a = a[:, rows] if a.ndim == 3 else a
                key = piece[: -len(".weight")] + suffix if suffix else piece
                tensors[key] = torch.from_numpy(np.ascontiguousarray(np.array(a)))
    config = legacy_config(cfg)
    if quantized:
        config["quantization"] = config["quantization_config"] = bundle_quantization(layout)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_safetensors(tensors, folder, shards)
    reference = ZayaForCausalLM(make_config_of(cfg)).float().eval()
    missing, unexpected = reference.load_state_dict(stored_state, strict=False)
    assert not unexpected and set(missing) <= set(TIED), (missing, unexpected)
    reference.tie_weights()
    return reference


def make_config_of(config: ZayaConfig) -> ZayaConfig:
    """A copy of a transformers config, eager attention."""
    out = copy.deepcopy(config)
    out._attn_implementation = "eager"
    return out


def read_safetensors_folder(folder) -> dict[str, torch.Tensor]:
    """All tensors of a folder (single file or index + shards), as stored."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def load_reference(folder) -> ZayaForCausalLM:
    """The torch reference rebuilt from a transformers-layout folder with load_state_dict (fp32, eval)."""
    folder = Path(folder)
    config = ZayaConfig(**{k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                           if k not in ("transformers_version", "architectures", "dtype", "model_type")})
    config._attn_implementation = "eager"
    model = ZayaForCausalLM(config).float().eval()
    state = {k: v.float() for k, v in read_safetensors_folder(folder).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(TIED), (missing, unexpected)
    model.tie_weights()
    return model


@torch.no_grad()
def reference_logits(model: ZayaForCausalLM, ids) -> torch.Tensor:
    """fp32 logits [B, L, V] of the full sequences, no cache."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def route_counts(model: ZayaForCausalLM, ids) -> torch.Tensor:
    """Counts [num_layers, num_experts + 1] of routing choices on `ids` (last column: skip), via router hooks."""
    from transformers.models.zaya.modeling_zaya import ZayaRouter

    choices = []

    def hook(module, args, output):
        probs = torch.softmax(output[0].float(), dim=-1)
        choices.append(torch.argmax(probs + module.balancing_biases, dim=-1))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ZayaRouter)]
    try:
        reference_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    classes = model.config.num_experts + 1
    return torch.stack([torch.bincount(c, minlength=classes) for c in choices])


# bf16 weights (default dtype) vs the fp32 reference, as fractions of max |logit|. Measured on these fixtures
# (MLX and torch bf16 alike): the median position is off by ~0.5%; a position where a near-tie in the router
# flips the expert is off by up to ~8-10%, and so are the positions attending to it. Bounds: 3x the median, 1.5x
# the worst flip; and the fp32 argmax wherever its top-2 margin is clear (> 10%, ~95% of positions).
BF16_MEDIAN_RTOL = 0.015
BF16_MAX_RTOL = 0.15
BF16_CLEAR_MARGIN = 0.1


def assert_bf16_close(got, want, what: str) -> None:
    """bf16 logits `got` against fp32 reference logits `want` (numpy): within the bounds above, and the same
    argmax wherever the reference's top-2 margin is clear."""
    scale = float(np.abs(want).max())
    per_position = np.abs(got - want).max(axis=-1) / scale
    assert np.median(per_position) <= BF16_MEDIAN_RTOL, f"{what}: median error {np.median(per_position):.4f}"
    assert per_position.max() <= BF16_MAX_RTOL, f"{what}: worst position error {per_position.max():.4f}"
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > BF16_CLEAR_MARGIN * scale
    assert clear.mean() > 0.8, "fixture margins too small for the argmax check to mean anything"
    agree = got.argmax(-1) == want.argmax(-1)
    assert agree[clear].all(), f"{what}: argmax differs at {np.argwhere(clear & ~agree).tolist()}"


def fixture_ids(seed: int = 1, length: int = 20, batch: int = 1, vocab: int = 384) -> list[list[int]]:
    """Random token ids avoiding the pad id 0 (the ids tests feed both models)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


# --- tokenizer -------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    101: "<zyphra_tool_call>",
    102: "</zyphra_tool_call>",
    103: "<zyphra_tool_response>",
    104: "</zyphra_tool_response>",
    105: "<|im_start|>",
    106: "<|im_end|>",
    107: "<think>",
    108: "</think>",
}

# ZAYA's Qwen-style chat format; `enable_thinking=False` closes an empty think block (qwen3 convention).
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'Tools:\\n' }}{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<zyphra_tool_response>' + message['content'] + '</zyphra_tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '<zyphra_tool_call>' + {'name': fn['name'], 'arguments': fn['arguments']} | tojson + '</zyphra_tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Multi-byte merges so the tokenizer is a real BPE (prefix of each merge is itself a token).
_MERGE_WORDS = ["Ġt", "Ġth", "Ġthe", "he", "in", "ing", "er", "an", "and", "Ġa", "Ġw", "on", "re", "Ġs", "is",
                "Ġi", "Ġis", "ou", "Ġo", "Ġh", "Ġhe", "at", "en", "it", "ĊĊ", "Ġ\u0120"]


def write_tokenizer(folder) -> Path:
    """A byte-level BPE tokenizer (any text round-trips) with ZAYA's special tokens at their ids, vocab < 384."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in SPECIAL_TOKENS.items()}
    free = (i for i in range(384) if i not in SPECIAL_TOKENS)
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = next(free)
    merges = []
    for word in _MERGE_WORDS:
        left, right = word[:-1], word[-1]
        assert left in vocab and right in vocab and word not in vocab, word
        merges.append((left, right))
        vocab[word] = next(free)
    assert max(vocab.values()) < 384 and len(set(vocab.values())) == len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(SPECIAL_TOKENS.items())])
    for i, t in SPECIAL_TOKENS.items():
        assert tok.token_to_id(t) == i, t
    tok.save(str(folder / "tokenizer.json"))

    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in sorted(SPECIAL_TOKENS.items())
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<|im_end|>", "pad_token": "<pad>"}, indent=2) + "\n")
    return folder


def write_fixture_model(folder, variant: str = "base", layout: str = "transformers", dtype: str = "float32",
                        seed: int = 0, with_tokenizer: bool = True, shards: int | None = None) -> ZayaForCausalLM:
    """Write a tiny checkpoint folder (plus tokenizer) and return its fp32 torch reference."""
    model = make_reference(variant, seed)
    if layout == "transformers":
        write_transformers_checkpoint(model, folder, shards=2 if shards is None else shards, dtype=dtype)
    elif layout == "legacy":
        write_legacy_checkpoint(model, folder, shards=1 if shards is None else shards, dtype=dtype)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if with_tokenizer:
        write_tokenizer(folder)
    return model


def copy_with_context(src, folder, context: int) -> Path:
    """A copy of the checkpoint folder `src` at `folder` whose config allows `context` positions."""
    folder = Path(folder)
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = context
    (folder / "config.json").write_text(json.dumps(config))
    return folder
