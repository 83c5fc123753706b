// zaya-mlx kernels: portable helpers shared by the bodies (placed after the prelude, before a body).

struct zk_pair {
  float d;  // sum of x * code (or x * weight for dense rows)
  float s;  // sum of x (affine rows need it for the bias term)
};

// One MXFP4 (e2m1) code to float: sign bit 3, exponent bits 2..1, mantissa bit 0.
ZK_DEV float zk_fp4(uint32_t q) {
  const uint32_t em = q & 7u;
  uint32_t bits = (em < 2u) ? (em * (126u << 23)) : ((((em >> 1) + 126u) << 23) | ((em & 1u) << 22));
  bits |= (q & 8u) << 28;
  return ZK_U2F(bits);
}

// Two MXFP4 codes (bits 0-3 and 16-19 of q) times 2^-14. On CUDA, e2m1's sign, exponent and mantissa
// bits placed in a half's give exactly that value (0.5 becomes a half subnormal), and one instruction
// converts the pair; Metal takes the codes one at a time.
ZK_DEV float2 zk_fp4x2(uint32_t q) {
#ifdef __METAL_VERSION__
  return float2(zk_fp4(q & 15u) * 6.103515625e-05f, zk_fp4((q >> 16) & 15u) * 6.103515625e-05f);
#else
  const uint32_t h = ((q & 0x00070007u) << 9) | ((q & 0x00080008u) << 12);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
#endif
}

// The dot product of one 32-bit word of a weight row with the matching inputs xs[k ...].
// QM: 0 = bfloat16 pairs, 1 = float32, 2 = affine BITS-bit codes, 3 = MXFP4 codes.
template <int QM, int BITS, typename PX>
ZK_DEV zk_pair zk_dot_word(uint32_t w, PX xs, int k) {
  zk_pair p = {0.0f, 0.0f};
  if (QM == 0) {
    p.d = xs[k] * ZK_U2F(w << 16) + xs[k + 1] * ZK_U2F(w & 0xffff0000u);
  } else if (QM == 1) {
    p.d = xs[k] * ZK_U2F(w);
  } else if (QM == 2) {
    ZK_UNROLL
    for (int j = 0; j < 32 / BITS; ++j) {
      const float xv = xs[k + j];
      p.d += xv * static_cast<float>((w >> (BITS * j)) & ((1u << BITS) - 1u));
      p.s += xv;
    }
  } else {
    ZK_UNROLL
    for (int j = 0; j < 4; ++j) {
      const float2 f = zk_fp4x2(w >> (4 * j));
      p.d += xs[k + j] * f.x + xs[k + j + 4] * f.y;
    }
    p.d *= 16384.0f;
  }
  return p;
}

// A 16-byte chunk of zeros (for loads that a guard skips).
ZK_DEV uint4 zk_zero_u4() {
  uint4 z;
  z.x = 0u;
  z.y = 0u;
  z.z = 0u;
  z.w = 0u;
  return z;
}

// One 16-byte chunk of a weight row, with its quantization group's scale (1 for dense rows) and bias (affine
// rows; else 0): the chunk contributes s * dot + b * sum(x).
struct zk_chunk {
  uint4 u;
  float s;
  float b;
};

// Chunk v of weight row `row` (nv chunks a row, VPV values a chunk, GS values a quantization group; QM as in
// zk_dot_word). A chunk that is not live reads row 0's first chunk instead and comes back zero: the load is
// issued either way, with no branch in front of it, and adds nothing (zero codes, zero bias).
template <int QM, int GS, int VPV, typename PW, typename PS, typename PB>
ZK_DEV zk_chunk zk_load_chunk(PW w, PS scales, PB biases, int row, int nv, int v, bool live) {
  const int rr = live ? row : 0;
  const int vv = live ? v : 0;
  const int gi = rr * ((nv * VPV) / GS) + (vv * VPV) / GS;
  zk_chunk ch;
  ch.u = ZK_LOAD_U4(w, rr * nv + vv);
  ch.s = (QM == 2) ? static_cast<float>(scales[gi])
       : ((QM == 3) ? ZK_U2F(static_cast<uint32_t>(scales[gi]) << 23) : 1.0f);
  ch.b = (QM == 2) ? static_cast<float>(biases[gi]) : 0.0f;
  if (!live) {
    ch.u = zk_zero_u4();
    ch.b = 0.0f;  // the bias term multiplies the inputs' sum, which a dropped chunk still sees
  }
  return ch;
}

