"""Compile the CUDA twins offline with nvcc, the way mx.fast.cuda_kernel assembles them.

No GPU needed: this catches syntax and type errors before spending device time, launches that would need
more registers than an SM has, and threadgroup memory past Metal's 32 KB (the Metal twins share the
bodies). It mimics MLX's generated kernel (MLX's header, then ours, then, with no line break between them as MLX
writes it, a namespace with a __global__ function whose arguments are the inputs and outputs, with template
arguments as `using`/`constexpr` lines).

    python dev/nvcc_check.py                               # nvcc on the PATH (the device machine has it)
    python dev/nvcc_check.py --nvrtc LIB --include DIR...  # NVRTC, as MLX-CUDA compiles: no CUDA toolkit needed
    python dev/nvcc_check.py --nvrtc LIB ... --only attention_8_2_128  # the cases whose names contain this
    python dev/nvcc_check.py --nvrtc LIB ... --step bf16 --batch 1 --context 1100  # the launches of a decode step

The second runs anywhere: `pip download --no-deps "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.*"` (the
NVRTC of the CUDA 13.0 toolkit MLX-CUDA 13 finds on an H100 machine), unzip the wheels, put the NVRTC library's
folder on LD_LIBRARY_PATH (its builtins library loads from there), and pass .../cu13/lib/libnvrtc.so.13, the
runtime's include folder and the CCCL headers MLX-CUDA's wheel carries (mlx/include/cccl). The target is MLX's for
the GPU (`--arch`, sm_90a on an H100 or H200), and a launch's registers count as the SM allocates them, 8 a thread
at a time.
"""

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from zaya_mlx.kernels import _build, attention, cca, experts, head, norms, router  # noqa: E402
import mlx.core as mx  # noqa: E402

MOCK_MLX_HEADER = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/cstdint>
#include <cooperative_groups.h>
using cuda::std::int32_t;
using cuda::std::uint8_t;
using cuda::std::uint32_t;
"""

EPS = _build.float_bits(1e-5)  # a float template argument: its bits
CT = {"bf16": "__nv_bfloat16", "f16": "__half", "f32": "float", "u32": "uint32_t", "i32": "int32_t", "u8": "uint8_t"}


def build(name, body, inputs, outputs, template):
    """inputs, outputs: (name, type) pairs, type None for an argument the variant leaves out (ZK_ABSENT), "pack" for
    one that travels in the packed float32 input (ZK_VIEW; the offsets do not matter to the compiler), "into:<type>"
    for an output written into an input's buffer (ZK_INPLACE)."""
    absent = tuple(n for n, t in inputs + outputs if t is None)
    views = tuple((n, 0) for n, t in inputs if t == "pack")
    into = [(n, t.split(":")[1]) for n, t in outputs if t and t.startswith("into:")]
    inputs = ([(n, t) for n, t in inputs if t and t != "pack"] + ([("zk_pack", "f32")] if views else [])
              + [(_build.INPLACE_PREFIX + n, t) for n, t in into])
    outputs = [(n, t) for n, t in outputs if t and not t.startswith("into:")]
    header, source = _build.kernel_source(body, "cuda", absent, views, tuple(n for n, _ in into))
    return assemble(name, header, source, inputs, outputs, template)


def assemble(name, header, source, inputs, outputs, template):
    """The source NVRTC compiles for a kernel: inputs and outputs as (name, type) pairs, in MLX's order."""
    s = MOCK_MLX_HEADER + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    s += f"__global__ void {name}(\n"
    args = [f"    const {CT[t]}* {n}" for n, t in inputs] + [f"    {CT[t]}* {n}" for n, t in outputs]
    s += ",\n".join(args) + ") {\n"
    for k, v in template:
        s += f"  using {k} = {CT[v]};\n" if isinstance(v, str) else f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()};\n"
    s += "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"
    return s


# Each kernel at ZAYA1-8B's shapes and at the shapes tests/test_kernels.py launches on a GPU: a launch that asks
# for more registers than an SM has fails without an error on MLX-CUDA (the output is whatever memory held), so
# every shape the GPU tests or the model use is compiled here.


