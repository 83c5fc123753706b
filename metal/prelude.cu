// zaya-mlx kernels: the CUDA prelude (the twin of prelude.metal; see there for what each name means).
// mx.fast.cuda_kernel compiles it with NVRTC after MLX's own header (cuda_bf16.h, cuda_fp16.h, ...).

#define ZK_DEV __device__ __forceinline__
#define ZK_SHARED __shared__
#define ZK_SHARED16 __shared__ __align__(16)
#define ZK_BARRIER() __syncthreads()
#define ZK_UNROLL _Pragma("unroll")
#define ZK_NO_UNROLL _Pragma("unroll 1")
#define ZK_U2F(u) __uint_as_float(static_cast<uint32_t>(u))
#define ZK_LOAD_U4(ptr, i) (reinterpret_cast<const uint4*>(ptr)[(i)])
#define ZK_LOAD_U2(ptr, i) (reinterpret_cast<const uint2*>(ptr)[(i)])
#define ZK_LOAD_U1(ptr, i) (reinterpret_cast<const uint32_t*>(ptr)[(i)])
#define ZK_STORE_U1(ptr, i, v) (((uint32_t*)(ptr))[(i)] = (v))
#define ZK_LDS4(arr, i) (reinterpret_cast<const float4*>(arr)[(i)])
#define ZK_WRITABLE(T, ptr) const_cast<T*>(ptr)
#define ZK_ATOMIC_ADD(ptr, i, v) atomicAdd(&(ptr)[(i)], (v))
// A fence that orders this thread's writes to device memory before its later ones as every thread of the launch
// sees them, and ZK_TICKET(p, i), an atomic p[i] += 1 on an int32 buffer that returns p[i] before: together, the
// last threadgroup of several can take over their results in the same launch. Only CUDA's prelude defines them
// (Metal's device-scope fence needs MSL 3.2): a body uses them inside #ifdef ZK_GRID_FENCE.
#define ZK_GRID_FENCE() __threadfence()
#define ZK_TICKET(ptr, i) atomicAdd(reinterpret_cast<int*>(ptr) + (i), 1)
#define ZK_ABSENT(name) float* const name = nullptr;
#define ZK_VIEW(name, pack, offset) const float* const name = (pack) + (offset);
#define ZK_INPLACE(name, src) const auto name = zk_writable(src);

template <typename T>
ZK_DEV T* zk_writable(const T* p) {
  return const_cast<T*>(p);
}

ZK_DEV float zk_simd_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}
ZK_DEV float zk_simd_xor(float x, int mask) {
  return __shfl_xor_sync(0xffffffffu, x, mask);
}
ZK_DEV float zk_simd_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  }
  return x;
}
ZK_DEV float zk_exp(float x) {
  return expf(x);
}
ZK_DEV float zk_sqrt(float x) {
  return sqrtf(x);
}
ZK_DEV float zk_rsqrt(float x) {
  return rsqrtf(x);
}
ZK_DEV float zk_cos(float x) {
  return cosf(x);
}
ZK_DEV float zk_sin(float x) {
  return sinf(x);
}
ZK_DEV float zk_erf(float x) {
  return erff(x);
}
template <typename T>
ZK_DEV float zk_round(float x) {
  return static_cast<float>(static_cast<T>(x));
}
// ---- body prologue ----
const int zk_tid = int(threadIdx.x);
const int zk_bx = int(blockIdx.x);
const int zk_by = int(blockIdx.y);
const int zk_lane = int(threadIdx.x & 31u);
const int zk_warp = int(threadIdx.x >> 5);
