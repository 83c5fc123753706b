// zaya-mlx kernels: the Metal prelude.
//
// Every kernel body in this folder (*.h) is written once, in the subset of C++ that the Metal Shading
// Language and CUDA share, and reaches each back end through a prelude: this file for Metal
// (mx.fast.metal_kernel), prelude.cu for CUDA (mx.fast.cuda_kernel). A prelude maps a handful of names:
//   ZK_DEV          an inline device function          ZK_SHARED    threadgroup / __shared__ storage
//   ZK_SHARED16     the same, 16-byte aligned (CUDA)   ZK_LDS4      float4 number i of such an array
//   ZK_WRITABLE(T, p)  input p as a writable T pointer (a kernel that updates a buffer in place)
//   ZK_BARRIER()    a threadgroup barrier              ZK_UNROLL    unroll the next loop
//   ZK_NO_UNROLL    keep the next loop a loop (its rounds' loads are not all hoisted into registers at once)
//   ZK_U2F(u)       reinterpret 32 bits as a float     ZK_LOAD_U4   one 16-byte load (uint4) at index i
//   ZK_LOAD_U2, ZK_LOAD_U1  one 8-byte (uint2) or 4-byte (uint32_t) load at index i
//   ZK_STORE_U1(p, i, v)  a 4-byte (uint32_t) store into input p, in place, at index i (p of any element type)
//   ZK_ATOMIC_ADD(p, i, v)  p[i] += v, atomically (p: a writable float buffer: an output, or ZK_WRITABLE's)
//   ZK_ABSENT(name) an argument this variant does not take: a null pointer the body must not touch
//   ZK_VIEW(name, pack, offset)  an argument that is a float32 slice of another (weights packed into one input)
//   ZK_INPLACE(name, src)  an output the kernel writes into input src's buffer (zk_writable: src made writable)
//   zk_simd_sum/max reductions over a 32-wide SIMD group (a CUDA warp); zk_simd_xor(x, m): lane ^ m's x
//   zk_exp, zk_sqrt, zk_rsqrt, zk_cos, zk_sin, zk_erf  float32 math
//   zk_round<T>(x)  round a float to dtype T and back, to follow a reference that rounds there
// and, after the marker line below, the body prologue: the thread indices every body starts from
// (zk_tid, zk_bx, zk_by, zk_lane, zk_warp). The prologue is part of the kernel source, not the header,
// because MLX adds a Metal attribute argument only when the source names it.

#include <metal_stdlib>
using namespace metal;

#define ZK_DEV inline
#define ZK_SHARED threadgroup
#define ZK_SHARED16 threadgroup  // four scalar reads in ZK_LDS4 need no alignment
#define ZK_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define ZK_UNROLL _Pragma("clang loop unroll(full)")
#define ZK_NO_UNROLL _Pragma("clang loop unroll(disable)")
#define ZK_U2F(u) as_type<float>(static_cast<uint32_t>(u))
#define ZK_LOAD_U4(ptr, i) (((const device uint4*)(ptr))[(i)])
#define ZK_LOAD_U2(ptr, i) (((const device uint2*)(ptr))[(i)])
#define ZK_LOAD_U1(ptr, i) (((const device uint32_t*)(ptr))[(i)])
#define ZK_STORE_U1(ptr, i, v) (((device uint32_t*)(ptr))[(i)] = (v))
#define ZK_ATOMIC_ADD(ptr, i, v) \
  atomic_fetch_add_explicit((device atomic_float*)&(ptr)[(i)], (v), memory_order_relaxed)
#define ZK_LDS4(arr, i) float4((arr)[4 * (i)], (arr)[4 * (i) + 1], (arr)[4 * (i) + 2], (arr)[4 * (i) + 3])
#define ZK_WRITABLE(T, ptr) const_cast<device T*>(ptr)
#define ZK_ABSENT(name) device float* const name = nullptr;
#define ZK_VIEW(name, pack, offset) const device float* const name = (pack) + (offset);
#define ZK_INPLACE(name, src) const auto name = zk_writable(src);

template <typename T>
ZK_DEV device T* zk_writable(const device T* p) {
  return const_cast<device T*>(p);
}

ZK_DEV float zk_simd_sum(float x) {
  return simd_sum(x);
}
ZK_DEV float zk_simd_xor(float x, int mask) {
  return simd_shuffle_xor(x, ushort(mask));
}
ZK_DEV float zk_simd_max(float x) {
  return simd_max(x);
}
ZK_DEV float zk_exp(float x) {
  return metal::precise::exp(x);
}
ZK_DEV float zk_sqrt(float x) {
  return metal::precise::sqrt(x);
}
ZK_DEV float zk_rsqrt(float x) {
  return metal::precise::rsqrt(x);
}
ZK_DEV float zk_cos(float x) {
  return metal::precise::cos(x);
}
ZK_DEV float zk_sin(float x) {
  return metal::precise::sin(x);
}
// Metal has no erf: Abramowitz & Stegun 7.1.26 (absolute error under 1.5e-7).
ZK_DEV float zk_erf(float x) {
  const float ax = metal::abs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float r = 1.0f - poly * metal::precise::exp(-ax * ax);
  return x < 0.0f ? -r : r;
}
template <typename T>
ZK_DEV float zk_round(float x) {
  return static_cast<float>(static_cast<T>(x));
}
// ---- body prologue ----
const int zk_tid = int(thread_position_in_threadgroup.x);
const int zk_bx = int(threadgroup_position_in_grid.x);
const int zk_by = int(threadgroup_position_in_grid.y);
const int zk_lane = int(thread_index_in_simdgroup);
const int zk_warp = int(simdgroup_index_in_threadgroup);
