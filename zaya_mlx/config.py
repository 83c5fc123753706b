"""ZAYA1's configuration, read from either checkpoint layout's config.json.

transformers' layout counts 40 hybrid layers (attention + MoE each); Zyphra's original counts 80 alternating
layers and names things differently. Both normalise to one `ZayaConfig`, which is also mlx-lm's `ModelArgs`.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from .errors import ZayaError

DEFAULT_MODEL = "Zyphra/ZAYA1-8B"
LAYER_TYPES = ("hybrid", "hybrid_sliding")
POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "router_hidden_size",
                 "cca_time0", "cca_time1", "max_position_embeddings")
DEFAULT_ROPE = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


@dataclass
class ZayaConfig:
    model_type: str = "zaya"
    vocab_size: int = 262_272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    moe_intermediate_size: int = 2048
    num_experts: int = 16
    num_experts_per_tok: int = 1
    router_hidden_size: int = 256
    cca_time0: int = 2
    cca_time1: int = 2
    rms_norm_eps: float = 1e-5
    layer_types: Optional[list] = None
    sliding_window: Optional[int] = None
    rope_parameters: Optional[dict] = None
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    lm_head_bias: bool = False
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 2
    eos_token_id: object = 106
    quantization: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self):
        self.check_types()
        if self.layer_types is None:
            self.layer_types = ["hybrid"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        rope = {k: dict(v) for k, v in (self.rope_parameters or DEFAULT_ROPE).items() if isinstance(v, dict)}
        self.rope_parameters = {t: {**DEFAULT_ROPE[t], **rope.get(t, {})} for t in LAYER_TYPES}
        self.validate()

    def check_types(self):
        """Every setting has a value of its kind and range (a config file may hold anything)."""
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, "a whole number >= 1", value)
        for name in ("tie_word_embeddings", "attention_bias", "lm_head_bias"):
            _require(isinstance(getattr(self, name), bool), name, "true or false", getattr(self, name))
        eps = self.rms_norm_eps
        _require(_is_real(eps) and 0 < eps < math.inf, "rms_norm_eps", "a number > 0", eps)
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            _require(value is None or _is_token(value), name, "a token id or null", value)
        eos = self.eos_token_id
        _require(eos is None or _is_token(eos) or (isinstance(eos, list) and all(map(_is_token, eos))),
                 "eos_token_id", "a token id, a list of them, or null", eos)
        _require(self.sliding_window is None or (_is_int(self.sliding_window) and self.sliding_window >= 1),
                 "sliding_window", "a whole number >= 1 or null", self.sliding_window)
        _require(self.layer_types is None or (isinstance(self.layer_types, list)
                                              and all(isinstance(t, str) for t in self.layer_types)),
                 "layer_types", "a list of layer type names", self.layer_types)
        for name in ("rope_parameters", "quantization"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, dict), name, "an object", value)

    def validate(self):
        """Reject what the port does not implement, naming the setting."""
        for t, p in self.rope_parameters.items():
            theta, factor = p.get("rope_theta"), p.get("partial_rotary_factor")
            _require(_is_real(theta) and 0 < theta < math.inf, f"rope_theta of {t} layers", "a number > 0", theta)
            _require(_is_real(factor) and 0 < factor <= 1 and int(self.head_dim * factor) % 2 == 0
                     and int(self.head_dim * factor) > 0, f"partial_rotary_factor of {t} layers",
                     f"a number in (0, 1] giving an even number of rotary dims of head_dim {self.head_dim}", factor)
        checks = [
            (self.model_type == "zaya", f"model_type is {self.model_type!r}, not 'zaya'"),
            (self.num_experts_per_tok == 1, f"num_experts_per_tok={self.num_experts_per_tok}: ZAYA1 routes each token to one expert"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}"),
            ((self.num_key_value_heads * self.head_dim) % 2 == 0, "the value projection must split into two halves"),
            (len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"),
            (set(self.layer_types) <= set(LAYER_TYPES), f"unknown layer type in {sorted(set(self.layer_types))}"),
            ("hybrid_sliding" not in self.layer_types or (self.sliding_window or 0) > 0,
             "sliding layers need a positive sliding_window"),
        ]
        for t, p in self.rope_parameters.items():
            checks.append((p.get("rope_type", "default") == "default", f"rope_type {p.get('rope_type')!r} for {t} layers is not supported"))
        for ok, message in checks:
            if not ok:
                raise ZayaError(f"unsupported config: {message}")

    @property
    def conv_state_size(self) -> int:
        """How many previous q/k inputs the two causal convolutions look back over."""
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @property
    def eos_token_ids(self) -> list:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    def rope_dims(self, layer_type: str) -> int:
        return int(self.head_dim * self.rope_parameters[layer_type]["partial_rotary_factor"])

    def rope_theta(self, layer_type: str) -> float:
        return float(self.rope_parameters[layer_type]["rope_theta"])

    @classmethod
    def from_dict(cls, raw: dict) -> "ZayaConfig":
        """Either layout's config.json (mlx-lm calls this too)."""
        raw = _from_legacy(raw) if is_legacy_config(raw) else raw
        known = cls.__dataclass_fields__
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as e:
            raise ZayaError(f"invalid config: {e}") from None

    def to_dict(self) -> dict:
        """transformers-style config.json (what our MLX folders carry)."""
        d = asdict(self)
        d["architectures"] = ["ZayaForCausalLM"]
        if d["quantization"] is None:
            del d["quantization"]
        return d