def cca_case(nh, nkv, d, t0, t1, rd, t, fused_step=False, kv_bits=0):
    """fused_step: as the fused decode step calls it, q written in place and an ``after`` input. kv_bits: a quantized
    cache's bits (its words, scales and biases; group 64), or 0."""
    kv = "u32" if kv_bits else t
    io = [("qkv", t), ("conv_state", t), ("v_prev", t), ("dw_w", "pack"), ("dw_b", "pack"), ("gw_w", t),
          ("gw_b", "pack"), ("temp", "pack"), ("offset", "i32"), ("inv_freq", "pack"), ("kcache", kv), ("vcache", kv),
          *[(n, t if kv_bits else None) for n in ("kscales", "kbiases", "vscales", "vbiases")],
          ("filled", "i32"), ("capacity", "i32"), ("after", t if fused_step else None)]
    return (f"cca_{nh}_{nkv}_{d}_{t0}{t1}_{t}{'_step' if fused_step else ''}{f'_kv{kv_bits}' if kv_bits else ''}",
            "cca_decode.h", io,
            [("q_out", "into:" + t if fused_step else t), ("conv_out", t), ("vprev_out", t)],
            [("T", t), ("D", d), ("NH", nh), ("NKV", nkv), ("T0", t0), ("T1", t1), ("RD", rd),
             ("NT", cca._threads(cca.mx.bfloat16 if t == "bf16" else cca.mx.float32)), ("EPS", EPS),
             ("KVB", kv_bits), ("KVG", 64)])


# Weight formats as the kernels read them: (QM, weight, scales, biases types (None: absent), bits, group size)
FORMATS = {"bf16": (0, "bf16", None, None, 16, 1), "f32": (1, "f32", None, None, 16, 1),
           "affine4": (2, "u32", "bf16", "bf16", 4, 64), "affine8": (2, "u32", "bf16", "bf16", 8, 32),
           "mxfp4": (3, "u32", "u8", None, 4, 32)}


ROUTER_INPUTS = [("nw", "pack"), ("w1", "bf16"), ("b1", "pack"), ("w2", "bf16"), ("b2", "pack"), ("wo", "bf16"),
                 ("bal", "pack")]


def expert_case(qm, wt, st, bt, bits, gs, routed=False, grouped=False):
    """ZAYA's experts in a format; routed: with its bf16 router MLP inside (else given the choice), adding into its
    input in place (else into its output); grouped: the grouped form at batch 16, adding into its output."""
    router_inputs = ROUTER_INPUTS if routed else [(n, None) for n, _ in ROUTER_INPUTS]
    kind = "routed" if routed else "grouped" if grouped else "chosen"
    return (f"expert_q{qm}_b{bits}_{kind}", "expert_mlp.h",
            [("x", "bf16"), ("expert", None if routed else "i32"), ("rweight", None if routed else "f32"),
             ("wgu", wt), ("sgu", st), ("bgu", bt), ("wd", wt), ("sd", st), ("bd", bt),
             ("r", "bf16" if routed else None),
             *router_inputs, ("yin", "f32" if routed else None)],
            [("y", "f32")],
            [("T", "bf16"), ("H", 2048), ("I", 2048), ("CW", experts._CW), ("QA", qm), ("BA", bits), ("GA", gs),
             ("QB", qm), ("BB", bits), ("GB", gs), ("NE", 16), ("ROUTED", routed), ("TR", "bf16"),
             ("R", 256 if routed else 8), ("NE1", 17 if routed else 1), ("WQ", 0 if routed else 1), ("REPS", EPS),
             ("IN_PLACE", routed), ("NT", experts._NT), ("GROUPED", grouped), ("NTOK", 16 if grouped else 0),
             ("TT", experts.tile_tokens(2048, qm) if grouped else 1)])


def head_case(qm, wt, st, bt, bits, gs, vocab):
    return (f"head_q{qm}_b{bits}_{vocab}", "matvec.h", [("x", "bf16"), ("w", wt), ("scales", st), ("biases", bt)],
            [("y", "bf16")],
            [("T", "bf16"), ("K", 2048), ("NOUT", vocab), ("QM", qm), ("BITS", bits), ("GS", gs), ("RPW", head._RPW),
             ("NT", head._NT)])


def router_case(r, ne1, t):
    return (f"router_{r}_{t}", "router_mlp.h",
            [("r", "bf16"), *[(n, t if n in ("w1", "w2", "wo") else d) for n, d in ROUTER_INPUTS]],
            [("choice", "i32"), ("prob", "f32")],
            [("T", "bf16"), ("R", r), ("NE1", ne1), ("WQ", 0 if t == "bf16" else 1), ("REPS", EPS),
             ("NT", router.threads(r))])


