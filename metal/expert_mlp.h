// Top-1 expert MLP for decode, in one launch: the selected expert's gate/up projection with SwiGLU, then its
// down projection scaled by the router weight, reading only that expert's rows, for bfloat16 / float32
// weights and MLX's quantized layouts (affine 4/8-bit, MXFP4). It replaces mlx-lm's SwitchGLU path for one
// expert a token (gather_mm / gather_qmm, silu, multiply, gather_mm, scale, and masking the skip choice).
// With ROUTED, every threadgroup first runs the token's router MLP itself (zk_route in common.h, from the
// router state r) instead of reading the choice and weight: a router launch less a layer, for a few hundred
// KB of router weights each threadgroup reads from L2.
// Plain-MLX reference: zaya_mlx/kernels/experts.py, expert_gather_reference (routed_expert_gather_reference).
//
// Grid: x = block c of CW intermediate channels, y = token n (GROUPED: expert e, below). A threadgroup computes its
// CW channels of h = silu(gate) * up (2 * CW weight rows, RPW a SIMD group, its lanes reading 16 bytes each along a
// row), then those channels' share of the down projection, W_down[:, c*CW : (c+1)*CW] h_c, for all H outputs, and
// adds it times the router weight to y with atomics. y starts at zero, so the I / CW shares sum to (W_down h) *
// weight: y is the output, zeroed by the launch's init value (MLX fills it before the launch), or, with IN_PLACE,
// the input yin, a zeroed row the post-attention residual norm made for this launch alone, which the kernel adds
// into in place (as the CCA kernel writes the KV cache). Then the output y only orders the reader of yin after this
// launch: its one element is never written. Splitting the down projection's sum over I is what lets one launch do
// both projections: no threadgroup has all of h, but each block's share needs only its own.
// With GROUPED (a batch of tokens, not routed here), the grid's y is the expert e instead, and a threadgroup
// takes the tokens that chose e, TT at a time (a tile: their x side by side in threadgroup memory): each weight
// chunk it loads serves every token of the tile, so an expert's rows are read once a step for up to TT tokens
// (again, mostly from L2, for each further tile), and an expert no token chose is not read at all. Each token's
// arithmetic is the one-token form's, in the same order.
// The skip choice (an expert outside [0, NE)) adds nothing. Every weight load of a round is issued before
// any is used, and the first round's before x is stored to threadgroup memory, so a single-round format
// (4-bit at ZAYA's widths) makes one trip to memory.
// Template: T (activation dtype), H, I, CW (a multiple of the 16-byte chunk of both weight formats), QA, BA,
// GA (gate/up weights: QM 0 bf16, 1 f32, 2 affine, 3 mxfp4; bits; group size), QB, BB, GB (the same for
// down), NE (experts), ROUTED, TR, R, NE1, WQ, REPS (the router: r's dtype, then as in router_mlp.h; placeholders
// without ROUTED), IN_PLACE, NT (threads; 2 * CW a multiple of its SIMD groups), GROUPED, NTOK (tokens, with
// GROUPED), TT (tokens a tile: 1 without GROUPED; TT * CW <= NT).
// Inputs: x [N, H], expert [N] int32, rweight [N] (the choice and its weight; absent with ROUTED), wgu [NE, 2I,
// H] (gate rows first, then up; dense, or packed uint32), sgu, bgu (scales, biases: [NE, 2I, H / GA]), wd [NE,
// H, I], sd, bd ([NE, H, I / GB]); with ROUTED, r [N, R] and the router's nw, w1, b1, w2, b2, wo, bal as
// router_mlp.h reads them (absent without); yin [N, H] float32 (zeros, added into with IN_PLACE; else absent).
// An argument a variant does not read is absent (ZK_ABSENT: scales or biases a weight format has none of, too).
// Output: y [N, H] float32: (W_down h) * weight, with h rounded to T where the reference rounds; with IN_PLACE,
// that goes to yin and y is [1], unwritten.
constexpr int NWARP = NT / 32;
constexpr int VPVA = 4 * ((QA == 0) ? 2 : ((QA == 1) ? 1 : (32 / BA)));  // values a 16-byte chunk
constexpr int VPVB = 4 * ((QB == 0) ? 2 : ((QB == 1) ? 1 : (32 / BB)));
constexpr int NVA = H / VPVA;                        // chunks a gate/up row
constexpr int ITA = (NVA + 31) / 32;                 // ... a lane
constexpr int RPW = (2 * CW) / NWARP;                // gate/up rows a SIMD group
constexpr int IB0 = 4 / RPW;                         // chunks a row a round: at most 4 chunks in flight a lane
constexpr int IB = (IB0 < 1) ? 1 : ((IB0 < ITA) ? IB0 : ITA);
constexpr int NVB = I / VPVB;                        // chunks a down row
constexpr int NCB = CW / VPVB;                       // ... in this block's columns
constexpr int DR = (H + NT - 1) / NT;                // down rows a thread
constexpr int RB0 = (NCB >= 4) ? 1 : 4 / NCB;        // down rows a round: at most 4 chunks in flight
constexpr int RB = (RB0 < DR) ? RB0 : DR;
constexpr int EPT = (H + NT - 1) / NT;               // elements of x a thread stores
constexpr int XP = ((H + H / 8) + 3) / 4 * 4;        // a token's padded x (see zk_pad4), whole float4s
static_assert(RPW * NWARP == 2 * CW, "the block's gate/up rows split evenly over the SIMD groups");
static_assert(NCB * VPVB == CW, "a block's down columns are whole 16-byte chunks");
static_assert(TT * CW <= NT, "a thread a channel of the tile's SwiGLU");
static_assert(GROUPED || TT == 1, "a token a threadgroup without GROUPED");