# Integer keys of Zyphra's original config: the ones it must have, then the ones it may have.
LEGACY_REQUIRED = ("num_hidden_layers", "hidden_size", "ffn_hidden_size", "zaya_mlp_expansion")
LEGACY_INTS = LEGACY_REQUIRED + ("cca_num_q_heads", "num_attention_heads", "num_query_groups",
                                 "num_key_value_heads", "kv_channels", "head_dim")


def is_legacy_config(raw: dict) -> bool:
    return "ffn_hidden_size" in raw or "zaya_mlp_expansion" in raw


def _from_legacy(raw: dict) -> dict:
    """Zyphra's original 80-layer config -> transformers' keys.

    `swa_layers` has one entry per original layer (attention and MoE alike): the sliding window minus one, 0 for
    full attention, as Zyphra's vLLM reads it. Only the attention (even) entries matter.
    """
    for key, expected in (("zaya_use_mod", True), ("zaya_use_eda", True), ("scale_residual_merge", True),
                          ("cca", True), ("add_bias_linear", False), ("gated_linear_unit", True)):
        if key in raw and bool(raw[key]) != expected:
            raise ZayaError(f"unsupported config: {key}={raw[key]} (ZAYA1 uses {expected})")
    if raw.get("activation_func", "swiglu") != "swiglu":
        raise ZayaError(f"unsupported config: activation_func={raw['activation_func']!r}")
    for key in LEGACY_INTS:
        if key in LEGACY_REQUIRED or raw.get(key) is not None:
            _require(_is_int(raw.get(key)) and raw[key] >= 1, key, "a whole number >= 1", raw.get(key))
    if raw["ffn_hidden_size"] % 2:
        raise ZayaError(f"unsupported config: ffn_hidden_size={raw['ffn_hidden_size']} does not split into gate and up")
    if raw["num_hidden_layers"] % 2:
        raise ZayaError(f"unsupported config: {raw['num_hidden_layers']} layers do not pair into attention + MoE")
    n_layers = raw["num_hidden_layers"] // 2
    n_heads = raw.get("cca_num_q_heads", raw.get("num_attention_heads"))
    n_kv = raw.get("num_query_groups", raw.get("num_key_value_heads"))
    if raw.get("moe_router_topk", 1) != 1:
        raise ZayaError(f"unsupported config: moe_router_topk={raw['moe_router_topk']}: ZAYA1 routes each token to one expert")
    if n_heads is None or n_kv is None or n_heads % n_kv:
        raise ZayaError(f"unsupported config: cca_num_q_heads={n_heads} is not a multiple of num_query_groups={n_kv}")
    head_dim = raw.get("kv_channels") or raw.get("head_dim")
    if head_dim is None and raw.get("num_attention_heads") is None:
        raise ZayaError("invalid config: the legacy config gives neither kv_channels nor num_attention_heads")
    head_dim = head_dim or raw["hidden_size"] // raw["num_attention_heads"]
    windows = _legacy_windows(raw.get("swa_layers"), raw["num_hidden_layers"])
    if any(windows) and raw.get("sliding_window") not in (None, max(windows)):
        raise ZayaError(f"unsupported config: sliding_window={raw['sliding_window']} but swa_layers gives "
                        f"{max(windows)} (an entry is the window minus one)")
    partial = raw.get("partial_rotary_factor", 0.5)
    out = {
        k: raw[k] for k in ("model_type", "vocab_size", "hidden_size", "num_experts", "cca_time0", "cca_time1",
                            "max_position_embeddings", "tie_word_embeddings", "attention_bias", "lm_head_bias",
                            "pad_token_id", "bos_token_id", "eos_token_id", "quantization")
        if k in raw
    }
    out.update(
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        moe_intermediate_size=raw["ffn_hidden_size"] // 2,
        router_hidden_size=raw["zaya_mlp_expansion"],
        rms_norm_eps=raw.get("norm_epsilon", raw.get("rms_norm_eps", 1e-5)),
        layer_types=["hybrid_sliding" if w else "hybrid" for w in windows],
        sliding_window=max(windows) or None,
        rope_parameters={
            "hybrid": {"rope_type": "default", "rope_theta": raw.get("rope_theta", 5_000_000.0), "partial_rotary_factor": partial},
            "hybrid_sliding": {"rope_type": "default", "rope_theta": raw.get("swa_rotary_base") or 10_000.0,
                               "partial_rotary_factor": partial},
        },
    )
    return out


def _legacy_windows(swa_layers, num_original_layers: int) -> list:
    """Each ZAYA layer's sliding window from legacy `swa_layers` (0: full attention); one window for all, as
    transformers has one `sliding_window`."""
    if not swa_layers:
        return [0] * (num_original_layers // 2)
    if not isinstance(swa_layers, list) or len(swa_layers) != num_original_layers:
        raise ZayaError(f"unsupported config: swa_layers must list one entry per original layer "
                        f"({num_original_layers}), got {swa_layers!r:.80}")
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in swa_layers):
        raise ZayaError(f"unsupported config: swa_layers entries must be integers >= 0, got {swa_layers!r:.80}")
    windows = [w + 1 if w else 0 for w in swa_layers[::2]]
    if len(set(w for w in windows if w)) > 1:
        raise ZayaError(f"unsupported config: sliding layers with different windows {sorted(set(windows) - {0})}: "
                        "transformers' ZAYA has one sliding_window")
    return windows


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_token(v) -> bool:
    return _is_int(v) and v >= 0


def _require(ok: bool, name: str, what: str, value) -> None:
    if not ok:
        raise ZayaError(f"invalid config: {name} must be {what}, got {value!r:.60}")
