// ZAYA router MLP for decode: one launch per step and layer for everything after the router's
// down-projection. It replaces: r = r_down + r_prev * router_states_scale (the router state passed on
// to the next layer), RMSNorm, fc1 + GELU, fc2 + GELU, the output projection to NE1 = experts + skip
// logits, softmax, argmax of (p + balancing_biases) and gathering p at the choice: about a dozen
// primitives. Plain-MLX reference: zaya_mlx/kernels/router.py, router_mlp_reference.
//
// Grid: one threadgroup of NT threads per token (x = n). Matvecs: a SIMD group takes RB output rows at
// a time, its lanes along each row in 16-byte loads; the R-wide vectors live in threadgroup memory. The one
// threadgroup is bound by instruction latency (ncu: 10 cycles an issued instruction, 39% of cycles issuing),
// so the RB row sums are reduced together and finished one row a lane (see the layer loop).
// Template: T (activation dtype), R (router width, a multiple of 8), NE1, HAS_PREV, WQ (weights:
// 0 bf16, 1 f32), NT.
// Inputs: rdown [N, R], rprev [N, R], rscale [R], nw [R], w1 [R, R], b1 [R], w2 [R, R], b2 [R],
// wo [NE1, R], bal [NE1] float32, fparams [1] float32 (the RMSNorm eps).
// Outputs: rnext [N, R] (T), choice [N] int32, prob [N] float32 (softmax in float32 over T logits).
constexpr int NWARP = NT / 32;
constexpr int VPW = (WQ == 0) ? 2 : 1;
constexpr int NV = R / (4 * VPW);
constexpr int ITERS = (NV + 31) / 32;
constexpr int QMW = (WQ == 0) ? 0 : 1;
// rows a SIMD group loads at once: at most 16 chunks a lane, a power of two (R <= 1024, so ITERS <= 4)
constexpr int RB = (ITERS == 1) ? 16 : ((ITERS == 2) ? 8 : 4);
constexpr int LRB = (RB == 16) ? 4 : ((RB == 8) ? 3 : 2);  // log2(RB)

const int n = zk_bx;

ZK_SHARED float zk_a[R + R / 32];  // padded vectors: see zk_pad
ZK_SHARED float zk_h[R + R / 32];
ZK_SHARED float zk_l[NE1];
ZK_SHARED float zk_red[NWARP];