const int c = zk_bx;

ZK_SHARED16 float zk_x[TT * XP];
ZK_SHARED float zk_s[TT * 2 * CW];
ZK_SHARED float zk_h[TT * CW];
ZK_SHARED float zk_ra[R + R / 32];  // the router's (see zk_route)
ZK_SHARED float zk_rh[R + R / 32];
ZK_SHARED float zk_rl[NE1];
ZK_SHARED float zk_rred[NWARP];
ZK_SHARED int zk_e[1];

// The threadgroup's expert e and its tile of tokens: tok[t] and its router weight rw[t], for t < nt.
int e;
int tok[TT];
float rw[TT];
int nt = 1;
if (GROUPED) {
  e = zk_by;
} else {
  float prob;
  tok[0] = zk_by;
  if (ROUTED) {
    const zk_routed best = zk_route<TR, R, NE1, WQ, NT>(r + tok[0] * R, nw, w1, b1, w2, b2, wo, bal, ZK_U2F(REPS),
                                                       zk_ra, zk_rh, zk_rl, zk_rred, zk_tid);
    e = best.choice;
    prob = best.prob;
  } else {
    e = expert[tok[0]];
    prob = static_cast<float>(rweight[tok[0]]);
  }
  if (e < 0 || e >= NE) {
    return;  // the skip choice: y stays zero (uniform over the threadgroup: no barrier is left waiting)
  }
  rw[0] = zk_round<T>(prob);
}