def resnorm_case(h, p, t, qm=None, bits=16, gs=1, bias=True, parts=1, prev=False):
    """p projection rows (0: none), dense in t unless qm names a quantized format (4: mxfp4, else affine); prev: a
    state carried into the projection's output, and the zero row for the expert kernel (as after attention); else
    a projection's variant writes no normed row and runs after an in-place writer (as after the MoE). With a
    projection, the fused step's arrays take the stream (and after attention the state and zero row) in place."""
    qm = (0 if t == "bf16" else 1) if qm is None else qm
    wt, st, bt = (t, None, None) if qm < 2 else ("u32", "u8" if qm == 3 else t, None if qm == 3 else t)
    rpw = norms._rows_per_simd_group(h, qm, bits)
    write_x = prev or p == 0
    return (f"resnorm_{h}_{p}_{t}_q{qm}_b{bits}_{parts}_{prev}", "residual_norm.h",
            [("o", t if parts == 1 else "f32"), ("h", "f32"), ("hs", "pack"), ("hb", "pack"), ("rs", "pack"),
             ("rb", "pack"), ("nw", "pack"), ("w", wt), ("ws", st), ("wb", bt),
             ("bp", "pack" if p > 0 and bias else None),
             ("ps", t if prev else None), ("pss", "pack" if prev else None), ("after", None if write_x else "f32")],
            [("h_out", "into:f32" if p > 0 else "f32"), ("x_out", t if write_x else None),
             ("p_out", ("into:" + t if prev else t) if p > 0 else None), ("z_out", "into:f32" if prev else None)],
            [("T", t), ("RT", t), ("H", h), ("HAS_PROJ", p > 0), ("P", max(p, 1)), ("RPW", rpw), ("QM", qm),
             ("BITS", bits), ("GS", gs), ("HAS_BIAS", p > 0 and bias), ("HAS_PREV", prev), ("NP", parts),
             ("ZEROS", prev), ("WRITE_X", write_x), ("EPS", EPS), ("NT", norms._NT)])


def o_proj_args(o, t, ho=2048):
    """(inputs, template) of o_proj inside attention, in format o (None: without o_proj, its inputs absent)."""
    qm, wt, st, bt, bits, gs = FORMATS[o or "f32"]
    return ([("wo", wt if o else None), ("wos", st), ("wob", bt), ("bo", t if o == "affine8" else None)],
            [("HAS_O", o is not None), ("HO", ho if o else 1), ("QM", qm), ("BITS", bits), ("GS", gs),
             ("HAS_OB", o == "affine8")])


def attention_case(nh, nkv, d, t, split, o=None, step=None, kv_bits=0, hb=None, lanes=32, fuse=False):
    """step: (T0, T1, RD) of a CCA step inside (HAS_CCA: no q, the step's inputs and states), or None. kv_bits: a
    quantized cache's bits (its words, scales and biases; group 64), or 0. hb: query heads a threadgroup (None:
    as HEADS_PER_THREADGROUP has it). lanes: a SIMD group's lanes a key (LANES_PER_KEY). fuse: in chunks, merged in
    the same launch (FUSED_COMBINE)."""
    hb = hb or (1 if step else attention._heads_per_threadgroup(nh, nkv))
    o_in, o_tmpl = o_proj_args(o, t)
    t0, t1, rd = step or (1, 1, 0)
    step_in = [("qkv", t), ("conv_state", t), ("v_prev", t), ("dw_w", "pack"), ("dw_b", "pack"), ("gw_w", t),
               ("gw_b", "pack"), ("temp", "pack"), ("offset", "i32"), ("inv_freq", "pack")]
    kv = "u32" if kv_bits else t
    scales = [(n, t if kv_bits else None) for n in ("kscales", "kbiases", "vscales", "vbiases")]
    return (f"attention_{nh}_{nkv}_{d}_{t}_{'split' if split else 'single'}_{o}{'_cca' if step else ''}"
            f"{f'_kv{kv_bits}' if kv_bits else ''}{f'_hb{hb}' if hb > 1 else ''}{f'_lpk{lanes}' if lanes < 32 else ''}"
            f"{'_fused' if fuse else ''}",
            "decode_attention.h",
            [("q", None if step else t), ("keys", kv), ("values", kv), *scales, ("lpad", "i32"), ("filled", "i32"),
             ("meta", "i32"), *o_in, *[(n, k if step else None) for n, k in step_in]],
            [("out", "f32" if split or o else t), ("ml", "f32" if split else None),
             ("fin", ("f32" if o else t) if fuse else None),
             ("conv_out", t if step else None), ("vprev_out", t if step else None)],
            [("T", t), ("D", d), ("NH", nh), ("NKV", nkv), ("HB", hb), ("NT", attention._threads(hb, d)),
             ("LPK", lanes), ("SPLIT", split), ("FUSE", fuse), *o_tmpl, ("SCALE", _build.float_bits(d ** -0.5)),
             ("HAS_CCA", step is not None), ("T0", t0), ("T1", t1), ("RD", rd), ("EPS", EPS if step else 0), ("KVB", kv_bits), ("KVG", 64)])


