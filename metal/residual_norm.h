// Residual scaling + RMSNorm for decode, optionally with the router's down-projection: one launch
// where the plain path takes the residual scaling's elementwise ops, a cast, RMSNorm and (with
// HAS_ROUTER) a matmul with bias. h_out = (o + hb) * hs + (h + rb) * rs (the fp32 residual stream),
// x_out = RMSNorm(h_out in T) * nw, and r_out = Wd x_out + bd. Plain-MLX reference:
// zaya_mlx/kernels/norms.py, residual_norm_reference.
//
// Grid: x = NBLK threadgroups per row, y = row n. Every threadgroup recomputes the row's norm (a few KB
// from cache) so that the router rows can be split over NBLK threadgroups without waiting on another;
// threadgroup 0 alone writes h_out and x_out.
// Template: T (activation dtype), RT (dtype of o + hb: T, or float32 when the scales are float32), H,
// HAS_ROUTER, R (router rows), RPB (router rows per threadgroup), WQ (router weights: 0 bf16, 1 f32), NT.
// Inputs: o [N, H] (T, or float32 rounded to T first: the expert kernel's sum), h [N, H] float32, hs, hb, rs,
// rb, nw [H], wd [R, H], bd [R], fparams [1]
// float32 (the RMSNorm eps).
// Outputs: h_out [N, H] float32, x_out [N, H] (T), r_out [N, R] (T) (a dummy without HAS_ROUTER).
constexpr int NWARP = NT / 32;
constexpr int VPW = (WQ == 0) ? 2 : 1;
constexpr int NV = H / (4 * VPW);
constexpr int ITERS = (NV + 31) / 32;
constexpr int QMW = (WQ == 0) ? 0 : 1;
constexpr int EPT = (H + NT - 1) / NT;  // elements of the row a thread takes

const int blk = zk_bx;
const int n = zk_by;

ZK_SHARED float zk_x[H + H / 32];  // padded: see zk_pad
ZK_SHARED float zk_red[NWARP];

// Every input this thread needs is loaded before any is used, with no branch between the loads: a load
// behind a branch (or after a store that could alias it) waits for what came before, so each element's seven
// loads would cost a trip to memory of their own. A thread past the row's end reads element 0 and drops it.
// The router rows come first (one a SIMD group), so their latency passes while the norm is computed.
static_assert(!HAS_ROUTER || RPB <= NWARP, "one router row a SIMD group");
const int o2 = blk * RPB + zk_warp;
const bool rlive = HAS_ROUTER && zk_warp < RPB && o2 < R;
uint4 wr[ITERS];
ZK_UNROLL
for (int it = 0; it < ITERS; ++it) {
  const int v = it * 32 + zk_lane;
  const uint4 w = ZK_LOAD_U4(wd, (rlive && v < NV) ? o2 * NV + v : 0);
  wr[it] = rlive ? w : zk_zero_u4();
}
const float bdv = static_cast<float>(bd[rlive ? o2 : 0]);
float ov[EPT];
float hv[EPT];
float nv[EPT];
{
  float hbv[EPT];
  float hsv[EPT];
  float rbv[EPT];
  float rsv[EPT];
  ZK_UNROLL
  for (int i = 0; i < EPT; ++i) {
    const int k = (zk_tid + i * NT < H) ? zk_tid + i * NT : 0;
    ov[i] = static_cast<float>(o[n * H + k]);  // T, or float32 holding a sum to round to T (below)
    hv[i] = h[n * H + k];
    nv[i] = static_cast<float>(nw[k]);
    hbv[i] = static_cast<float>(hb[k]);
    hsv[i] = static_cast<float>(hs[k]);
    rbv[i] = static_cast<float>(rb[k]);
    rsv[i] = static_cast<float>(rs[k]);
  }
  ZK_UNROLL
  for (int i = 0; i < EPT; ++i) {
    ov[i] = zk_round<RT>(zk_round<RT>(zk_round<T>(ov[i]) + hbv[i]) * hsv[i]);
    hv[i] = (hv[i] + rbv[i]) * rsv[i];
  }
}
const float eps = fparams[0];
float ss = 0.0f;
ZK_UNROLL
for (int i = 0; i < EPT; ++i) {
  const int k = zk_tid + i * NT;
  if (k < H) {
    const float hn = ov[i] + hv[i];
    if (blk == 0) {
      h_out[n * H + k] = hn;
    }
    ov[i] = zk_round<T>(hn);
    ss += ov[i] * ov[i];
  }
}
ss = zk_simd_sum(ss);
if (zk_lane == 0) {
  zk_red[zk_warp] = ss;
}
ZK_BARRIER();
float tot = 0.0f;
for (int w = 0; w < NWARP; ++w) {
  tot += zk_red[w];
}
const float inv = zk_rsqrt(tot / float(H) + eps);
ZK_UNROLL
for (int i = 0; i < EPT; ++i) {
  const int k = zk_tid + i * NT;
  if (k < H) {
    const float xv = zk_round<T>(nv[i] * zk_round<T>(ov[i] * inv));
    zk_x[zk_pad(k)] = xv;
    if (blk == 0) {
      x_out[n * H + k] = static_cast<T>(xv);
    }
  }
}
if (HAS_ROUTER) {
  ZK_BARRIER();
  float a = 0.0f;
  ZK_UNROLL
  for (int it = 0; it < ITERS; ++it) {
    const int v = it * 32 + zk_lane;
    if (v < NV) {
      a += zk_dot_u4<QMW, 16>(wr[it], zk_x, v * 4 * VPW).d;
    }
  }
  a = zk_simd_sum(a);
  if (zk_lane == 0 && rlive) {
    r_out[n * R + o2] = static_cast<T>(a + bdv);
  }
}
