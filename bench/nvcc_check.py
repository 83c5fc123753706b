"""Compile the CUDA twins offline with nvcc, the way mx.fast.cuda_kernel assembles them.

No GPU needed: this catches syntax and type errors before spending device time, launches that would need
more registers than an SM has, and threadgroup memory past Metal's 32 KB (the Metal twins share the
bodies). It mimics MLX's generated kernel (MLX's header, then ours, then a __global__ function whose
arguments are the inputs and outputs, with template arguments as `using`/`constexpr` lines).
Usage: python bench/nvcc_check.py
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from zaya_mlx.kernels import _build, attention, cca, experts, norms, router  # noqa: E402

MOCK_MLX_HEADER = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cooperative_groups.h>
"""

CT = {"bf16": "__nv_bfloat16", "f16": "__half", "f32": "float", "u32": "uint32_t", "i32": "int32_t", "u8": "uint8_t"}


def build(name, body, inputs, outputs, template):
    header, source = _build.kernel_source(body, "cuda")
    s = MOCK_MLX_HEADER + header + "\nnamespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
    s += f"__global__ void {name}(\n"
    args = [f"    const {CT[t]}* {n}" for n, t in inputs] + [f"    {CT[t]}* {n}" for n, t in outputs]
    s += ",\n".join(args) + ") {\n"
    for k, v in template:
        s += f"  using {k} = {CT[v]};\n" if isinstance(v, str) else f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()};\n"
    s += source + "\n}\n}\n"
    return s


CASES = [
    ("cca_bf16", "cca_decode.h",
     [("qkv", "bf16"), ("conv_state", "bf16"), ("v_prev", "bf16"), ("dw_w", "bf16"), ("dw_b", "bf16"),
      ("gw_w", "bf16"), ("gw_b", "bf16"), ("temp", "bf16"), ("offset", "i32"), ("inv_freq", "f32"), ("fparams", "f32")],
     [("q_out", "bf16"), ("k_out", "bf16"), ("v_out", "bf16"), ("conv_out", "bf16"), ("vprev_out", "bf16")],
     [("T", "bf16"), ("D", 128), ("NH", 8), ("NKV", 2), ("T0", 2), ("T1", 2), ("RD", 64), ("NT", cca._threads(cca.mx.bfloat16))]),
    ("cca_f32", "cca_decode.h",
     [("qkv", "f32"), ("conv_state", "f32"), ("v_prev", "f32"), ("dw_w", "f32"), ("dw_b", "f32"),
      ("gw_w", "f32"), ("gw_b", "f32"), ("temp", "f32"), ("offset", "i32"), ("inv_freq", "f32"), ("fparams", "f32")],
     [("q_out", "f32"), ("k_out", "f32"), ("v_out", "f32"), ("conv_out", "f32"), ("vprev_out", "f32")],
     [("T", "f32"), ("D", 64), ("NH", 4), ("NKV", 1), ("T0", 3), ("T1", 2), ("RD", 32), ("NT", cca._threads(cca.mx.float32))]),
    ("cca_f32_d128", "cca_decode.h",
     [("qkv", "f32"), ("conv_state", "f32"), ("v_prev", "f32"), ("dw_w", "f32"), ("dw_b", "f32"),
      ("gw_w", "f32"), ("gw_b", "f32"), ("temp", "f32"), ("offset", "i32"), ("inv_freq", "f32"), ("fparams", "f32")],
     [("q_out", "f32"), ("k_out", "f32"), ("v_out", "f32"), ("conv_out", "f32"), ("vprev_out", "f32")],
     [("T", "f32"), ("D", 128), ("NH", 8), ("NKV", 2), ("T0", 2), ("T1", 2), ("RD", 64), ("NT", cca._threads(cca.mx.float32))]),
]
for qm, wt, st, bt, bits, gs in [(0, "bf16", "f32", "f32", 16, 1), (1, "f32", "f32", "f32", 16, 1),
                                 (2, "u32", "bf16", "bf16", 4, 64), (2, "u32", "bf16", "bf16", 8, 32),
                                 (3, "u32", "u8", "f32", 4, 32)]:
    for glu in (True, False):
        CASES.append((f"expert_q{qm}_b{bits}_{'glu' if glu else 'down'}", "expert_matvec.h",
                      [("x", "bf16"), ("expert", "i32"), ("rweight", "bf16"), ("w", wt), ("scales", st), ("biases", bt)],
                      [("y", "bf16")],
                      [("T", "bf16"), ("K", 2048), ("NOUT", 2048), ("GLU", glu), ("QM", qm), ("BITS", bits), ("GS", gs),
                       ("NE", 16), ("RPW", experts._RPW), ("NT", experts._NT)]))
