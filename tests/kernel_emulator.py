"""The kernel bodies in metal/, compiled for the CPU and run with one OS thread per GPU thread.

A kernel's Metal and CUDA versions run only where that GPU is, so without one their shared body (the portable
subset both preludes map) would go untested. Here a third prelude maps the same names onto C++20: threadgroup
memory becomes static storage shared by the threadgroup's threads, a barrier a std::barrier, a SIMD-group
reduction an exchange through memory among its 32 threads, bfloat16 a rounding struct. The emulated kernel is
called like the object mx.fast.cuda_kernel returns, so the real launchers in zaya_mlx/kernels (template
arguments, grid, output shapes) run unchanged against it (see ``emulated``).

What this checks: the bodies' indexing, synchronisation and arithmetic, in float32 as on the GPU. What it does
not: a back end's own compiler, memory model or speed. The CUDA twins run on an NVIDIA GPU
(dev/run_on_device.sh); the Metal twins need a Mac.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import mlx.core as mx
import numpy as np

from zaya_mlx import kernels
from zaya_mlx.kernels import _build

COMPILER = shutil.which("g++")

PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };

inline float zk_bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t zk_float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// bfloat16 with round-to-nearest-even, as a GPU converts
struct bf16 {
  uint16_t b;
  bf16() = default;
  bf16(float f) {
    uint32_t u = zk_float_to_bits(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    b = uint16_t(u >> 16);
  }
  operator float() const { return zk_bits_to_float(uint32_t(b) << 16); }
};

// IEEE half to float (subnormals exact), for the CUDA path of zk_fp4x2
struct __half2 { uint16_t lo, hi; };
inline float zk_half_to_float(uint16_t h) {
  const uint32_t s = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
  float v = (e == 0) ? std::ldexp(float(m), -24) : std::ldexp(float(m | 1024u), int(e) - 25);
  return s ? -v : v;
}
inline float2 __half22float2(__half2 h) { return {zk_half_to_float(h.lo), zk_half_to_float(h.hi)}; }

struct zk_context {
  int tid, bx, by;
  std::barrier<>* block;
  std::barrier<>* warp;
  float* scratch;  // 32 floats of this thread's SIMD group
};
thread_local zk_context zk_ctx;

#define ZK_DEV inline
#define ZK_SHARED static
#define ZK_SHARED16 alignas(16) static
#define ZK_BARRIER() zk_ctx.block->arrive_and_wait()
#define ZK_UNROLL
#define ZK_NO_UNROLL
#define ZK_U2F(u) zk_bits_to_float(static_cast<uint32_t>(u))
#define ZK_LOAD_U4(ptr, i) (reinterpret_cast<const uint4*>(ptr)[(i)])
#define ZK_LOAD_U2(ptr, i) (reinterpret_cast<const uint2*>(ptr)[(i)])
#define ZK_LOAD_U1(ptr, i) (reinterpret_cast<const uint32_t*>(ptr)[(i)])
#define ZK_STORE_U1(ptr, i, v) (((uint32_t*)(ptr))[(i)] = (v))
#define ZK_LDS4(arr, i) (reinterpret_cast<const float4*>(arr)[(i)])
#define ZK_WRITABLE(T, ptr) const_cast<T*>(ptr)
#define ZK_ATOMIC_ADD(ptr, i, v) std::atomic_ref<float>((ptr)[(i)]).fetch_add((v))
#define ZK_GRID_FENCE() std::atomic_thread_fence(std::memory_order_seq_cst)
#define ZK_TICKET(ptr, i) std::atomic_ref<int>(reinterpret_cast<int*>(ptr)[(i)]).fetch_add(1)
#define ZK_ABSENT(name) float* const name = nullptr;
#define ZK_VIEW(name, pack, offset) const float* const name = (pack) + (offset);
#define ZK_INPLACE(name, src) const auto name = zk_writable(src);
template <typename T> T* zk_writable(const T* p) { return const_cast<T*>(p); }

inline float zk_simd_exchange(float x, bool is_max) {
  const int lane = zk_ctx.tid & 31;
  zk_ctx.scratch[lane] = x;
  zk_ctx.warp->arrive_and_wait();
  float r = zk_ctx.scratch[0];
  for (int i = 1; i < 32; ++i) r = is_max ? std::fmax(r, zk_ctx.scratch[i]) : r + zk_ctx.scratch[i];
  zk_ctx.warp->arrive_and_wait();
  return r;
}
inline float zk_simd_xor(float x, int mask) {
  const int lane = zk_ctx.tid & 31;
  zk_ctx.scratch[lane] = x;
  zk_ctx.warp->arrive_and_wait();
  const float r = zk_ctx.scratch[lane ^ mask];
  zk_ctx.warp->arrive_and_wait();
  return r;
}
inline float zk_simd_sum(float x) { return zk_simd_exchange(x, false); }
inline float zk_simd_max(float x) { return zk_simd_exchange(x, true); }
inline float zk_exp(float x) { return std::exp(x); }
inline float zk_sqrt(float x) { return std::sqrt(x); }
inline float zk_rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float zk_cos(float x) { return std::cos(x); }
inline float zk_sin(float x) { return std::sin(x); }
inline float zk_erf(float x) { return std::erf(x); }
template <typename T> inline float zk_round(float x) { return static_cast<float>(static_cast<T>(x)); }
"""

