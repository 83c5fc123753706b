"""The memory plan of a run, made before anything is allocated: how many rollouts decode together (slots).

Every slot may hold a rollout of any round (the engine streams rounds into each other), so a slot is sized for
the longest sequence any round may hold: the longest prompt (round 0's, or an aggregation prompt with K tails at
their token bound) plus that round's new tokens. Fixed costs: the weights, one layer's weights as working
memory, the shared prefixes' caches, activations; and on the host, the tokens and texts every rollout keeps.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ZayaError
from ..kv_cache import KV_BITS, KV_GROUP_SIZE, check_kv_heads
from ..sizes import format_bytes, kv_bytes_per_token
from ..sizes import weight_bytes as model_weight_bytes

KV_ALLOC_STEP = 256  # mlx-lm's KVCache grows in steps of 256 tokens
PREFILL_ROWS = 8  # prompts mlx-lm's BatchGenerator prefills together at most (ModelBackend's prefill_batch_size)
HOST_BYTES_PER_TOKEN = 48  # a kept token: its id in a Python list and its share of the decoded text
METAL_BUDGET_SHARE = 0.9  # of Metal's recommended working set


def machine_memory() -> tuple[int, str]:
    """`(bytes, source)`: what the accelerator may use (Metal's recommended working set, the CUDA device's memory)
    or, on a CPU, the machine's RAM (/proc/meminfo on Linux, sysctl hw.memsize on macOS, else sysconf)."""
    import mlx.core as mx

    try:
        if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()):
            info = mx.device_info()
            for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
                if info.get(key):
                    return int(info[key]), f"device {key}"
    except Exception:
        pass
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemTotal"
        except OSError:
            pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5)
            return int(out.stdout.strip()), "sysctl hw.memsize"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "sysconf"
    except (ValueError, OSError, AttributeError):
        return 16 << 30, "assumed 16 GiB"


def default_memory_budget() -> tuple[int, str]:
    """A safe share of the machine: 90% of Metal's recommended working set (itself ~2/3-3/4 of RAM), 85% of a
    CUDA device, 75% of a CPU machine's RAM."""
    total, source = machine_memory()
    share = METAL_BUDGET_SHARE if "max_recommended" in source else 0.85 if source.startswith("device") else 0.75
    return int(total * share), f"{share:.0%} of {source}"