// Where x[k] lives in a padded threadgroup vector: one spare word after every 32. A SIMD group whose
// lanes read runs of 4, 8, 16 or 32 consecutive values (one 16-byte weight chunk each) then touches 32
// different banks per read instead of a few banks many times over.
ZK_DEV int zk_pad(int k) {
  return k + (k >> 5);
}

// The dot product of one 16-byte chunk (four words, 4 * 32 / BITS values) with xs[p ...], contiguous.
template <int QM, int BITS, typename PX>
ZK_DEV zk_pair zk_dot_chunk(uint4 u, PX xs, int p) {
  constexpr int VPW = (QM == 0) ? 2 : ((QM == 1) ? 1 : (32 / BITS));
  const zk_pair a = zk_dot_word<QM, BITS>(u.x, xs, p);
  const zk_pair b = zk_dot_word<QM, BITS>(u.y, xs, p + VPW);
  const zk_pair c = zk_dot_word<QM, BITS>(u.z, xs, p + 2 * VPW);
  const zk_pair d = zk_dot_word<QM, BITS>(u.w, xs, p + 3 * VPW);
  zk_pair r = {(a.d + b.d) + (c.d + d.d), (a.s + b.s) + (c.s + d.s)};
  return r;
}

// The dot product of one 16-byte chunk with a padded vector xs from value k (see zk_pad; a chunk never
// straddles a 32-value boundary, so it stays contiguous there).
template <int QM, int BITS, typename PX>
ZK_DEV zk_pair zk_dot_u4(uint4 u, PX xs, int k) {
  return zk_dot_chunk<QM, BITS>(u, xs, zk_pad(k));
}

// Where x[k] lives in a threadgroup vector padded by four values after every 32: a chunk of 4, 8, 16 or
// 32 values starts 16-byte aligned, so it is read as float4s, and the eight lanes that share a 16-byte
// read phase (lanes reading consecutive chunks) touch all 32 banks once.
ZK_DEV int zk_pad4(int k) {
  return k + ((k >> 5) << 2);
}

// zk_dot_u4 over a zk_pad4 vector, p = zk_pad4(k) of the chunk's first value: the chunk's inputs come in
// as float4 reads (a chunk never straddles a 32-value boundary, so it stays contiguous there).
template <int QM, int BITS, typename PX>
ZK_DEV zk_pair zk_dot_u4_aligned(uint4 u, PX xs, int p) {
  constexpr int VPW = (QM == 0) ? 2 : ((QM == 1) ? 1 : (32 / BITS));
  float xv[4 * VPW];
  ZK_UNROLL
  for (int i = 0; i < VPW; ++i) {
    const float4 f = ZK_LDS4(xs, p / 4 + i);
    xv[4 * i] = f.x;
    xv[4 * i + 1] = f.y;
    xv[4 * i + 2] = f.z;
    xv[4 * i + 3] = f.w;
  }
  return zk_dot_chunk<QM, BITS>(u, xv, 0);
}

// Adds one round of loaded chunks to their rows' sums: RPW rows of IB chunks (chunk v = (it0 + c) * 32 + lane;
// those past NV were loaded as zeros), against x in a zk_pad4 vector. ch: zk_chunk[RPW][IB]; acc: float[RPW].
template <int QM, int BITS, int VPV, int NV, int RPW, int IB, typename PC, typename PA, typename PX>
ZK_DEV void zk_add_round(PC ch, PA acc, PX xs, int it0, int lane) {
  ZK_UNROLL
  for (int i = 0; i < RPW; ++i) {
    ZK_UNROLL
    for (int c = 0; c < IB; ++c) {
      const int v = (it0 + c) * 32 + lane;
      const zk_pair p = zk_dot_u4_aligned<QM, BITS>(ch[i][c].u, xs, zk_pad4(((v < NV) ? v : 0) * VPV));
      acc[i] += ch[i][c].s * p.d + ch[i][c].b * p.s;
    }
  }
}