def combine_case(o, t="bf16", d=128):
    o_in, o_tmpl = o_proj_args(o, t)
    return (f"attention_combine_{o}", "attention_combine.h", [("part", "f32"), ("ml", "f32"), ("meta", "i32"), *o_in],
            [("out", "f32" if o else t)], [("T", t), ("D", d), ("NH", 8), ("NT", max(256, d) if o else d), *o_tmpl])


DTYPES = ("bf16", "f32")
CASES = [cca_case(*shape[:6], t) for shape in [(8, 2, 128, 2, 2, 64), (6, 3, 48, 3, 2, 16), (4, 4, 64, 2, 3, 64),
                                                (5, 1, 32, 2, 2, 0), (4, 1, 64, 3, 2, 32)] for t in DTYPES]
CASES += [cca_case(8, 2, 128, 2, 2, 64, t, fused_step=True) for t in DTYPES]
# writing a quantized cache (in its own launch where the one with attention does not cover the shapes: float32 here)
CASES += [cca_case(8, 2, 128, 2, 2, 64, t, True, bits) for t in DTYPES for bits in (8, 4)]
CASES += [expert_case(*FORMATS[f], routed, grouped) for f in ("bf16", "f32", "affine4", "affine8", "mxfp4")
          for routed, grouped in ((False, False), (True, False), (False, True))]
CASES += [head_case(*FORMATS[f], vocab) for f in ("bf16", "affine4", "affine8", "mxfp4") for vocab in (262272, 300)]
CASES += [router_case(r, ne1, t) for r, ne1 in ((256, 17), (96, 7)) for t in DTYPES]
CASES += [resnorm_case(h, r, t) for h, r in ((2048, 256), (200, 40), (2048, 0)) for t in DTYPES]
CASES += [resnorm_case(2048, 256, t, parts=8, prev=True) for t in DTYPES]  # after attention: 8 heads' shares
CASES += [resnorm_case(h, p, t, qm, bits, gs, p != 1536) for h, p in ((2048, 1536), (256, 72)) for t in DTYPES
          for qm, bits, gs in ((3, 4, 32), (2, 4, 64), (2, 8, 32))]
CASES += [attention_case(nh, nkv, d, t, False) for nh, nkv, d in ((8, 2, 128), (4, 4, 64), (8, 1, 256), (16, 2, 32))
          for t in DTYPES]
CASES += [attention_case(8, 2, 128, "bf16", True), attention_case(8, 1, 256, "f32", True)]
CASES += [attention_case(8, 2, 128, t, False, o) for t in DTYPES for o in ("bf16", "mxfp4", "affine4", "affine8")]
CASES += [attention_case(8, 2, 128, "f32", False, None)]
CASES += [attention_case(8, 2, 128, "bf16", split, o, (2, 2, 64)) for split in (False, True)
          for o in ("mxfp4", "affine4", "bf16")]  # ZAYA1-8B's CCA step inside attention
CASES += [attention_case(4, 2, 64, t, False, o, (2, 2, 32)) for t in DTYPES for o in (None, t)]
CASES += [attention_case(8, 2, 128, "bf16", split, "mxfp4", (2, 2, 64), bits) for split in (False, True)
          for bits in (8, 4)]  # a quantized KV cache, read and written
