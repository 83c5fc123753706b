// Residual scaling + RMSNorm for decode, optionally with a projection of the normed row: one launch where
// the plain path takes the residual scaling's elementwise ops, a cast, RMSNorm and (with HAS_PROJ) a matmul
// (+ bias). h_out = (o + hb) * hs + (h + rb) * rs (the fp32 residual stream), x_out = RMSNorm(h_out in T) * nw,
// and p_out = W x_out (+ b) (+ ps * pss with HAS_PREV). After attention, W is the router's down-projection, and ps
// the previous layer's router state, so p_out is this layer's; after the MoE, W is the next layer's in_proj, whose
// q, k and values go straight to the CCA step. Plain-MLX reference:
// zaya_mlx/kernels/norms.py, residual_norm_reference.
//
// Grid: x = NBLK threadgroups per row, y = row n. Every threadgroup recomputes the row's norm (a few KB from
// cache) so that the projection's rows can be split over NBLK threadgroups without waiting on another;
// threadgroup 0 alone writes h_out and x_out. A SIMD group sums RPW projection rows, its lanes holding the
// rows' 16-byte chunks in registers.
// Template: T (activation dtype), RT (dtype of o + hb: T, or float32 when the scales are float32), H,
// HAS_PROJ, P (projection rows), RPW (rows a SIMD group), QM, BITS, GS (the projection's weights: QM 0 bf16,
// 1 f32, 2 affine, 3 mxfp4; bits; group size), HAS_BIAS, HAS_PREV, NP (o's partial sums a row), ZEROS, WRITE_X
// (false: no x_out, where only p_out is read), EPS (the RMSNorm eps's float32 bits), NT. An argument a variant
// does not read may be absent (ZK_ABSENT).
// Inputs: o [N, NP, H] (T, or float32 rounded to T first: the expert kernel's sum, or the NP shares of o_proj
// that the attention kernel's head blocks wrote, summed here), h [N, H] float32, hs, hb, rs,
// rb, nw [H], w ([P, H] dense or [P, H * BITS / 32] uint32), ws, wb (scales, biases: [P, H / GS]), bp [P]
// (the projection's bias), ps [N, P], pss [P] (T: a state carried into p_out, and its scale), after (not read:
// an array that orders this launch after the one that wrote o in place).
// Outputs: h_out [N, H] float32, x_out [N, H] (T) with WRITE_X, p_out [N, P] (T) with HAS_PROJ, z_out [N, H]
// float32 zeros with ZEROS (the row the expert kernel adds its sum into).
constexpr int NWARP = NT / 32;
constexpr int VPV = 4 * ((QM == 0) ? 2 : ((QM == 1) ? 1 : (32 / BITS)));  // values a 16-byte chunk
constexpr int NV = H / VPV;              // chunks a projection row
constexpr int ITERS = (NV + 31) / 32;    // ... a lane
constexpr int RPB = NWARP * RPW;         // projection rows a threadgroup
constexpr int EPT = (H + NT - 1) / NT;   // elements of the row a thread takes

const int blk = zk_bx;
const int n = zk_by;

ZK_SHARED float zk_x[H + H / 32];  // padded: see zk_pad
ZK_SHARED float zk_red[NWARP];

// Every input this thread needs is loaded before any is used, with no branch between the loads: a load
// behind a branch (or after a store that could alias it) waits for what came before, so each element's seven
// loads would cost a trip to memory of their own. A thread past the row's end reads element 0 and drops it.
// The projection's rows come first, so their latency passes while the norm is computed.
zk_chunk wr[RPW][ITERS];
float bpv[RPW];
float psv[RPW];
ZK_UNROLL
for (int i = 0; i < RPW; ++i) {
  const int row = blk * RPB + zk_warp * RPW + i;
  ZK_UNROLL
  for (int it = 0; it < ITERS; ++it) {
    const int v = it * 32 + zk_lane;
    wr[i][it] = zk_load_chunk<QM, GS, VPV>(w, ws, wb, row, NV, v, HAS_PROJ && row < P && v < NV);
  }
  bpv[i] = HAS_BIAS ? static_cast<float>(bp[(row < P) ? row : 0]) : 0.0f;
  psv[i] = HAS_PREV ? zk_round<T>(static_cast<float>(ps[n * P + ((row < P) ? row : 0)]) *
                                  static_cast<float>(pss[(row < P) ? row : 0]))
                    : 0.0f;
}
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
    ov[i] = static_cast<float>(o[n * NP * H + k]);  // T, or float32 holding a sum to round to T (below)
    ZK_UNROLL
    for (int p = 1; p < NP; ++p) {
      ov[i] += static_cast<float>(o[(n * NP + p) * H + k]);
    }
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
const float eps = ZK_U2F(EPS);
float ss = 0.0f;
ZK_UNROLL
for (int i = 0; i < EPT; ++i) {
  const int k = zk_tid + i * NT;
  if (k < H) {
    const float hn = ov[i] + hv[i];
    if (blk == 0) {
      h_out[n * H + k] = hn;
      if (ZEROS) {
        z_out[n * H + k] = 0.0f;
      }
    }
    ov[i] = zk_round<T>(hn);
    ss += ov[i] * ov[i];
  }
}
const float inv = zk_rsqrt(zk_threadgroup_sum<NWARP>(ss, zk_red, zk_lane, zk_warp) / float(H) + eps);
ZK_UNROLL
for (int i = 0; i < EPT; ++i) {
  const int k = zk_tid + i * NT;
  if (k < H) {
    const float xv = zk_round<T>(nv[i] * zk_round<T>(ov[i] * inv));
    zk_x[zk_pad(k)] = xv;
    if (WRITE_X && blk == 0) {
      x_out[n * H + k] = static_cast<T>(xv);
    }
  }
}
if (HAS_PROJ) {
  ZK_BARRIER();
  ZK_UNROLL
  for (int i = 0; i < RPW; ++i) {
    float a = 0.0f;
    ZK_UNROLL
    for (int it = 0; it < ITERS; ++it) {
      const int v = it * 32 + zk_lane;
      const zk_pair p = zk_dot_u4<QM, BITS>(wr[i][it].u, zk_x, ((v < NV) ? v : 0) * VPV);
      a += wr[i][it].s * p.d + wr[i][it].b * p.s;
    }
    a = zk_simd_sum(a);
    const int row = blk * RPB + zk_warp * RPW + i;
    if (zk_lane == 0 && row < P) {
      p_out[n * P + row] = static_cast<T>(HAS_PREV ? zk_round<T>(a + bpv[i]) + psv[i] : a + bpv[i]);
    }
  }
}