// Each of a SIMD group's RPW row sums, reduced over its lanes, into sums[warp * RPW + i] (lane 0 writes).
template <int RPW, typename PA, typename PS>
ZK_DEV void zk_store_row_sums(PA acc, PS sums, int warp, int lane) {
  ZK_UNROLL
  for (int i = 0; i < RPW; ++i) {
    const float a = zk_simd_sum(acc[i]);
    if (lane == 0) {
      sums[warp * RPW + i] = a;
    }
  }
}

// y[r] = sum_k W[r, c0 + k] xs[k] (+ bias[r] with add_bias) for every row r < NOUT: a matrix's KD columns from
// c0 against a vector in threadgroup memory. So a threadgroup that holds one attention head's output adds that
// head's share of o_proj, W_o[:, head] o_head, with no other threadgroup's result. LPR lanes share a row, each
// taking CPL of the slice's 16-byte chunks, whose inputs it keeps in registers for every row; a lane loads RB
// rows' chunks at once, then the LPR lanes' sums meet by shuffles. W as in zk_load_chunk: K columns in all (NV =
// K / VPV chunks a row), QM/BITS/GS its format; c0 and KD are whole chunks, KD / VPV a power of two (at most 32
// lanes a row) or a multiple of 32; NT a multiple of 32.
template <int QM, int BITS, int GS, int K, int KD, int NOUT, int NT, typename PW, typename PS, typename PB,
          typename PBO, typename PX, typename PY>
ZK_DEV void zk_slice_matvec(PW w, PS ws, PB wb, PBO bias, bool add_bias, PX xs, int c0, PY y, int tid) {
  constexpr int VPV = 4 * ((QM == 0) ? 2 : ((QM == 1) ? 1 : (32 / BITS)));
  constexpr int NV = K / VPV;
  constexpr int CPR = KD / VPV;                         // chunks of a row's slice
  constexpr int LPR = (CPR < 32) ? CPR : 32;            // lanes a row
  constexpr int CPL = CPR / LPR;                        // chunks a lane
  constexpr int RPR = NT / LPR;                         // rows a round of the threadgroup, one a lane group
  constexpr int CHUNKS = 8;                             // 16-byte chunks a lane loads at once (a round)
  constexpr int RB = (CPL >= CHUNKS) ? 1 : CHUNKS / CPL;  // rows a lane loads at once
  constexpr int ROUNDS = (NOUT + RPR * RB - 1) / (RPR * RB);
  const int j = tid % LPR;  // this lane's chunks: j, j + LPR, ...
  const int rl = tid / LPR;
  float xv[CPL][VPV];
  ZK_UNROLL
  for (int c = 0; c < CPL; ++c) {
    ZK_UNROLL
    for (int v = 0; v < VPV; ++v) {
      xv[c][v] = xs[(j + c * LPR) * VPV + v];
    }
  }
  ZK_NO_UNROLL  // unrolled, the compiler would load every round's chunks at once: too many registers
  for (int g = 0; g < ROUNDS; ++g) {
    zk_chunk ch[RB][CPL];
    ZK_UNROLL
    for (int i = 0; i < RB; ++i) {
      const int r = (g * RB + i) * RPR + rl;
      ZK_UNROLL
      for (int c = 0; c < CPL; ++c) {
        ch[i][c] = zk_load_chunk<QM, GS, VPV>(w, ws, wb, r, NV, c0 / VPV + j + c * LPR, r < NOUT);
      }
    }
    ZK_UNROLL
    for (int i = 0; i < RB; ++i) {
      float a = 0.0f;
      ZK_UNROLL
      for (int c = 0; c < CPL; ++c) {
        const zk_pair p = zk_dot_chunk<QM, BITS>(ch[i][c].u, xv[c], 0);
        a += ch[i][c].s * p.d + ch[i][c].b * p.s;
      }
      ZK_UNROLL
      for (int m = LPR / 2; m > 0; m >>= 1) {
        a += zk_simd_xor(a, m);
      }
      const int r = (g * RB + i) * RPR + rl;
      if (j == 0 && r < NOUT) {
        y[r] = a + (add_bias ? static_cast<float>(bias[r]) : 0.0f);
      }
    }
  }
}
