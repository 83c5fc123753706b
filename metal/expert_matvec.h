// Top-1 expert matvec for decode: one launch for the selected expert's gate/up projection with SwiGLU
// (GLU = true), one for its down projection scaled by the router weight (GLU = false). It replaces
// mlx-lm's SwitchGLU path for one expert a token (gather_mm / gather_qmm, silu, multiply, gather_mm,
// scale, and masking the skip choice) and reads only the selected expert's rows, for bfloat16 / float32
// weights and MLX's quantized layouts (affine 4/8-bit, MXFP4). Plain-MLX reference:
// zaya_mlx/kernels/experts.py, expert_gather_reference.
//
// Grid: x = blocks of RPB = NWARP * RPW weight rows, y = token n. A SIMD group sums RPW rows, its lanes
// reading 16 bytes each along a row (up to four chunks of every row loaded before any is summed); the
// sums meet in threadgroup memory, where a GLU output finds its gate row (block row 2j) beside its up
// row (2j + 1). expert[n] outside [0, NE) (the skip choice) writes zeros.
// Template: T (activation dtype), K (input width), NOUT (outputs), GLU, QM (0 bf16, 1 f32, 2 affine,
// 3 mxfp4), BITS (4 or 8 when quantized), GS (quantization group size; one group spans whole 16-byte
// chunks), NE (experts), RPW (rows per SIMD group), NT (threads).
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
constexpr int RPB = NWARP * RPW;  // weight rows a threadgroup
constexpr int OPB = RPB / NR;     // outputs a threadgroup
constexpr int IB = (ITERS < 4) ? ITERS : 4;

const int n = zk_by;
const int e = expert[n];
const bool skip = (e < 0) || (e >= NE);
const float rw = GLU ? 1.0f : static_cast<float>(rweight[n]);

ZK_SHARED16 float zk_x[K + K / 8];  // padded: see zk_pad4
ZK_SHARED float zk_s[RPB];
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
      zk_x[zk_pad4(k)] = xv[i];
    }
  }
}
ZK_BARRIER();

float acc[RPW];
ZK_UNROLL
for (int i = 0; i < RPW; ++i) {
  acc[i] = 0.0f;
}
if (!skip) {
  // IB chunks of each of the RPW rows at a time, with their scales (and biases): all loads in flight
  // before the sums. A chunk never straddles a quantization group.
  ZK_UNROLL
  for (int it0 = 0; it0 < ITERS; it0 += IB) {
    uint4 u[RPW][IB];
    float sc[RPW][IB];
    float bi[RPW][IB];
    bool live[RPW][IB];
    ZK_UNROLL
    for (int i = 0; i < RPW; ++i) {
      const int j = zk_warp * RPW + i;  // the threadgroup's row j
      const int o = zk_bx * OPB + j / NR;
      const int row = e * ROWS + (j % NR) * NOUT + o;
      ZK_UNROLL
      for (int c = 0; c < IB; ++c) {
        const int v = (it0 + c) * 32 + zk_lane;
        const int gi = row * GPR + (v * VPV) / GS;
        live[i][c] = (o < NOUT) && (v < NV);
        u[i][c] = live[i][c] ? ZK_LOAD_U4(w, row * NV + v) : zk_zero_u4();
        sc[i][c] = (QM == 2 && live[i][c]) ? static_cast<float>(scales[gi])
                 : ((QM == 3 && live[i][c]) ? ZK_U2F(static_cast<uint32_t>(scales[gi]) << 23) : 1.0f);
        bi[i][c] = (QM == 2 && live[i][c]) ? static_cast<float>(biases[gi]) : 0.0f;
      }
    }
    ZK_UNROLL
    for (int i = 0; i < RPW; ++i) {
      ZK_UNROLL
      for (int c = 0; c < IB; ++c) {
        if (live[i][c]) {
          const zk_pair p = zk_dot_u4_aligned<QM, BITS>(u[i][c], zk_x, zk_pad4(((it0 + c) * 32 + zk_lane) * VPV));
          if (QM == 2) {
            acc[i] += sc[i][c] * p.d + bi[i][c] * p.s;
          } else if (QM == 3) {
            acc[i] += sc[i][c] * p.d;
          } else {
            acc[i] += p.d;
          }
        }
      }
    }
  }
}
ZK_UNROLL
for (int i = 0; i < RPW; ++i) {
  const float a = zk_simd_sum(acc[i]);
  if (zk_lane == 0) {
    zk_s[zk_warp * RPW + i] = a;
  }
}
ZK_BARRIER();

if (zk_tid < OPB) {
  const int o = zk_bx * OPB + zk_tid;
  if (o < NOUT) {
    float out = 0.0f;
    if (!skip) {
      if (GLU) {
        const float gate = zk_round<T>(zk_s[2 * zk_tid]);
        const float up = zk_round<T>(zk_s[2 * zk_tid + 1]);
        const float act = zk_round<T>(gate / (1.0f + zk_exp(-gate)));
        out = act * up;
      } else {
        out = zk_round<T>(zk_s[zk_tid]) * zk_round<T>(rw);
      }
    }
    y[n * NOUT + o] = static_cast<T>(out);
  }
}
