"""One declarative name map per checkpoint layout, to the canonical MLX names (docs/ARCHITECTURE.md).

A map is `{canonical name: Source(source names, combine)}`; the same maps drive loading a whole checkpoint,
mlx-lm's `sanitize`, and the quantizer's shard-by-shard reading. A module stored quantized (`.scales`, and
`.biases` for affine, beside its `.weight`) maps its scales and biases the way it maps its weight: every combine
joins whole rows, which quantization leaves independent. `canonical_quantization` renames the checkpoint's
per-module quantization config the same way.
"""

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import mlx.core as mx

from .config import ZayaConfig
from .errors import ZayaError

RESIDUAL_FIELDS = ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")
ROUTER_MLP = ("norm.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "out_proj.weight")


def same(tensors):
    return tensors[0]


def conv_to_mlx(tensors):
    """torch Conv1d weight (out, in/groups, kernel) -> MLX (out, kernel, in/groups)."""
    return tensors[0].swapaxes(1, 2)


def concat_rows(tensors):
    return mx.concatenate(tensors, axis=0)


def stack(tensors):
    return mx.stack(tensors)


def concat_expert_rows(tensors):
    """Stacked experts [E, out, in] joined along their rows: gate and up -> the gate_up projection."""
    return mx.concatenate(tensors, axis=1)


@dataclass(frozen=True)
class Source:
    names: tuple
    combine: Callable = same


def _rename(source: str) -> Source:
    return Source((source,))


def transformers_map(cfg: ZayaConfig) -> dict:
    """transformers' `ZayaForCausalLM` (the current `Zyphra/ZAYA1-8B`)."""
    m = {
        "model.embed_tokens.weight": _rename("model.embed_tokens.weight"),
        "model.input_hidden_states_scale": _rename("model.input_hidden_states_scale"),
        "model.input_hidden_states_bias": _rename("model.input_hidden_states_bias"),
        "model.norm.weight": _rename("model.norm.weight"),
    }
    params = ["weight", "bias"] if cfg.attention_bias else ["weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn.qkv_proj."
        for w in params:
            m[a + f"in_proj.{w}"] = Source(
                tuple(a + f"{n}.{w}" for n in ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")), concat_rows)
        for conv in ("conv_qk_depthwise", "conv_qk_grouped"):
            m[a + f"{conv}.weight"] = Source((a + f"{conv}.weight",), conv_to_mlx)
            m[a + f"{conv}.bias"] = _rename(a + f"{conv}.bias")
        for w in params:
            m[p + f"self_attn.o_proj.{w}"] = _rename(p + f"self_attn.o_proj.{w}")
        m[p + "self_attn.qk_norm.temp"] = _rename(p + "self_attn.qk_norm.temp")
        names = ["input_layernorm.weight", "post_attention_layernorm.weight",
                 "mlp.gate.down_proj.weight", "mlp.gate.down_proj.bias", "mlp.gate.balancing_biases"]
        names += [f"mlp.gate.router_mlp.{n}" for n in ROUTER_MLP]
        names += [f"{s}.{f}" for s in ("post_attention_residual_scale", "post_mlp_residual_scale") for f in RESIDUAL_FIELDS]
        if i > 0:
            names.append("mlp.gate.router_states_scale")
        for n in names:
            m[p + n] = _rename(p + n)
        for e in ("gate_up_proj", "down_proj"):
            m[p + f"mlp.experts.{e}.weight"] = _rename(p + f"mlp.experts.{e}")
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = _rename("lm_head.weight")
    return m


def legacy_map(cfg: ZayaConfig) -> dict:
    """Zyphra's original layout (`Zyphra/ZAYA1-8B-legacy`): one tensor per expert, torch's conv layout."""
    return _zyphra_map(cfg, _local_experts, conv_to_mlx)


def vmlx_map(cfg: ZayaConfig) -> dict:
    """The bundles vMLX-family runtimes read (`OsaurusAI/ZAYA1-8B-MXFP4`): Zyphra's names, the experts stacked as
    `zaya_block.experts.switch_mlp.{gate,up,down}_proj` (an mlx-lm `SwitchGLU`), torch's conv layout (their
    loader moves the conv axes on every load)."""
    return _zyphra_map(cfg, _stacked_experts("zaya_block.experts.switch_mlp."), conv_to_mlx)


def mlx_lm_zaya_map(cfg: ZayaConfig) -> dict:
    """What mlx-lm's own `models/zaya.py` writes (`mlx_lm.convert`): Zyphra's names, the experts stacked as
    `zaya_block.experts.{gate,up,down}_proj` (a `SwitchGLU`), MLX's conv layout (written after its `sanitize`)."""
    return _zyphra_map(cfg, _stacked_experts("zaya_block.experts."), same)


def _local_experts(moe: str, cfg: ZayaConfig) -> dict:
    experts = moe + "zaya_block.experts.local_experts."
    return {e: Source(tuple(f"{experts}{j}.{fc}.weight" for j in range(cfg.num_experts)), stack)
            for e, fc in (("gate_up_proj", "linear_fc1"), ("down_proj", "linear_fc2"))}


def _stacked_experts(prefix: str) -> Callable:
    def experts(moe: str, cfg: ZayaConfig) -> dict:
        p = moe + prefix
        return {"gate_up_proj": Source((p + "gate_proj.weight", p + "up_proj.weight"), concat_expert_rows),
                "down_proj": _rename(p + "down_proj.weight")}

    return experts


def _zyphra_map(cfg: ZayaConfig, experts: Callable, conv: Callable) -> dict:
    """Zyphra's 80-layer names: 2L alternating layers, entry-style residual scales.

    Layer k's attention is original layer 2k, its MoE 2k+1; the scaling after a block is stored at the start of
    the next original layer (`model.layers.0.res_scale` is the input scaling, `model.res_scale` the last one).
    `experts(moe prefix, cfg)` gives the sources of `gate_up_proj` and `down_proj`; `conv` reads a conv weight.
    """
    n = cfg.num_hidden_layers
    m = {
        "model.embed_tokens.weight": _rename("model.embed_tokens.weight"),
        "model.input_hidden_states_scale": _rename("model.layers.0.res_scale.hidden_states_scale"),
        "model.input_hidden_states_bias": _rename("model.layers.0.res_scale.hidden_states_bias"),
        "model.norm.weight": _rename("model.final_norm.weight"),
    }
    params = ["weight", "bias"] if cfg.attention_bias else ["weight"]
    for k in range(n):
        p, att, moe = f"model.layers.{k}.", f"model.layers.{2 * k}.", f"model.layers.{2 * k + 1}."
        after_mlp = f"model.layers.{2 * k + 2}.res_scale." if k < n - 1 else "model.res_scale."
        qkv = att + "self_attn.qkv."
        for w in params:
            m[p + f"self_attn.qkv_proj.in_proj.{w}"] = Source(
                tuple(qkv + f"{s}.{w}" for s in ("linear_q", "linear_k", "val_proj1", "val_proj2")), concat_rows)
            m[p + f"self_attn.o_proj.{w}"] = _rename(att + f"self_attn.o_proj.{w}")
        for j, name in enumerate(("conv_qk_depthwise", "conv_qk_grouped")):
            m[p + f"self_attn.qkv_proj.{name}.weight"] = Source((qkv + f"conv_qk.{j}.weight",), conv)
            m[p + f"self_attn.qkv_proj.{name}.bias"] = _rename(qkv + f"conv_qk.{j}.bias")
        m[p + "self_attn.qk_norm.temp"] = _rename(qkv + "temp")
        m[p + "input_layernorm.weight"] = _rename(att + "input_norm.weight")
        m[p + "post_attention_layernorm.weight"] = _rename(moe + "input_norm.weight")
        router = moe + "zaya_block.router."
        for s in ("down_proj.weight", "down_proj.bias", "balancing_biases") + (("router_states_scale",) if k > 0 else ()):
            m[p + f"mlp.gate.{s}"] = _rename(router + s)
        for s, orig in zip(ROUTER_MLP, ("rmsnorm_eda.weight", "router_mlp.0.weight", "router_mlp.0.bias",
                                        "router_mlp.2.weight", "router_mlp.2.bias", "router_mlp.4.weight")):
            m[p + f"mlp.gate.router_mlp.{s}"] = _rename(router + orig)
        for e, src in experts(moe, cfg).items():
            m[p + f"mlp.experts.{e}.weight"] = src
        for f in RESIDUAL_FIELDS:
            m[p + f"post_attention_residual_scale.{f}"] = _rename(moe + f"res_scale.{f}")
            m[p + f"post_mlp_residual_scale.{f}"] = _rename(after_mlp + f)
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = _rename("lm_head.weight")
    return m


def mlx_map(names: Iterable[str]) -> dict:
    """Our own MLX folder: already canonical (quantized tensors carry `.scales`/`.biases` beside `.weight`)."""
    return {n: _rename(n) for n in names}


# The first marker a checkpoint's names start with gives its layout (Zyphra's three share their attention names,
# so their experts tell them apart, and legacy comes last).
LAYOUT_MARKERS = {
    "mlx": "model.layers.0.self_attn.qkv_proj.in_proj.",
    "transformers": "model.layers.0.self_attn.qkv_proj.q_proj.",
    "vmlx": "model.layers.1.zaya_block.experts.switch_mlp.",
    "mlx-lm-zaya": "model.layers.1.zaya_block.experts.gate_proj.",
    "legacy": "model.layers.0.self_attn.qkv.linear_q.",
}
MAPS = {"transformers": transformers_map, "legacy": legacy_map, "vmlx": vmlx_map, "mlx-lm-zaya": mlx_lm_zaya_map}


def detect_layout(names: Iterable[str]) -> str:
    names = list(names)
    for layout, marker in LAYOUT_MARKERS.items():
        if any(n.startswith(marker) for n in names):
            return layout
    raise ZayaError(f"unrecognised checkpoint layout: no attention tensors of a known layout "
                    f"({', '.join(LAYOUT_MARKERS)}) found")


def name_map(layout: str, cfg: ZayaConfig, names: Iterable[str]) -> dict:
    """The layout's map, with the scales and biases of every module the checkpoint stores quantized."""
    names = set(names)
    if layout == "mlx":
        return mlx_map(names)
    return with_quantized(MAPS[layout](cfg), names)


def with_quantized(mapping: dict, names: set) -> dict:
    """Add `.scales` / `.biases` entries, combined like the weight, for each module whose sources are quantized."""
    out = dict(mapping)
    for canonical, src in mapping.items():
        if not canonical.endswith(".weight") or not all(s.endswith(".weight") for s in src.names):
            continue
        stems = [s[: -len(".weight")] for s in src.names]
        quantized = [f"{s}.scales" in names for s in stems]
        if not any(quantized):
            continue
        if not all(quantized):
            plain = next(s for s, q in zip(stems, quantized) if not q)
            raise ZayaError(f"{plain}.weight is stored unquantized but is joined with quantized tensors into "
                            f"{canonical}: quantize all of {', '.join(stems)} alike")
        for suffix in ("scales", "biases"):
            if any(f"{s}.{suffix}" in names for s in stems):
                out[f"{canonical[: -len('weight')]}{suffix}"] = Source(tuple(f"{s}.{suffix}" for s in stems), src.combine)
    return out


def canonical_quantization(mapping: dict, quantization: Optional[dict], names: Iterable[str]) -> Optional[dict]:
    """The checkpoint's mlx-lm quantization config with its per-module entries under canonical module paths.

    mlx-lm's convention: a module with `.scales` takes its own entry if it has one, else the global parameters.
    The modules joined into one canonical module must share one format. Unquantized modules need no entry: the
    loader quantizes only modules whose canonical `.scales` exist.
    """
    if not quantization:
        return quantization
    names = set(names)
    base = {k: v for k, v in quantization.items() if not isinstance(v, (dict, bool))}

    def format_of(module: str) -> Optional[dict]:
        if f"{module}.scales" not in names:
            return None
        entry = quantization.get(module)
        return {**base, **entry} if isinstance(entry, dict) else base

    out = dict(base)
    for canonical, src in mapping.items():
        if not canonical.endswith(".weight") or not all(s.endswith(".weight") for s in src.names):
            continue
        stems = [s[: -len(".weight")] for s in src.names]
        formats = [format_of(s) for s in stems]
        odd = next((s for s, f in zip(stems, formats) if f != formats[0]), None)
        if odd is not None:
            raise ZayaError(f"{stems[0]} and {odd} are quantized differently but are joined into {canonical}: "
                            f"quantize them alike")
        if formats[0] is not None and formats[0] != base:
            out[canonical[: -len(".weight")]] = formats[0]
    return out


def check_names(mapping: dict, names: Iterable[str]) -> None:
    """Every source tensor the map needs is present, and every present tensor is used."""
    names = set(names)
    used = {s for src in mapping.values() for s in src.names}
    missing = sorted(used - names, key=_natural)
    if missing:
        raise ZayaError(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(names - used, key=_natural)
    if unexpected:
        raise ZayaError(f"unexpected tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


def iter_canonical(mapping: dict, shards: Iterable[dict]) -> Iterator[tuple]:
    """Yield (canonical name, array) as soon as all of a tensor's sources have been read, shard by shard."""
    needed = {}
    for canonical, src in mapping.items():
        for s in src.names:
            needed.setdefault(s, []).append(canonical)
    pending, remaining = {}, {c: len(set(src.names)) for c, src in mapping.items()}
    for shard in shards:
        for name, array in shard.items():
            if name not in needed:
                raise ZayaError(f"unexpected tensor {name}")
            pending[name] = array
            for canonical in needed[name]:
                remaining[canonical] -= 1
                if remaining[canonical] == 0:
                    src = mapping[canonical]
                    try:
                        combined = src.combine([pending[s] for s in src.names])
                    except ValueError as e:
                        raise ZayaError(f"tensors {', '.join(src.names)} do not fit together ({e})") from None
                    yield canonical, combined
        # drop sources whose canonical tensors have all been emitted
        for name in [n for n in pending if all(remaining[c] == 0 for c in needed[n])]:
            del pending[name]
    incomplete = sorted((c for c, r in remaining.items() if r), key=_natural)
    if incomplete:
        missing = next(s for s in mapping[incomplete[0]].names if s not in pending)
        raise ZayaError(f"missing tensor {missing}")


def to_canonical(weights: dict, cfg: ZayaConfig) -> dict:
    """A whole checkpoint's tensors (any layout) -> canonical names; mlx-lm's `sanitize`."""
    if cfg.tie_word_embeddings:  # some exports write the tied head too; it is the embedding
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    layout = detect_layout(weights)
    mapping = name_map(layout, cfg, weights)
    check_names(mapping, weights)
    return dict(iter_canonical(mapping, [weights]))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
