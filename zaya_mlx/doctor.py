"""`zaya doctor`: what this machine runs, and whether the decode kernels work on it, in seconds and with no download.

Each kernel runs once at small shapes, with a tiny random model's weights, against its plain-MLX reference; the
fused decode step runs the model's own check; a short generation measures peak memory. Everything is reported,
nothing raises: the report is meant to be pasted into a bug report as it is.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Optional

import mlx.core as mx

from . import kernels
from .benchmark import build_zaya, small_config
from .decode import DecodeOptions
from .errors import first_line
from .sizes import format_bytes

# max |kernel - reference| / max |reference| that passes: bfloat16 kernels round in another order than MLX's ops
TOLERANCE = {mx.bfloat16: 5e-2, mx.float32: 1e-3}
DECODE_TOKENS = 16  # the short run whose peak memory is reported


@dataclasses.dataclass
class KernelCheck:
    name: str
    ok: bool
    detail: str  # the relative error, or why it failed


@dataclasses.dataclass
class Report:
    machine: dict  # name -> value, in the order shown
    back_end: str  # 'metal', 'cuda' or 'cpu'
    kernels_note: str  # why no kernel ran, or ''
    kernels: list  # KernelCheck
    decode_path: str
    decode_reason: str
    peak_memory: int  # bytes, over the short run
    tokens_per_s: float

    def text(self) -> str:
        """The report as plain text, ready to paste into a bug report."""
        lines = ["zaya doctor"]
        lines += [f"  {k + ':':<18}{v}" for k, v in self.machine.items()]
        lines.append("kernels:")
        if self.kernels_note:
            lines.append(f"  {self.kernels_note}")
        for k in self.kernels:
            lines.append(f"  {k.name:<30}{'ok' if k.ok else 'FAILED'}  {k.detail}")
        lines.append(f"decode path:        {self.decode_path} ({self.decode_reason})")
        lines.append(f"short run:          {DECODE_TOKENS} tokens of a tiny random model, {self.tokens_per_s:.1f} tokens/s,"
                     f" peak memory {format_bytes(self.peak_memory)}")
        return "\n".join(lines)


def machine() -> dict:
    """OS, chip or GPU, memory, Python and MLX, as this process sees them."""
    info = {"os": _os_name(), "cpu": _cpu_name()}
    device = _device_info()
    back = kernels.backend()
    if back != "cpu":
        info["gpu"] = str(device.get("device_name", "unknown"))
    memory = device.get("memory_size") or _physical_memory()
    if memory:
        info["memory"] = format_bytes(memory)
    info["python"] = platform.python_version()
    info["mlx"] = f"{mx.__version__} (back end: {back}, default device: {mx.default_device()})"
    return info


def _os_name() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    return f"{platform.system()} {platform.release()} ({platform.machine()})"


def _cpu_name() -> str:
    if sys.platform == "darwin":  # Apple silicon: the chip's name, e.g. "Apple M2 Pro"
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            return platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_info() -> dict:
    try:
        return dict(mx.device_info())
    except (AttributeError, RuntimeError):
        return {}


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _relative_error(got, want) -> float:
    got = [g for g in (got if isinstance(got, (tuple, list)) else (got,)) if g is not None]
    want = [w for w in (want if isinstance(want, (tuple, list)) else (want,)) if w is not None]
    worst = 0.0
    for g, w in zip(got, want):
        if g.size != w.size:  # o_proj's output as partial sums [B, P, H] (kernels.decode_attention)
            g = g.sum(axis=-2, keepdims=True)
        g, w = g.astype(mx.float32), w.astype(mx.float32).reshape(g.shape)
        err = (mx.abs(g - w).max() / mx.maximum(mx.abs(w).max(), 1e-30)).item()
        worst = err if not err <= worst else worst  # NaN stays
    return worst


def _compare(name: str, run: Callable[[str], object], dtype) -> KernelCheck:
    """run(impl) -> outputs: the kernel's against the reference's."""
    try:
        want = run("reference")
        mx.eval(want)
        got = run("kernel")
        mx.eval(got)
    except (RuntimeError, ValueError) as e:  # how MLX reports a kernel that does not build or launch
        return KernelCheck(name, False, f"did not build or run: {first_line(e)[:160]}")
    err = _relative_error(got, want)
    ok = err <= TOLERANCE[dtype]
    return KernelCheck(name, ok, f"max error {err:.2g} of the largest value" + ("" if ok else " (too large)"))


def _rnd(*shape, dtype, scale=1.0):
    return (mx.random.normal(shape) * scale).astype(dtype)


def kernel_checks(quant: Optional[str] = "mxfp4", dtype=mx.bfloat16) -> list:
    """Each decode kernel at small shapes against its reference, with a tiny random model's weights in ``quant``.
    On a back end with no kernels, impl='kernel' fails each with the reason."""
    cfg = dataclasses.replace(small_config(), router_hidden_size=256)  # ZAYA's router width: routed inside experts
    model = build_zaya(cfg, quant, seed=0, dtype=dtype)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    gate, experts = mlp.gate, mlp.experts
    H, R = cfg.hidden_size, cfg.router_hidden_size
    nh, nkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    mx.random.seed(1)
    x, r, h = _rnd(1, 1, H, dtype=dtype), _rnd(1, 1, R, dtype=dtype), _rnd(1, 1, H, dtype=mx.float32)
    router = gate.kernel_weights()
    res, norm = layer.post_attention_residual_scale, layer.post_attention_layernorm
    choice = mx.array([[1]], dtype=mx.int32)
    weight = mx.array([[0.75]], dtype=mx.float32)
    batch = _rnd(3, 1, H, dtype=dtype)  # three tokens, two on one expert, for the grouped form
    choices, weights = mx.array([1, 0, 1], dtype=mx.int32), mx.array([0.75, 0.5, 0.25], dtype=mx.float32)

    proj = attn.qkv_proj
    dw, gw = proj.conv_qk_depthwise, proj.conv_qk_grouped
    C = (nh + nkv) * d
    cap, filled = 64, 10
    step_args = dict(qkv=_rnd(1, C + nkv * d, dtype=dtype), conv_state=_rnd(1, dw.weight.shape[1] - 1
                                                                            + gw.weight.shape[1] - 1, C, dtype=dtype),
                     v_prev=_rnd(1, nkv * d // 2, dtype=dtype), dw_w=dw.weight, dw_b=dw.bias, gw_w=gw.weight,
                     gw_b=gw.bias, temp=attn.qk_norm.temp, offset=mx.array([filled - 1], dtype=mx.int32))
    cca_kw = dict(n_heads=nh, n_kv_heads=nkv, head_dim=d, rope_dims=attn.rope.dims, rope_base=attn.rope.base)

    def cache():  # fresh buffers each run: the kernels write the new key and value into them
        mx.random.seed(2)
        return _rnd(1, nkv, cap, d, dtype=dtype), _rnd(1, nkv, cap, d, dtype=dtype)

    def cca_attention(impl):
        keys, values = cache()
        return kernels.cca_decode_attention(**step_args, keys=keys, values=values, filled=filled, scale=attn.scale,
                                            o_proj=attn.o_proj, impl=impl, **cca_kw)

    def cca_step(impl):
        keys, values = cache()
        return kernels.cca_decode_step(**step_args, keys=keys, values=values, filled=filled, impl=impl, **cca_kw)

    def attention(impl):
        keys, values = cache()
        q = _rnd(1, nh, 1, d, dtype=dtype)
        return kernels.decode_attention(q, keys, values, filled, scale=attn.scale, o_proj=attn.o_proj, impl=impl)

    cases = [
        ("router MLP", lambda impl: kernels.router_mlp(r.reshape(1, R), router, impl=impl)),
        ("residual norm + projection", lambda impl: kernels.residual_norm(
            x.astype(mx.float32), h, res.hidden_states_scale, res.hidden_states_bias,
            res.residual_scale, res.residual_bias, norm.weight, norm.eps, gate.down_proj, dtype=dtype, impl=impl)),
        ("expert MLP", lambda impl: kernels.expert_gather(x, choice, weight, experts.gate_up_proj, experts.down_proj,
                                                          impl=impl)),
        ("expert MLP with its router", lambda impl: kernels.routed_expert_gather(
            x, r, router, experts.gate_up_proj, experts.down_proj, impl=impl)),
        ("expert MLP grouped by expert", lambda impl: kernels.expert_gather(
            batch, choices, weights, experts.gate_up_proj, experts.down_proj, grouped=True, impl=impl)),
        ("CCA step", cca_step),
        ("attention + o_proj", attention),
        ("CCA step inside attention", cca_attention),
        ("LM head", lambda impl: kernels.lm_head(x, model.head, impl=impl)),
    ]
    return [_compare(name, run, dtype) for name, run in cases]


def short_run(quant: Optional[str] = "mxfp4", dtype=mx.bfloat16,
              options: Optional[DecodeOptions] = None) -> tuple[int, float]:
    """(peak memory in bytes, decoded tokens/s) of a prompt and DECODE_TOKENS greedy tokens of a tiny random model,
    its weights included, the decode path chosen as for any model with these options."""
    mx.synchronize()
    mx.reset_peak_memory()
    model = build_zaya(small_config(), quant, seed=0, dtype=dtype)
    model.decode_options = options or DecodeOptions()
    cache = model.make_cache()
    tok = mx.argmax(model(mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32), cache)[:, -1:], axis=-1).astype(mx.int32)
    mx.eval(tok)
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        tok = mx.argmax(model(tok, cache)[:, -1:], axis=-1).astype(mx.int32)
        mx.eval(tok)
    elapsed = time.perf_counter() - start
    return mx.get_peak_memory(), DECODE_TOKENS / max(elapsed, 1e-9)


def decode_path(quant: Optional[str] = "mxfp4", dtype=mx.bfloat16,
                options: Optional[DecodeOptions] = None) -> tuple[str, str]:
    """(the path a model with these options decodes through, why), for a tiny random model in ``quant`` on this
    back end."""
    options, back = options or DecodeOptions(), kernels.backend()
    if options.fused is False:
        return "plain MLX ops", "the options say so (ZAYA_FUSED=0)"
    if options.fused:
        what = "with the kernels" if options.kernels and back != "cpu" else "with the kernels' plain-MLX references"
        return f"fused step {what}", "the options say so (ZAYA_FUSED=1)"
    if not options.kernels:
        return "plain MLX ops", "the kernels are off (ZAYA_KERNELS=0)"
    if back == "cpu":
        return "plain MLX ops", "the fused step runs only on a Metal or CUDA GPU"
    model = build_zaya(small_config(), quant, seed=0, dtype=dtype)
    model.decode_options = options
    why = model.decoder.check(model)
    if why is not None:
        return "plain MLX ops", f"the fused step failed its check: {why}"
    return "fused step with the kernels", f"its check against the plain ops passed on this {back} GPU"


def diagnose(quant: Optional[str] = "mxfp4", dtype=mx.bfloat16, options: Optional[DecodeOptions] = None) -> Report:
    """options: the decode options a model gets (`zaya doctor`: the environment's overrides)."""
    back = kernels.backend()
    if back == "cpu":
        note = ("not used: MLX runs on its CPU back end here, where each kernel's plain-MLX reference runs instead "
                "(the kernels need a Metal or CUDA GPU)")
        checks = []
    else:
        note, checks = "", kernel_checks(quant, dtype)
    path, reason = decode_path(quant, dtype, options)
    peak, rate = short_run(quant, dtype, options)
    return Report(machine(), back, note, checks, path, reason, peak, rate)