// Router state and its squared norm.
float ss = 0.0f;
for (int k = zk_tid; k < R; k += NT) {
  float r = static_cast<float>(rdown[n * R + k]);
  if (HAS_PREV) {
    r = zk_round<T>(r + zk_round<T>(static_cast<float>(rprev[n * R + k]) * static_cast<float>(rscale[k])));
  }
  rnext[n * R + k] = static_cast<T>(r);
  zk_a[zk_pad(k)] = r;
  ss += r * r;
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
const float inv = zk_rsqrt(tot / float(R) + fparams[0]);
for (int k = zk_tid; k < R; k += NT) {
  zk_h[zk_pad(k)] = zk_round<T>(static_cast<float>(nw[k]) * zk_round<T>(zk_a[zk_pad(k)] * inv));
}
ZK_BARRIER();

// fc1 + GELU: zk_h -> zk_a; fc2 + GELU: zk_a -> zk_h; logits: zk_h -> zk_l. RB rows of a SIMD group at
// a time, all their loads in flight before the sums: with the layers unrolled, no branch separates them (a
// load behind a branch waits for what came before it).
// The RB partial sums of a lane are then reduced over the SIMD group together: at step k a lane keeps half
// of its rows and trades the other half with lane ^ 2^k, so RB rows take RB - 1 exchanges where one sum per
// row takes 5 RB, and lane l < RB ends with row bitreverse(l) (its bit k is lane bit k, from the top). That
// lane alone adds the bias and applies GELU, in parallel with the other rows' lanes.
int rrow = 0;  // the row (of the RB) this lane finishes
ZK_UNROLL
for (int k = 0; k < LRB; ++k) {
  rrow |= ((zk_lane >> k) & 1) << (LRB - 1 - k);
}
ZK_UNROLL
for (int layer = 0; layer < 3; ++layer) {
  const int nout = (layer == 2) ? NE1 : R;
  for (int o0 = zk_warp * RB; o0 < nout; o0 += NWARP * RB) {
    // a row past nout loads row 0: its sum ends on a lane that writes nothing
    uint4 u[RB][ITERS];
    ZK_UNROLL
    for (int i = 0; i < RB; ++i) {
      ZK_UNROLL
      for (int it = 0; it < ITERS; ++it) {
        const int v = it * 32 + zk_lane;
        const int idx = ((o0 + i < nout) ? o0 + i : 0) * NV + ((v < NV) ? v : 0);
        u[i][it] = (layer == 0) ? ZK_LOAD_U4(w1, idx) : ((layer == 1) ? ZK_LOAD_U4(w2, idx) : ZK_LOAD_U4(wo, idx));
      }
    }
    const int o = o0 + rrow;
    const int ob = (o < nout) ? o : 0;
    const float bias = (layer == 2) ? 0.0f : static_cast<float>(layer == 0 ? b1[ob] : b2[ob]);
    float a[RB];
    ZK_UNROLL
    for (int i = 0; i < RB; ++i) {
      a[i] = 0.0f;
      ZK_UNROLL
      for (int it = 0; it < ITERS; ++it) {
        const int v = it * 32 + zk_lane;
        if (v < NV) {
          a[i] += (layer == 1) ? zk_dot_u4<QMW, 16>(u[i][it], zk_a, v * 4 * VPW).d
                               : zk_dot_u4<QMW, 16>(u[i][it], zk_h, v * 4 * VPW).d;
        }
      }
    }
    ZK_UNROLL
    for (int k = 0; k < 5; ++k) {
      if (k < LRB) {
        const int half = RB >> (k + 1);  // rows left after this step
        const bool upper = ((zk_lane >> k) & 1) != 0;
        ZK_UNROLL
        for (int i = 0; i < RB / 2; ++i) {
          if (i < half) {
            const float keep = upper ? a[i + half] : a[i];
            const float send = upper ? a[i] : a[i + half];
            a[i] = keep + zk_simd_xor(send, 1 << k);
          }
        }
      } else {
        a[0] += zk_simd_xor(a[0], 1 << k);
      }
    }
    if (zk_lane < RB && o < nout) {
      if (layer == 2) {
        zk_l[o] = zk_round<T>(a[0]);
      } else {
        const float z = zk_round<T>(a[0] + bias);
        const float gl = zk_round<T>(0.5f * z * (1.0f + zk_erf(z * 0.7071067811865476f)));
        if (layer == 0) {
          zk_a[zk_pad(o)] = gl;
        } else {
          zk_h[zk_pad(o)] = gl;
        }
      }
    }
  }
  ZK_BARRIER();
}

// Softmax over the NE1 logits (one SIMD group), then the biased argmax (thread 0).
if (zk_warp == 0) {
  float m = -3.0e38f;
  for (int j = zk_lane; j < NE1; j += 32) {
    m = (zk_l[j] > m) ? zk_l[j] : m;
  }
  m = zk_simd_max(m);
  float s = 0.0f;
  for (int j = zk_lane; j < NE1; j += 32) {
    s += zk_exp(zk_l[j] - m);
  }
  s = zk_simd_sum(s);
  float pj[(NE1 + 31) / 32];
  for (int j = zk_lane, t = 0; j < NE1; j += 32, ++t) {
    pj[t] = zk_exp(zk_l[j] - m) / s;
  }
  for (int j = zk_lane, t = 0; j < NE1; j += 32, ++t) {
    zk_l[j] = pj[t];
  }
}
ZK_BARRIER();
if (zk_tid == 0) {
  float best = -3.0e38f;
  int bi = 0;
  for (int j = 0; j < NE1; ++j) {
    const float v = zk_l[j] + bal[j];
    if (v > best) {
      best = v;
      bi = j;
    }
  }
  choice[n] = bi;
  prob[n] = zk_l[bi];
}