PROLOGUE = """
const int zk_tid = zk_ctx.tid;
const int zk_bx = zk_ctx.bx;
const int zk_by = zk_ctx.by;
const int zk_lane = zk_tid & 31;
const int zk_warp = zk_tid >> 5;
"""

LAUNCHER = r"""
extern "C" void zk_launch(void** args, int gx, int gy, int nt) {
  const int nw = (nt + 31) / 32;
  std::vector<float> scratch(nw * 32);
  for (int by = 0; by < gy; ++by) {
    for (int bx = 0; bx < gx; ++bx) {
      std::barrier<> block(nt);
      std::vector<std::unique_ptr<std::barrier<>>> warps;
      for (int w = 0; w < nw; ++w) warps.emplace_back(new std::barrier<>(std::min(32, nt - 32 * w)));
      std::vector<std::thread> threads;
      for (int t = 0; t < nt; ++t) {
        threads.emplace_back([&, t] {
          zk_ctx = {t, bx, by, &block, warps[t / 32].get(), scratch.data() + 32 * (t / 32)};
          zk_body(args);
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}
"""

_C_TYPES = {mx.bfloat16: "bf16", mx.float32: "float", mx.uint32: "uint32_t", mx.int32: "int32_t", mx.uint8: "uint8_t"}
_NP_TYPES = {mx.bfloat16: np.uint16, mx.float32: np.float32, mx.uint32: np.uint32, mx.int32: np.int32,
             mx.uint8: np.uint8}


def _template_line(name, value) -> str:
    if isinstance(value, mx.Dtype):
        return f"using {name} = {_C_TYPES[value]};"
    if isinstance(value, bool):
        return f"constexpr bool {name} = {'true' if value else 'false'};"
    return f"constexpr int {name} = {int(value)};"


@functools.cache
def _library(source: str) -> ctypes.CDLL:
    """Compile once per distinct source (a body with its template arguments and argument types)."""
    d = os.path.join(tempfile.gettempdir(), "zaya-kernel-emulator")
    os.makedirs(d, exist_ok=True)
    stem = os.path.join(d, hashlib.sha256(source.encode()).hexdigest()[:20])
    if not os.path.exists(stem + ".so"):
        with open(stem + ".cpp", "w") as f:
            f.write(source)
        tmp = f"{stem}.{os.getpid()}.so"
        subprocess.run([COMPILER, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", tmp, stem + ".cpp"],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, stem + ".so")
    return ctypes.CDLL(stem + ".so")


class EmulatedKernel:
    """Called like mx.fast.cuda_kernel's result; runs the body on the CPU and returns mx arrays."""

    def __init__(self, body: str, input_names, output_names, absent=(), views=(), inplace=()):
        self.body, self.input_names, self.output_names = body, tuple(input_names), tuple(output_names)
        self.absent, self.views, self.inplace = tuple(absent), tuple(views), tuple(inplace)

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None, **_):
        # the inputs' own memory where it is contiguous (as MLX passes it), so a body that writes an input in place
        # (ZK_WRITABLE) changes the array
        ins = [np.ascontiguousarray(np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)) for a in inputs]
        # without an init value, outputs start as all-ones bits (NaN in float32 and bfloat16, -1 in int32), as a GPU's
        # fresh memory holds whatever came before: an element the body leaves unwritten shows
        outs = [np.full(tuple(s), init_value, dtype=_NP_TYPES[d]) if init_value is not None
                else np.full((*s, np.dtype(_NP_TYPES[d]).itemsize), 0xFF, np.uint8).view(_NP_TYPES[d]).reshape(tuple(s))
                for s, d in zip(output_shapes, output_dtypes)]
        params = [f"const {_C_TYPES[a.dtype]}* {n}" for n, a in zip(self.input_names, inputs)]
        params += [f"{_C_TYPES[d]}* {n}" for n, d in zip(self.output_names, output_dtypes)]
        unpack = "\n".join(f"{p} = reinterpret_cast<{p.rsplit(' ', 1)[0]}>(args[{i}]);" for i, p in enumerate(params))
        body = _build.compact(_build.declarations(self.absent, self.views, self.inplace) + _build._source(self.body))
        src = (PRELUDE + _build.helpers(body) + "\nstatic void zk_body(void** args) {\n" + unpack + "\n"
               + "\n".join(_template_line(k, v) for k, v in template) + PROLOGUE + body + "\n}\n" + LAUNCHER)
        lib = _library(src)
        nt = int(threadgroup[0])
        gx, gy = int(grid[0]) // nt, int(grid[1]) // int(threadgroup[1])
        ptrs = (ctypes.c_void_p * (len(ins) + len(outs)))(*[a.ctypes.data for a in ins + outs])
        lib.zk_launch(ptrs, gx, gy, nt)
        return [mx.array(o).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(o) for o, d in zip(outs, output_dtypes)]


def emulated():
    """Inside, the kernels' launchers get emulated kernels and the back end reads 'cuda' (the CUDA side of a
    body's #ifdefs), so the model's fused decode runs its kernels' bodies here. Not under mx.compile: an
    emulated kernel reads its inputs' values."""
    return kernels.kernels_from(EmulatedKernel)