CASES += [attention_case(8, 2, 128, "bf16", False, None, None, 8)]
# a KV head's four query heads in one threadgroup (each key read once), in chunks, as after the CCA step's own launch
CASES += [attention_case(8, 2, 128, t, True, "mxfp4", None, bits, hb=4) for t in DTYPES for bits in (0, 8, 4)]
# two keys a SIMD group (LANES_PER_KEY 16): with the CCA step inside, in chunks apart, with a KV head's 4 query heads
CASES += [attention_case(8, 2, 128, "bf16", False, "mxfp4", (2, 2, 64), lanes=16)]  # (float32: the step apart)
CASES += [attention_case(8, 2, 128, t, True, "mxfp4", None, bits, hb, 16)
          for t in DTYPES for bits, hb in ((0, None), (8, 4), (4, 4))]
# in chunks, merged by the last chunk's threadgroup (FUSED_COMBINE): with the CCA step inside and o_proj, apart with
# a KV head's 4 query heads and a quantized cache, without o_proj
CASES += [attention_case(8, 2, 128, "bf16", True, "mxfp4", (2, 2, 64), fuse=True),
          attention_case(8, 2, 128, "bf16", True, "mxfp4", None, 8, 4, fuse=True),
          attention_case(8, 2, 128, "f32", True, None, fuse=True)]
CASES += [combine_case(o) for o in (None, "bf16", "mxfp4", "affine4", "affine8")]


# The launches one fused decode step makes, recorded rather than run: what a model of ZAYA1-8B's shapes launches on
# a left-padded batch cache (as RSA's rollouts are), with every argument as MLX-CUDA would get it.

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "uint32": "u32", "int32": "i32", "uint8": "u8"}


def _type(dtype) -> str:
    return DTYPE_NAMES[str(dtype).split(".")[-1]]


class RecordedKernel:
    """Called like mx.fast.cuda_kernel's result: keeps the launch as a case of this check, returns zeros."""

    def __init__(self, seen, body, inputs, outputs, absent, views, inplace):
        self.seen, self.body, self.inputs, self.outputs = seen, body, inputs, outputs
        self.header, self.source = _build.kernel_source(body, "cuda", absent, views, inplace)

    def __call__(self, *, inputs, template, threadgroup, output_shapes, output_dtypes, **_):
        tmpl = tuple((k, _type(v) if isinstance(v, mx.Dtype) else v) for k, v in template if k != "ZK_DTYPES")
        ins = tuple((n, _type(a.dtype)) for n, a in zip(self.inputs, inputs))
        outs = tuple((n, _type(d)) for n, d in zip(self.outputs, output_dtypes))
        name = f"{self.body.split('.')[0]}_{len(self.seen)}"
        self.seen.setdefault((self.body, ins, outs, tmpl), (name, self.header, self.source, threadgroup[0]))
        return [mx.zeros(tuple(shape), d) for shape, d in zip(output_shapes, output_dtypes)]


def step_cases(quant: str | None, batch: int, context: int, kv_bits: int | None, config=None) -> list:
    """The distinct launches of a fused decode step on a 2-layer model of ZAYA1-8B's widths (or ``config``'s),
    weights as ``quant`` makes them, holding ``context`` positions a row in a left-padded batch cache, as (name,
    source, threads, template)."""
    from dataclasses import replace

    from zaya_mlx.benchmark import build_zaya, full_config
    from zaya_mlx.decode import DecodeOptions
    from zaya_mlx.kernels import kernels_from

    if config is None:
        config = full_config(num_hidden_layers=2)
        config = replace(config, layer_types=config.layer_types[:2])
    model = build_zaya(config, quant)
    model.decode_options = DecodeOptions(fused=True, compile=False)
    cache = model.make_cache([0] * batch, kv_bits=kv_bits)
    model(mx.zeros((batch, context), mx.int32), cache, last_only=True)
    seen = {}
    with kernels_from(lambda *made: RecordedKernel(seen, *made)):
        for _ in range(2):  # the first step may set the cache up
            mx.eval(model(mx.zeros((batch, 1), mx.int32), cache))
    return [(name, assemble(name, header, source, ins, outs, tmpl), threads, dict(tmpl))
            for (body, ins, outs, tmpl), (name, header, source, threads) in seen.items()]


