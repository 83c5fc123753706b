// Top-1 expert matvec for decode: one launch for the selected expert's gate/up projection with SwiGLU
// (GLU = true), one for its down projection scaled by the router weight (GLU = false). It replaces
// mlx-lm's SwitchGLU path for one expert a token (gather_mm / gather_qmm, silu, multiply, gather_mm,
// scale, and masking the skip choice) and reads only the selected expert's rows, for bfloat16 / float32
// weights and MLX's quantized layouts (affine 4/8-bit, MXFP4). Plain-MLX reference:
// zaya_mlx/kernels/experts.py, expert_gather_reference.
//
// Grid: x = blocks of NWARP * RPW outputs (one SIMD group computes RPW outputs, its lanes reading 16
// bytes each along the row), y = token n. expert[n] outside [0, NE) (the skip choice) writes zeros.
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

const int n = zk_by;
const int e = expert[n];
const bool skip = (e < 0) || (e >= NE);

ZK_SHARED float zk_x[K];
for (int k = zk_tid; k < K; k += NT) {
  zk_x[k] = static_cast<float>(x[n * K + k]);
}
ZK_BARRIER();

const int o0 = (zk_bx * NWARP + zk_warp) * RPW;
float acc[RPW * NR];
ZK_UNROLL
for (int i = 0; i < RPW * NR; ++i) {
  acc[i] = 0.0f;
}
if (!skip) {
  ZK_UNROLL
  for (int r = 0; r < RPW; ++r) {
    ZK_UNROLL
    for (int t = 0; t < NR; ++t) {
      const int o = o0 + r;
      if (o < NOUT) {
        const int row = e * ROWS + t * NOUT + o;
        float a = 0.0f;
        ZK_UNROLL
        for (int it = 0; it < ITERS; ++it) {
          const int v = it * 32 + zk_lane;
          if (v < NV) {
            const uint4 u = ZK_LOAD_U4(w, row * NV + v);
            const int k0 = v * VPV;
            const zk_pair p = zk_dot_u4<QM, BITS>(u, zk_x, k0);
            if (QM == 2) {
              const int gi = row * GPR + k0 / GS;
              a += static_cast<float>(scales[gi]) * p.d + static_cast<float>(biases[gi]) * p.s;
            } else if (QM == 3) {
              a += ZK_U2F(static_cast<uint32_t>(scales[row * GPR + k0 / GS]) << 23) * p.d;
            } else {
              a += p.d;
            }
          }
        }
        acc[r * NR + t] = a;
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
