// Top-1 expert matvec for decode: one launch for the selected expert's gate/up projection with SwiGLU
// (GLU = true), one for its down projection scaled by the router weight (GLU = false). It replaces
// mlx-lm's SwitchGLU path for one expert a token (gather_mm / gather_qmm, silu, multiply, gather_mm,
// scale, and masking the skip choice) and reads only the selected expert's rows, for bfloat16 / float32
// weights and MLX's quantized layouts (affine 4/8-bit, MXFP4). Plain-MLX reference:
// zaya_mlx/kernels/experts.py, expert_gather_reference.
//
// Grid: x = blocks of NWARP * RPW outputs (one SIMD group computes RPW outputs, its lanes reading 16
// bytes each along the row; up to four chunks of every row are loaded before any is summed), y = token n.
// expert[n] outside [0, NE) (the skip choice) writes zeros.
// Template: T (activation dtype), K (input width), NOUT (outputs), GLU, QM (0 bf16, 1 f32, 2 affine,
// 3 mxfp4), BITS, GS (quantization group size; one group spans whole 16-byte chunks), NE (experts),
// RPW (outputs per SIMD group), NT (threads).
// Inputs: x [N, K], expert [N] int32, rweight [N] (router weight; read only when GLU is false), w (the
// stacked weights: [NE, ROWS, K] dense or [NE, ROWS, K * BITS / 32] uint32), scales [NE, ROWS, K / GS],
// biases [NE, ROWS, K / GS] (affine only). ROWS = 2 * NOUT (gate rows first, then up) when GLU, else NOUT.
// Output: y [N, NOUT]: silu(gate) * up when GLU, else (W x) * rweight.
constexpr int NWARP = NT / 32;
constexpr int VPW = (QM == 0) ? 2 : ((QM == 1) ? 1 : (32 / BITS));
constexpr int VPV = 4 * VPW;
constexpr int NV = K / VPV;
constexpr int ITERS = (NV + 31) / 32;
constexpr int GPR = (QM >= 2) ? (K / GS) : 1;
constexpr int NR = GLU ? 2 : 1;
constexpr int ROWS = NR * NOUT;
constexpr int IB = (ITERS < 4) ? ITERS : 4;

const int n = zk_by;
const int e = expert[n];
const bool skip = (e < 0) || (e >= NE);

ZK_SHARED float zk_x[K + K / 32];  // padded: see zk_pad
{
  // all loads first: a threadgroup store could alias a later load, which would then wait on the store
  constexpr int EPT = (K + NT - 1) / NT;
  float xv[EPT];
  ZK_UNROLL
  for (int i = 0; i < EPT; ++i) {
    const int k = zk_tid + i * NT;
    xv[i] = (k < K) ? static_cast<float>(x[n * K + k]) : 0.0f;
  }
  ZK_UNROLL
  for (int i = 0; i < EPT; ++i) {
    const int k = zk_tid + i * NT;
    if (k < K) {
      zk_x[zk_pad(k)] = xv[i];
    }
  }
}
ZK_BARRIER();

const int o0 = (zk_bx * NWARP + zk_warp) * RPW;
float acc[RPW * NR];
ZK_UNROLL
for (int i = 0; i < RPW * NR; ++i) {
  acc[i] = 0.0f;
}
if (!skip) {
  // IB chunks of each of the RPW * NR rows at a time, with their scales (and biases): all loads in flight
  // before the sums, which then need no row indices. A chunk never straddles a quantization group.
  ZK_UNROLL
  for (int it0 = 0; it0 < ITERS; it0 += IB) {
    uint4 u[RPW * NR][IB];
    float sc[RPW * NR][IB];
    float bi[RPW * NR][IB];
    bool live[RPW * NR][IB];
    ZK_UNROLL
    for (int i = 0; i < RPW * NR; ++i) {
      const int row = e * ROWS + (i % NR) * NOUT + o0 + i / NR;
      ZK_UNROLL
      for (int j = 0; j < IB; ++j) {
        const int v = (it0 + j) * 32 + zk_lane;
        const int gi = row * GPR + (v * VPV) / GS;
        live[i][j] = (o0 + i / NR < NOUT) && (v < NV);
        u[i][j] = live[i][j] ? ZK_LOAD_U4(w, row * NV + v) : zk_zero_u4();
        sc[i][j] = (QM == 2 && live[i][j]) ? static_cast<float>(scales[gi])
                 : ((QM == 3 && live[i][j]) ? ZK_U2F(static_cast<uint32_t>(scales[gi]) << 23) : 1.0f);
        bi[i][j] = (QM == 2 && live[i][j]) ? static_cast<float>(biases[gi]) : 0.0f;
      }
    }
    ZK_UNROLL
    for (int i = 0; i < RPW * NR; ++i) {
      ZK_UNROLL
      for (int j = 0; j < IB; ++j) {
        if (live[i][j]) {
          const zk_pair p = zk_dot_u4<QM, BITS>(u[i][j], zk_x, ((it0 + j) * 32 + zk_lane) * VPV);
          if (QM == 2) {
            acc[i] += sc[i][j] * p.d + bi[i][j] * p.s;
          } else if (QM == 3) {
            acc[i] += sc[i][j] * p.d;
          } else {
            acc[i] += p.d;
          }
        }
      }
    }
  }
}

ZK_UNROLL
for (int r = 0; r < RPW; ++r) {
  const int o = o0 + r;
  const float a0 = zk_simd_sum(acc[r * NR]);
  const float a1 = (NR == 2) ? zk_simd_sum(acc[r * NR + NR - 1]) : 0.0f;
  if (zk_lane == 0 && o < NOUT) {
    float out = 0.0f;
    if (!skip) {
      if (GLU) {
        const float gate = zk_round<T>(a0);
        const float up = zk_round<T>(a1);
        const float act = zk_round<T>(gate / (1.0f + zk_exp(-gate)));
        out = act * up;
      } else {
        out = zk_round<T>(a0) * zk_round<T>(static_cast<float>(rweight[n]));
      }
    }
    y[n * NOUT + o] = static_cast<T>(out);
  }
}