def with_nvcc(nvcc: str, folder: str, arch: str):
    """A compiler for check: nvcc, ptxas's report included."""
    def compile_source(name: str, source: str) -> tuple[bool, str]:
        path = os.path.join(folder, name + ".cu")
        with open(path, "w") as f:
            f.write(source)
        r = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "-c", "-o", os.devnull, "-Xptxas", "-v", path],
                           capture_output=True, text=True)
        return r.returncode == 0, r.stderr
    return compile_source


def with_nvrtc(library: str, includes: list[str], arch: str):
    """A compiler for check: NVRTC (what MLX-CUDA compiles with), ptxas's report included."""
    nvrtc = ctypes.CDLL(library)
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
    options += [f"--include-path={d}".encode() for d in includes]

    def compile_source(name: str, source: str) -> tuple[bool, str]:
        program = ctypes.c_void_p()
        nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None)
        try:
            result = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
        finally:
            nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
        return result == 0, log.value.decode(errors="replace")
    return compile_source


def built(case) -> tuple:
    """A case of CASES as a step's cases are: (name, source, threads, template)."""
    name, body, ins, outs, tmpl = case
    return name, build(name, body, ins, outs, tmpl), dict(tmpl)["NT"], dict(tmpl)


def check(compile_source, case) -> tuple[bool, str]:
    """Compile one case, (name, source, threads, template); (ok, its report line, with the compiler's errors when it
    failed)."""
    name, source, threads, _ = case
    ok, log = compile_source(name, source)
    spill = [ln for ln in log.splitlines() if "spill" in ln and " 0 bytes spill" not in ln]
    regs = [ln.strip() for ln in log.splitlines() if "registers" in ln]
    nregs = int(re.search(r"Used (\d+) registers", regs[-1]).group(1)) if regs else 0
    allocated = -(-nregs // 8) * 8  # an SM gives each thread its registers in units of 8
    if allocated * threads > 65536:  # a launch of NT threads would fail: "too many resources requested"
        ok = False
        spill.append(f"{nregs} registers ({allocated} allocated) x {threads} threads > 65536")
    smem = re.search(r"(\d+) bytes smem", regs[-1]) if regs else None
    if smem and int(smem.group(1)) > 32768:  # the same body on Metal gets 32 KB of threadgroup memory
        ok = False
        spill.append(f"{smem.group(1)} bytes of threadgroup memory > Metal's 32768")
    line = f"{'ok' if ok else 'FAILED':6s} {name:28s} {regs[-1] if regs else ''} {' '.join(spill)}"
    return ok, line if ok else line + "\n" + log[-3000:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvrtc", metavar="LIB", help="compile with this NVRTC library instead of nvcc")
    ap.add_argument("--include", action="append", default=[], metavar="DIR", help="an include folder for NVRTC")
    ap.add_argument("--arch", default="sm_90a", help="the target MLX-CUDA compiles for (an H100 or H200: sm_90a)")
    ap.add_argument("--only", default="", help="the cases whose names contain this")
    ap.add_argument("--step", metavar="WEIGHTS",
                    help="instead of the cases, the launches of one fused decode step of a model with these weights "
                         "(bf16, mxfp4, ...), recorded on this machine")
    ap.add_argument("--batch", type=int, default=1, help="--step: rows of the left-padded batch")
    ap.add_argument("--context", type=int, default=1100, help="--step: positions a row holds (past 1,024: chunks)")
    ap.add_argument("--kv-bits", type=int, default=None, help="--step: a quantized KV cache's bits")
    args = ap.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if not (nvcc or args.nvrtc):
        print("nvcc not found: skipped")
        return 0
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        try:
            compile_source = (with_nvrtc(args.nvrtc, args.include, args.arch) if args.nvrtc
                              else with_nvcc(nvcc, d, args.arch))
        except OSError as e:
            print(f"error: cannot load NVRTC from {args.nvrtc}: {e}", file=sys.stderr)
            return 2
        cases = (step_cases(None if args.step == "bf16" else args.step, args.batch, args.context, args.kv_bits)
                 if args.step else [built(case) for case in CASES])
        cases = [case for case in cases if args.only in case[0]]
        results = list(pool.map(lambda case: check(compile_source, case), cases))
    for _, line in results:
        print(line)
    return 0 if all(ok for ok, _ in results) else 1

if __name__ == "__main__":
    sys.exit(main())