for wq, wt in [(0, "bf16"), (1, "f32")]:
    for prev in (True, False):
        CASES.append((f"router_w{wq}_{prev}", "router_mlp.h",
                      [("rdown", "bf16"), ("rprev", "bf16"), ("rscale", "bf16"), ("nw", "bf16"), ("w1", wt), ("b1", "bf16"),
                       ("w2", wt), ("b2", "bf16"), ("wo", wt), ("bal", "f32"), ("fparams", "f32")],
                      [("rnext", "bf16"), ("choice", "i32"), ("prob", "bf16")],
                      [("T", "bf16"), ("R", 256), ("NE1", 17), ("HAS_PREV", prev), ("WQ", wq), ("NT", router._threads(256))]))
for router, t in ((True, "bf16"), (False, "bf16"), (True, "f32")):
    CASES.append((f"resnorm_{router}_{t}", "residual_norm.h",
                  [("o", t), ("h", "f32"), ("hs", t), ("hb", t), ("rs", t), ("rb", t),
                   ("nw", t), ("wd", t), ("bd", t), ("fparams", "f32")],
                  [("h_out", "f32"), ("x_out", t), ("r_out", t)],
                  [("T", t), ("RT", t), ("H", 2048), ("HAS_ROUTER", router), ("R", 256), ("RPB", norms._RPB),
                   ("WQ", 0 if t == "bf16" else 1), ("NT", norms._NT)]))
for split, D, t in ((False, 128, "bf16"), (True, 128, "bf16"), (False, 256, "bf16"), (False, 256, "f32")):
    hb = attention._heads_per_threadgroup(8, 1 if D == 256 else 2)
    CASES.append((f"attention_{'split' if split else 'single'}_d{D}_{t}", "decode_attention.h",
                  [("q", t), ("keys", t), ("values", t), ("lpad", "i32"), ("meta", "i32"), ("fparams", "f32")],
                  [("out", "f32" if split else t), ("ml", "f32")],
                  [("T", t), ("D", D), ("NH", 8), ("NKV", 1 if D == 256 else 2), ("HB", hb),
                   ("NT", attention._threads(hb, D)), ("SPLIT", split)]))
CASES.append(("attention_combine", "attention_combine.h", [("part", "f32"), ("ml", "f32"), ("meta", "i32")],
              [("out", "bf16")], [("T", "bf16"), ("D", 128), ("NT", 128)]))


def check(nvcc: str, folder: str, case) -> tuple[bool, str]:
    """Compile one case; (ok, its report line, with nvcc's errors when it failed)."""
    name, body, ins, outs, tmpl = case
    path = os.path.join(folder, name + ".cu")
    with open(path, "w") as f:
        f.write(build(name, body, ins, outs, tmpl))
    r = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-c", "-o", os.devnull, "-Xptxas", "-v", path],
                       capture_output=True, text=True)
    spill = [ln for ln in r.stderr.splitlines() if "spill" in ln and " 0 bytes spill" not in ln]
    regs = [ln.strip() for ln in r.stderr.splitlines() if "registers" in ln]
    nregs = int(re.search(r"Used (\d+) registers", regs[-1]).group(1)) if regs else 0
    threads = dict(tmpl)["NT"]
    ok = r.returncode == 0
    if nregs * threads > 65536:  # a launch of NT threads would fail: "too many resources requested"
        ok = False
        spill.append(f"{nregs} registers x {threads} threads > 65536")
    smem = re.search(r"(\d+) bytes smem", regs[-1]) if regs else None
    if smem and int(smem.group(1)) > 32768:  # the same body on Metal gets 32 KB of threadgroup memory
        ok = False
        spill.append(f"{smem.group(1)} bytes of threadgroup memory > Metal's 32768")
    line = f"{'ok' if ok else 'FAILED':6s} {name:28s} {regs[-1] if regs else ''} {' '.join(spill)}"
    return ok, line if ok else line + "\n" + r.stderr[-3000:]


def main():
    nvcc = shutil.which("nvcc")
    if not nvcc:
        print("nvcc not found: skipped")
        return 0
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda case: check(nvcc, d, case), CASES))
    for _, line in results:
        print(line)
    return 0 if all(ok for ok, _ in results) else 1

if __name__ == "__main__":
    sys.exit(main())