int scan = 0;  // GROUPED: the next token to look at
int ew = e;    // the expert whose rows the tile reads
for (int tile = 0;; ++tile) {
  if (GROUPED) {  // the next TT tokens that chose e (the same for every thread: all leave, or none)
    nt = 0;
    for (; scan < NTOK && nt < TT; ++scan) {
      if (expert[scan] == e) {
        tok[nt] = scan;
        rw[nt] = zk_round<T>(static_cast<float>(rweight[scan]));
        ++nt;
      }
    }
    if (nt == 0) {
      break;
    }
    if (zk_tid == 0) {
      zk_e[0] = e;
    }
    ZK_BARRIER();  // the last tile's reads of zk_x, zk_s and zk_h are done
    // The expert as read back after the barrier: the compiler cannot then hoist the weight loads out of this loop
    // (every round's chunks held in registers at once, far past what 512 threads have).
    ew = zk_e[0];
  }

  // Gate/up row j of the block (j = zk_warp * RPW + i): gate row c*CW + j/2 when j is even, up row when odd,
  // so a channel's gate and up sums land side by side in zk_s. Each round loads IB chunks of each row, and adds
  // them against each token of the tile; the first also loads the first round of down rows and stages the
  // tile's x, after its weight loads are issued.
  zk_chunk ga[RPW][IB];
  zk_chunk dn[RB][NCB];
  float acc[TT][RPW];
  ZK_UNROLL
  for (int t = 0; t < TT; ++t) {
    ZK_UNROLL
    for (int i = 0; i < RPW; ++i) {
      acc[t][i] = 0.0f;
    }
  }
  ZK_UNROLL
  for (int it0 = 0; it0 < ITA; it0 += IB) {
    ZK_UNROLL
    for (int i = 0; i < RPW; ++i) {
      const int j = zk_warp * RPW + i;
      const int row = ew * 2 * I + (j & 1) * I + c * CW + (j >> 1);
      ZK_UNROLL
      for (int k = 0; k < IB; ++k) {
        const int v = (it0 + k) * 32 + zk_lane;
        ga[i][k] = zk_load_chunk<QA, GA, VPVA>(wgu, sgu, bgu, row, NVA, v, it0 + k < ITA && v < NVA);
      }
    }
    if (it0 == 0) {  // the same for every thread: the barrier below is reached by all or none
      ZK_UNROLL
      for (int i = 0; i < RB; ++i) {
        const int r = zk_tid + i * NT;
        ZK_UNROLL
        for (int k = 0; k < NCB; ++k) {
          dn[i][k] = zk_load_chunk<QB, GB, VPVB>(wd, sd, bd, ew * H + r, NVB, c * NCB + k, r < H);
        }
      }
      ZK_UNROLL
      for (int t = 0; t < TT; ++t) {
        if (t < nt) {
          float xv[EPT];
          ZK_UNROLL
          for (int i = 0; i < EPT; ++i) {
            const int k = zk_tid + i * NT;
            xv[i] = static_cast<float>(x[tok[t] * H + ((k < H) ? k : 0)]);
          }
          ZK_UNROLL
          for (int i = 0; i < EPT; ++i) {
            const int k = zk_tid + i * NT;
            if (k < H) {
              zk_x[t * XP + zk_pad4(k)] = xv[i];
            }
          }
        }
      }
      ZK_BARRIER();
    }
    ZK_UNROLL
    for (int t = 0; t < TT; ++t) {
      if (t < nt) {
        zk_add_round<QA, BA, VPVA, NVA, RPW, IB>(ga, acc[t], zk_x + t * XP, it0, zk_lane);
      }
    }
  }
  ZK_UNROLL
  for (int t = 0; t < TT; ++t) {
    if (t < nt) {
      zk_store_row_sums<RPW>(acc[t], zk_s + t * 2 * CW, zk_warp, zk_lane);
    }
  }
  ZK_BARRIER();
  if (zk_tid < nt * CW) {
    const float gate = zk_round<T>(zk_s[2 * zk_tid]);  // tile token zk_tid / CW, channel zk_tid % CW
    const float up = zk_round<T>(zk_s[2 * zk_tid + 1]);
    const float act = zk_round<T>(gate / (1.0f + zk_exp(-gate)));
    zk_h[zk_tid] = zk_round<T>(act * up);
  }
  ZK_BARRIER();

  // The block's share of every down row, for each token of the tile, added to y.
  ZK_UNROLL
  for (int r0 = 0; r0 < DR; r0 += RB) {
    if (r0 > 0) {
      ZK_UNROLL
      for (int i = 0; i < RB; ++i) {
        const int r = zk_tid + (r0 + i) * NT;
        ZK_UNROLL
        for (int k = 0; k < NCB; ++k) {
          dn[i][k] = zk_load_chunk<QB, GB, VPVB>(wd, sd, bd, ew * H + r, NVB, c * NCB + k, r0 + i < DR && r < H);
        }
      }
    }
    ZK_UNROLL
    for (int i = 0; i < RB; ++i) {
      const int r = zk_tid + (r0 + i) * NT;
      ZK_UNROLL
      for (int t = 0; t < TT; ++t) {
        if (t < nt) {
          float a = 0.0f;
          ZK_UNROLL
          for (int k = 0; k < NCB; ++k) {
            const zk_pair p = zk_dot_chunk<QB, BB>(dn[i][k].u, zk_h + t * CW, k * VPVB);
            a += dn[i][k].s * p.d + dn[i][k].b * p.s;
          }
          if (r0 + i < DR && r < H) {
            if (IN_PLACE) {
              ZK_ATOMIC_ADD(ZK_WRITABLE(float, yin), tok[t] * H + r, a * rw[t]);
            } else {
              ZK_ATOMIC_ADD(y, tok[t] * H + r, a * rw[t]);
            }
          }
        }
      }
    }
  }
  if (!GROUPED) {
    break;
  }
}