def state_bytes_per_sequence(args, dtype_bytes: int = 2) -> int:
    """The CCA conv window (S previous q/k inputs) and the previous token's delayed value, every layer."""
    s = (args.cca_time0 - 1) + (args.cca_time1 - 1)
    channels = (args.num_attention_heads + args.num_key_value_heads) * args.head_dim
    return args.num_hidden_layers * (s * channels + args.num_key_value_heads * args.head_dim // 2) * dtype_bytes


def _alloc(tokens: int) -> int:
    return KV_ALLOC_STEP * math.ceil(tokens / KV_ALLOC_STEP)


def slot_positions(tokens: int) -> int:
    """KV positions a slot of `tokens` may hold at once: mlx-lm's buffer (256-token steps), and the fused decode
    step's own copy of it (kv_capacity: powers of two, then steps of 4096), alive together while a batch is merged,
    filtered or extended and the step copies the new buffers."""
    from ..decode.cache import kv_capacity

    return _alloc(tokens) + kv_capacity(tokens)


def prefill_floats_per_token(args, bound: int) -> int:
    """float32 values a prefilled token holds at once in one layer: the residual stream and norms (10 x hidden), the
    expert's activations (3 x its width), the CCA projection, convolutions and their workspace (16 x the query and
    key channels), and attention's scores against up to `bound` keys for every query head (one float32 copy, or a
    bf16 model's scores and softmax; MLX's CPU attention holds ~2.1 bytes a score in bf16, ~2.5 with a quantized
    cache, ~4.1 in float32)."""
    inter = getattr(args, "moe_intermediate_size", 4 * args.hidden_size)
    channels = (args.num_attention_heads + args.num_key_value_heads) * args.head_dim
    return 10 * args.hidden_size + 3 * inter + 16 * channels + args.num_attention_heads * bound


@dataclass
class MemoryPlan:
    """How a run fits. Bytes unless named otherwise.

    prompt_tokens: round 0's prompt; aggregate_tokens: the longest aggregation prompt (K tails at their bound);
    context_bound: the most tokens one sequence holds in any round (a slot's size).
    sequence_bytes: one slot at the bound: its KV at slot_positions (mlx-lm's buffer and the fused decode step's
    copy) + conv state. activation_bytes: a prefill chunk of up to PREFILL_ROWS prompts (prefill_floats_per_token)
    and the decode steps' logits.
    host_bytes: every rollout's tokens and text kept in memory (worst case).
    kv_bits: the KV cache's format (None: the model's dtype; 8 or 4: packed integers with a scale and a bias per
    64 values, which kv_bytes_per_token counts). notes: what the summary adds (fewer slots than rollouts a round,
    where a smaller KV format fits more).
    docs/rsa.md gives measured peaks against the plan, with the command.
    """

    prompt_tokens: int
    aggregate_tokens: int
    context_bound: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    sequence_bytes: int
    weights_bytes: int
    layer_bytes: int
    prefix_bytes: int
    activation_bytes: int
    host_bytes: int
    budget_bytes: int
    budget_source: str
    slots: int
    rollouts: int
    worst_case_tokens: int
    peak_bytes: int
    kv_bits: Optional[int] = None
    notes: list = field(default_factory=list)

    @property
    def fixed_bytes(self) -> int:
        return self.weights_bytes + self.layer_bytes + self.prefix_bytes + self.activation_bytes + self.host_bytes

    def kv_bytes(self) -> int:
        return self.slots * self.sequence_bytes

    def summary(self) -> str:
        return (f"plan: {self.rollouts} rollouts, {self.worst_case_tokens:,} new tokens at most, {self.slots} slots "
                f"of <= {self.context_bound:,} tokens (prompt {self.prompt_tokens:,}, aggregation prompt <= "
                f"{self.aggregate_tokens:,}); KV {format_bytes(self.kv_bytes_per_token)}/token"
                + ("" if self.kv_bits is None else f" ({self.kv_bits}-bit)")
                + f", {format_bytes(self.kv_bytes())} for the slots, weights {format_bytes(self.weights_bytes)}, "
                f"activations {format_bytes(self.activation_bytes)}: {format_bytes(self.peak_bytes)} "
                f"of {format_bytes(self.budget_bytes)} ({self.budget_source})" + "".join(f"; {n}" for n in self.notes))


def smaller_kv(args, kv_bits: Optional[int]) -> Optional[int]:
    """The KV format that shrinks the cache next (8 bits after the model's dtype, 4 after 8), or None when it is at
    its smallest or the model's heads cannot be grouped."""
    smaller = [b for b in KV_BITS if kv_bits is None or b < kv_bits]
    if not smaller or not args.head_dim or args.head_dim % KV_GROUP_SIZE:
        return None
    return max(smaller)


def plan_memory(args, params, *, prompt_tokens: int, aggregate_tokens: int, head_tokens: int = 0,
                weights_bytes: int = 0, layer_bytes: int = 0, dtype_bytes: int = 2, budget_bytes: Optional[int] = None,
                budget_source: str = "given", prefill_step_size: int = 512,
                max_batch: Optional[int] = None) -> MemoryPlan:
    """Fit the run of `params` (an RSAParams) into the budget; `max_batch` caps the slots (default: a round's
    rollouts). Raises a one-line ZayaError naming what to lower when a sequence is over the model's context,
    when the kept rollouts alone do not fit, or when not even one slot does."""
    if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) != max_batch or max_batch < 1):
        raise ZayaError(f"--max-batch must be a whole number >= 1, got {max_batch}")
    if budget_bytes is None:
        budget_bytes, budget_source = default_memory_budget()
    p = params
    check_kv_heads(args.head_dim, p.kv_bits)
    max_pos = getattr(args, "max_position_embeddings", None) or 1 << 62
    if prompt_tokens > max_pos:
        raise ZayaError(f"the prompt is {prompt_tokens:,} tokens, over the model's context of {max_pos:,} tokens; "
                        "shorten it")
    if weights_bytes >= budget_bytes:
        raise ZayaError(f"the model ({format_bytes(weights_bytes)}) alone fills the RSA memory budget of {format_bytes(budget_bytes)}: "
                        "use a quantized model (zaya quantize) or raise --memory")
    host = p.worst_case_tokens() * HOST_BYTES_PER_TOKEN
    if weights_bytes + host >= budget_bytes:
        raise ZayaError(f"{p.total_rollouts():,} rollouts of up to {p.short_resp_len:,} tokens keep up to "
                        f"{format_bytes(host)} of tokens and text in memory, over the {format_bytes(budget_bytes - weights_bytes)} left "
                        "after the model: lower --n")
    # (prompt, new tokens, what lowers them) of the longest sequence of each kind
    need = [(prompt_tokens, p.max_tokens_in(0), "--max-tokens" if p.rsa_t == 0 else "--short-resp-len")]
    if p.rsa_t > 0:
        tails = "--tail-window-len or --k"
        if p.rsa_t > 1:
            need.append((aggregate_tokens, p.short_resp_len, f"--short-resp-len, {tails}"))
        need.append((aggregate_tokens, p.max_tokens, f"--max-tokens, {tails}"))
    prompt, new, culprit = max(need, key=lambda n: n[0] + n[1])
    bound = prompt + new
    if bound > max_pos:
        raise ZayaError(f"an RSA sequence may hold {bound:,} tokens ({prompt:,} of prompt, then {new:,} new), over "
                        f"the model's context of {max_pos:,}; lower {culprit}")

    state = state_bytes_per_sequence(args, dtype_bytes)
    V, H = args.vocab_size, args.hidden_size
    chunk_bytes = prefill_step_size * prefill_floats_per_token(args, bound) * 4

    def act(b: int) -> int:  # a prefill chunk of up to PREFILL_ROWS prompts, the last position's logits, and per
        # decode step fp32 logits/log-probs x 3
        return min(b, PREFILL_ROWS) * chunk_bytes + V * 4 + 3 * b * V * 4 + b * 10 * H * 4

    wanted = min(p.rsa_n, max_batch) if max_batch else p.rsa_n

    def fit(kv_bits: Optional[int]) -> tuple[int, int, int, int]:
        """(KV bytes a token, a slot's bytes, the prefixes' bytes, the slots that fit) with keys and values so."""
        kv = kv_bytes_per_token(args, dtype_bytes, kv_bits)
        seq = slot_positions(bound) * kv + state
        prefix = 2 * (_alloc(max(head_tokens, prompt_tokens)) * kv + state)  # round 0's prompt, the aggregation head
        slots = wanted
        while slots >= 1 and weights_bytes + layer_bytes + prefix + host + act(slots) + slots * seq > budget_bytes:
            slots -= 1
        return kv, seq, prefix, slots

    kv, seq, prefix, slots = fit(p.kv_bits)
    fixed = weights_bytes + layer_bytes + prefix
    if fixed >= budget_bytes:
        raise ZayaError(f"the model ({format_bytes(weights_bytes)}) alone fills the RSA memory budget of {format_bytes(budget_bytes)}: "
                        "use a quantized model (zaya quantize) or raise --memory")
    smaller = smaller_kv(args, p.kv_bits)
    if slots < 1:
        hint = ""
        if smaller is not None:
            hint = f", --kv-bits {smaller} ({kv_bytes_per_token(args, dtype_bytes, smaller) / kv:.0%} of the KV bytes)"
        raise ZayaError(f"one RSA sequence of {bound:,} tokens needs {format_bytes(seq + act(1))} (cache and working memory) "
                        f"and only {format_bytes(budget_bytes - fixed - host)} of the {format_bytes(budget_bytes)} budget is left after "
                        f"the model: lower {culprit}{hint}, or raise --memory")
    notes = []
    if slots < wanted and smaller is not None:
        more = fit(smaller)[3]
        if more > slots:
            notes.append(f"--kv-bits {smaller} fits {more} slots")
    return MemoryPlan(prompt_tokens=prompt_tokens, aggregate_tokens=aggregate_tokens, context_bound=bound,
                      kv_bytes_per_token=kv, state_bytes_per_sequence=state, sequence_bytes=seq,
                      weights_bytes=weights_bytes, layer_bytes=layer_bytes, prefix_bytes=prefix,
                      activation_bytes=act(slots), host_bytes=host, budget_bytes=int(budget_bytes),
                      budget_source=budget_source, slots=slots, rollouts=p.total_rollouts(),
                      worst_case_tokens=p.worst_case_tokens(), peak_bytes=fixed + host + act(slots) + slots * seq,
                      kv_bits=p.kv_bits, notes=notes)


def model_layer_bytes(model) -> int:
    """Bytes of the model's largest decoder layer (0 when it has no `model.layers`)."""
    from mlx.utils import tree_flatten

    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return max((sum(v.nbytes for _, v in tree_flatten(layer.parameters())) for layer in layers), default=0)


def model_dtype_bytes(model, default: int = 2) -> int:
    """Bytes per element of the KV cache: the dtype the CCA projection computes in (its weight's, or for a
    quantized model its scales'), else a norm weight's."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    for suffix in ("qkv_proj.in_proj.weight", "qkv_proj.in_proj.scales", "norm.weight"):
        for name, v in params:
            if name.endswith(suffix) and mx.issubdtype(v.dtype, mx.floating):
                return v.dtype.size
    return default
