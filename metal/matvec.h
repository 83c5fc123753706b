// Matrix-vector products for a few rows (the LM head of a decode step): y = W x for each of N rows of x, for
// bfloat16 / float32 weights and MLX's quantized layouts (affine 4/8-bit, MXFP4). MLX's quantized matmul
// takes ~4.7x as long for one row of ZAYA's MXFP4 head (bench/bench_kernels.py --only "LM head"); this body
// reads the matrix once a row, so it serves up to kernels.head.MAX_ROWS rows. Plain-MLX reference:
// zaya_mlx/kernels/head.py, lm_head_reference.
//
// Grid: x = row n of x, y = blocks of RPB = NWARP * RPW weight rows: the rows of x that read a block run one after
// another, so all but the first find its weights in L2. A SIMD group sums RPW rows, its lanes
// reading 16 bytes each along a row (up to four chunks of every row loaded before any is summed); the sums
// meet in threadgroup memory.
// Template: T (activation dtype), K (input width), NOUT (outputs), QM (0 bf16, 1 f32, 2 affine, 3 mxfp4), BITS
// (4 or 8 when quantized), GS (quantization group size; one group spans whole 16-byte chunks), RPW (rows per
// SIMD group), NT (threads).
// Inputs: x [N, K], w ([NOUT, K] dense or [NOUT, K * BITS / 32] uint32), scales [NOUT, K / GS], biases
// [NOUT, K / GS] (affine only).
// Output: y [N, NOUT] = W x, rounded to T.
constexpr int NWARP = NT / 32;
constexpr int VPW = (QM == 0) ? 2 : ((QM == 1) ? 1 : (32 / BITS));
constexpr int VPV = 4 * VPW;
constexpr int NV = K / VPV;
constexpr int ITERS = (NV + 31) / 32;
constexpr int RPB = NWARP * RPW;  // weight rows (outputs) a threadgroup
constexpr int IB = (ITERS < 4) ? ITERS : 4;

const int n = zk_bx;
const int blk = zk_by;

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
// IB chunks of each of the RPW rows at a time, with their scales (and biases): all loads in flight
// before the sums. A chunk never straddles a quantization group.
ZK_UNROLL
for (int it0 = 0; it0 < ITERS; it0 += IB) {
  zk_chunk ch[RPW][IB];
  ZK_UNROLL
  for (int i = 0; i < RPW; ++i) {
    const int row = blk * RPB + zk_warp * RPW + i;
    ZK_UNROLL
    for (int c = 0; c < IB; ++c) {
      const int v = (it0 + c) * 32 + zk_lane;
      ch[i][c] = zk_load_chunk<QM, GS, VPV>(w, scales, biases, row, NV, v, row < NOUT && v < NV);
    }
  }
  zk_add_round<QM, BITS, VPV, NV, RPW, IB>(ch, acc, zk_x, it0, zk_lane);
}
zk_store_row_sums<RPW>(acc, zk_s, zk_warp, zk_lane);
ZK_BARRIER();

if (zk_tid < RPB) {
  const int o = blk * RPB + zk_tid;
  if (o < NOUT) {
    y[n * NOUT + o] = static_cast<T>(zk_s[zk_tid]);
  }
}
