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

// A 32-bit word of T values (two bfloat16, low half first, or one float32) into out[k ...] as float32.
template <typename T, typename PO>
ZK_DEV void zk_unpack_word(uint32_t w, PO out, int k) {
  if (sizeof(T) == 4) {
    out[k] = ZK_U2F(w);
  } else {
    out[k] = ZK_U2F(w << 16);
    out[k + 1] = ZK_U2F(w & 0xffff0000u);
  }
}

// N consecutive values of T (bfloat16 or float32) from ptr[idx] into out as float32, in loads of up to 16 bytes
// (idx a multiple of N, N * sizeof(T) a power of two): one trip to memory, not N.
template <typename T, int N, typename P, typename PO>
ZK_DEV void zk_load_vals(P ptr, int idx, PO out) {
  constexpr int BYTES = N * int(sizeof(T));
  constexpr int VPW = 4 / int(sizeof(T));  // values a 32-bit word
  if (BYTES >= 16) {
    ZK_UNROLL
    for (int i = 0; i < BYTES / 16; ++i) {
      const uint4 w = ZK_LOAD_U4(ptr, idx / (4 * VPW) + i);
      const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
      ZK_UNROLL
      for (int k = 0; k < 4; ++k) {
        zk_unpack_word<T>(ws[k], out, (4 * i + k) * VPW);
      }
    }
  } else if (BYTES == 8) {
    const uint2 w = ZK_LOAD_U2(ptr, idx / (2 * VPW));
    zk_unpack_word<T>(w.x, out, 0);
    zk_unpack_word<T>(w.y, out, VPW);
  } else if (BYTES == 4) {
    zk_unpack_word<T>(ZK_LOAD_U1(ptr, idx / VPW), out, 0);
  } else {
    out[0] = static_cast<float>(ptr[idx]);
  }
}

// A quantized KV cache row (MLX's affine format, as mx.quantize writes it): BITS-bit integers packed into 32-bit
// words from the lowest bits up, and a scale and a bias of type T for each G values; a value is scale * q + bias.
// N consecutive values from value idx into out as float32 (idx a multiple of N, and the N values in one group).
template <typename T, int N, int BITS, int G, typename P, typename PS, typename PO>
ZK_DEV void zk_load_qvals(P words, PS scales, PS biases, int idx, PO out) {
  constexpr int PER = 32 / (BITS > 0 ? BITS : 32);  // values a word (BITS 0: a placeholder, never called)
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const float s = static_cast<float>(scales[idx / G]);
  const float b = static_cast<float>(biases[idx / G]);
  if (N >= PER) {
    // the N / PER words in one load where they make 8 or 16 bytes (idx / PER is a multiple of N / PER)
    constexpr int NW = (N >= PER) ? N / PER : 1;
    uint32_t ws[(NW > 4) ? NW : 4];
    if (NW == 4) {
      const uint4 w4 = ZK_LOAD_U4(words, idx / (4 * PER));
      ws[0] = w4.x;
      ws[1] = w4.y;
      ws[2] = w4.z;
      ws[3] = w4.w;
    } else if (NW == 2) {
      const uint2 w2 = ZK_LOAD_U2(words, idx / (2 * PER));
      ws[0] = w2.x;
      ws[1] = w2.y;
    } else {
      ZK_UNROLL
      for (int w = 0; w < NW; ++w) {
        ws[w] = words[idx / PER + w];
      }
    }
    ZK_UNROLL
    for (int w = 0; w < NW; ++w) {
      ZK_UNROLL
      for (int k = 0; k < PER; ++k) {
        out[w * PER + k] = s * static_cast<float>((ws[w] >> (k * BITS)) & MASK) + b;
      }
    }
  } else {
    const uint32_t word = words[idx / PER];
    const int shift = (idx % PER) * BITS;
    ZK_UNROLL
    for (int k = 0; k < N; ++k) {
      out[k] = s * static_cast<float>((word >> (shift + k * BITS)) & MASK) + b;
    }
  }
}

// x rounded to the nearest integer, halves away from zero (as round() in Metal and CUDA), for |x| < 2^31.
ZK_DEV float zk_round_away(float x) {
  const float r = static_cast<float>(static_cast<int>((x < 0.0f ? -x : x) + 0.5f));
  return x < 0.0f ? -r : r;
}

// A group's scale and bias (MLX's affine quantization of values whose min is lo and max hi, hi taken from 0 up):
// the edge of larger magnitude is exactly representable.
struct zk_qparams {
  float scale;
  float bias;
};
template <int BITS>
ZK_DEV zk_qparams zk_affine_params(float lo, float hi) {
  const float n_bins = static_cast<float>((1 << BITS) - 1);
  float scale = (hi - lo) / n_bins;
  scale = scale > 1e-7f ? scale : 1e-7f;
  const bool side = (lo < 0.0f ? -lo : lo) > (hi < 0.0f ? -hi : hi);
  scale = side ? scale : -scale;
  const float edge = side ? lo : hi;
  const float q0 = zk_round_away(edge / scale);
  const bool at_zero = q0 == 0.0f;
  return {at_zero ? scale : edge / q0, at_zero ? 0.0f : edge};
}

// The integer of x in a group of those parameters, in [0, 2^BITS - 1].
template <int BITS>
ZK_DEV uint32_t zk_affine_q(float x, zk_qparams p) {
  const float q = zk_round_away((x - p.bias) / p.scale);
  const float top = static_cast<float>((1 << BITS) - 1);
  return static_cast<uint32_t>(q < 0.0f ? 0.0f : (q > top ? top : q));
}

// A new key and value into a quantized cache (KVB bits, KVG values a scale and bias), as mx.quantize packs them: kv
// [2 * D] (threadgroup memory, the key then the value, rounded to T) quantized a group at a time (its scale and bias
// from its min and max), each value of kv replaced by the one the cache then holds, so that a launch attending to
// the new token reads what the next steps will. Every thread of the threadgroup (NT of them) must call it, after a
// barrier that follows the writes into kv (it holds barriers); qp: threadgroup scratch [4 * D / KVG]. Where write,
// the words, scales and biases go into the cache's row (b * NKV + kv head) * CAP + position.
template <typename T, int D, int KVB, int KVG, int NT, typename PL, typename PK, typename PS>
ZK_DEV void zk_quantize_kv(PL kv, PL qp, PK keys, PK values, PS kscales, PS kbiases, PS vscales, PS vbiases, int row,
                           int tid, bool write) {
  constexpr int NG = 2 * D / KVG;                    // groups of the key and value
  constexpr int PER = 32 / (KVB > 0 ? KVB : 32);  // values a word
  if (tid < NG) {
    float lo = 3.0e38f;
    float hi = 0.0f;
    for (int i = 0; i < KVG; ++i) {
      const float x = kv[tid * KVG + i];
      lo = x < lo ? x : lo;
      hi = x > hi ? x : hi;
    }
    const zk_qparams p = zk_affine_params<KVB>(lo, hi);
    qp[2 * tid] = p.scale;
    qp[2 * tid + 1] = p.bias;
  }
  ZK_BARRIER();
  for (int w = tid; w < 2 * D / PER; w += NT) {  // word w of the key (w < D / PER), then of the value
    const int g = w * PER / KVG;
    const zk_qparams p = {qp[2 * g], qp[2 * g + 1]};
    const float s = zk_round<T>(p.scale);
    const float bias = zk_round<T>(p.bias);
    uint32_t word = 0;
    for (int k = 0; k < PER; ++k) {
      const uint32_t q = zk_affine_q<KVB>(kv[w * PER + k], p);
      word |= q << (k * KVB);
      kv[w * PER + k] = s * static_cast<float>(q) + bias;
    }
    if (write) {
      const int half = w < D / PER ? 0 : 1;
      const int wi = w - half * (D / PER);
      ZK_STORE_U1(half == 0 ? keys : values, row * (D / PER) + wi, word);
      if (wi * PER % KVG == 0) {
        const int gi = row * (D / KVG) + wi * PER / KVG;
        zk_writable(half == 0 ? kscales : vscales)[gi] = static_cast<T>(p.scale);
        zk_writable(half == 0 ? kbiases : vbiases)[gi] = static_cast<T>(p.bias);
      }
    }
  }
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

// Value d of query head bh's attention output from its NC chunks' normalised outputs part [.., NC, D] and their
// (max, sum) ml [.., NC, 2] (decode attention in chunks): chunk c weighs l_c * exp(m_c - M), an empty chunk nothing.
template <int D, typename PP, typename PM>
ZK_DEV float zk_merge_chunks(PP part, PM ml, int bh, int nc, int d) {
  float mmax = -3.0e38f;
  for (int c = 0; c < nc; ++c) {
    const float mc = ml[(bh * nc + c) * 2];
    mmax = (ml[(bh * nc + c) * 2 + 1] > 0.0f && mc > mmax) ? mc : mmax;
  }
  float sum = 0.0f;
  float o = 0.0f;
  for (int c = 0; c < nc; ++c) {
    const float lc = ml[(bh * nc + c) * 2 + 1];
    const float f = (lc > 0.0f) ? lc * zk_exp(ml[(bh * nc + c) * 2] - mmax) : 0.0f;
    sum += f;
    o += static_cast<float>(part[(bh * nc + c) * D + d]) * f;  // (a float32 buffer wherever a variant calls this)
  }
  return (sum > 0.0f) ? o / sum : 0.0f;
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

// y[r] = sum_k W[r, c0 + k] xs[k] (+ bias[r] with add_bias) for rows r0 <= r < r1: a matrix's KD
// columns from c0 against a vector in threadgroup memory. So a threadgroup that holds one attention head's output
// adds that head's share of o_proj, W_o[:, head] o_head, with no other threadgroup's result (and several
// threadgroups can share the rows, each holding the head's output). LPR lanes share a row, each
// taking CPL of the slice's 16-byte chunks, whose inputs it keeps in registers for every row; a lane loads RB
// rows' chunks at once, then the LPR lanes' sums meet by shuffles. W as in zk_load_chunk: K columns in all (NV =
// K / VPV chunks a row), QM/BITS/GS its format; c0 and KD are whole chunks, KD / VPV a power of two (at most 32
// lanes a row) or a multiple of 32; NT a multiple of 32.
template <int QM, int BITS, int GS, int K, int KD, int NT, typename PW, typename PS, typename PB,
          typename PBO, typename PX, typename PY>
ZK_DEV void zk_slice_matvec(PW w, PS ws, PB wb, PBO bias, bool add_bias, PX xs, int c0, PY y, int tid, int r0,
                            int r1) {
  constexpr int VPV = 4 * ((QM == 0) ? 2 : ((QM == 1) ? 1 : (32 / BITS)));
  constexpr int NV = K / VPV;
  constexpr int CPR = KD / VPV;                         // chunks of a row's slice
  constexpr int LPR = (CPR < 32) ? CPR : 32;            // lanes a row
  constexpr int CPL = CPR / LPR;                        // chunks a lane
  constexpr int RPR = NT / LPR;                         // rows a round of the threadgroup, one a lane group
  constexpr int CHUNKS = 8;                             // 16-byte chunks a lane loads at once (a round)
  constexpr int RB = (CPL >= CHUNKS) ? 1 : CHUNKS / CPL;  // rows a lane loads at once
  const int rounds = (r1 - r0 + RPR * RB - 1) / (RPR * RB);
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
  for (int g = 0; g < rounds; ++g) {
    zk_chunk ch[RB][CPL];
    ZK_UNROLL
    for (int i = 0; i < RB; ++i) {
      const int r = r0 + (g * RB + i) * RPR + rl;
      ZK_UNROLL
      for (int c = 0; c < CPL; ++c) {
        ch[i][c] = zk_load_chunk<QM, GS, VPV>(w, ws, wb, r, NV, c0 / VPV + j + c * LPR, r < r1);
      }
    }
    ZK_UNROLL
    for (int i = 0; i < RB; ++i) {
      // rows past r1 (a share of the rows ends within a round) are skipped by whole SIMD groups, whose shuffles
      // need every lane: the group's first row decides
      if (r0 + (g * RB + i) * RPR + (tid & ~31) / LPR < r1) {
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
        const int r = r0 + (g * RB + i) * RPR + rl;
        if (j == 0 && r < r1) {
          y[r] = a + (add_bias ? static_cast<float>(bias[r]) : 0.0f);
        }
      }
    }
  }
}

// The sum of x over a threadgroup of NWARP SIMD groups, returned to every thread. red: NWARP floats of
// threadgroup scratch, which must not be used again before another barrier (a fast SIMD group's next store
// could land before a slow one has read).
template <int NWARP, typename PS>
ZK_DEV float zk_threadgroup_sum(float x, PS red, int lane, int warp) {
  x = zk_simd_sum(x);
  if (lane == 0) {
    red[warp] = x;
  }
  ZK_BARRIER();
  float tot = 0.0f;
  for (int w = 0; w < NWARP; ++w) {
    tot += red[w];
  }
  return tot;
}

// The chosen expert and its probability (zk_route).
struct zk_routed {
  int choice;
  float prob;
};

// ZAYA's router MLP for one token, by a threadgroup of NT threads (tid: the thread's index): RMSNorm of the router
// state r (R values of T; norm weight nw, eps), fc1 + GELU, fc2 + GELU, the output projection to NE1 = experts +
// skip logits, softmax in float32, and the argmax of p + balancing biases (bal, float32). Every thread gets the
// choice and its probability. Weights [R, R], [R, R], [NE1, R] in WQ (0 bf16, 1 float32); biases b1, b2 [R].
// Threadgroup scratch: va, vh [R + R / 32] (padded vectors: see zk_pad), vl [NE1], red [NT / 32].
// A SIMD group takes RB output rows at a time, its lanes along each row in 16-byte loads. One token's router is
// bound by instruction latency (ncu, as its own kernel: 10 cycles an issued instruction, 39% of cycles issuing), so
// the RB row sums are reduced together and finished one row a lane (see the layer loop).
template <typename T, int R, int NE1, int WQ, int NT, typename PR, typename PN, typename PW, typename PB,
          typename PF, typename PS>
ZK_DEV zk_routed zk_route(PR r, PN nw, PW w1, PB b1, PW w2, PB b2, PW wo, PF bal, float eps, PS va, PS vh, PS vl,
                          PS red, int tid) {
  constexpr int NWARP = NT / 32;
  constexpr int VPW = (WQ == 0) ? 2 : 1;
  constexpr int NV = R / (4 * VPW);
  constexpr int ITERS = (NV + 31) / 32;
  constexpr int QMW = (WQ == 0) ? 0 : 1;
  // rows a SIMD group loads at once: at most 16 chunks a lane, a power of two (R <= 1024, so ITERS <= 4)
  constexpr int RB = (ITERS == 1) ? 16 : ((ITERS == 2) ? 8 : 4);
  constexpr int LRB = (RB == 16) ? 4 : ((RB == 8) ? 3 : 2);  // log2(RB)
  const int lane = tid & 31;
  const int warp = tid >> 5;

  // RMSNorm of the state.
  float ss = 0.0f;
  for (int k = tid; k < R; k += NT) {
    const float v = static_cast<float>(r[k]);
    va[zk_pad(k)] = v;
    ss += v * v;
  }
  const float inv = zk_rsqrt(zk_threadgroup_sum<NWARP>(ss, red, lane, warp) / float(R) + eps);
  for (int k = tid; k < R; k += NT) {
    vh[zk_pad(k)] = zk_round<T>(static_cast<float>(nw[k]) * zk_round<T>(va[zk_pad(k)] * inv));
  }
  ZK_BARRIER();

  // fc1 + GELU: vh -> va; fc2 + GELU: va -> vh; logits: vh -> vl. RB rows of a SIMD group at a time, all their
  // loads in flight before the sums: with the layers unrolled, no branch separates them (a load behind a branch
  // waits for what came before it).
  // The RB partial sums of a lane are then reduced over the SIMD group together: at step k a lane keeps half of
  // its rows and trades the other half with lane ^ 2^k, so RB rows take RB - 1 exchanges where one sum per row
  // takes 5 RB, and lane l < RB ends with row bitreverse(l) (its bit k is lane bit k, from the top). That lane
  // alone adds the bias and applies GELU, in parallel with the other rows' lanes.
  int rrow = 0;  // the row (of the RB) this lane finishes
  ZK_UNROLL
  for (int k = 0; k < LRB; ++k) {
    rrow |= ((lane >> k) & 1) << (LRB - 1 - k);
  }
  ZK_UNROLL
  for (int layer = 0; layer < 3; ++layer) {
    const int nout = (layer == 2) ? NE1 : R;
    for (int o0 = warp * RB; o0 < nout; o0 += NWARP * RB) {
      // a row past nout loads row 0: its sum ends on a lane that writes nothing
      uint4 u[RB][ITERS];
      ZK_UNROLL
      for (int i = 0; i < RB; ++i) {
        ZK_UNROLL
        for (int it = 0; it < ITERS; ++it) {
          const int v = it * 32 + lane;
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
          const int v = it * 32 + lane;
          if (v < NV) {
            a[i] += (layer == 1) ? zk_dot_u4<QMW, 16>(u[i][it], va, v * 4 * VPW).d
                                 : zk_dot_u4<QMW, 16>(u[i][it], vh, v * 4 * VPW).d;
          }
        }
      }
      ZK_UNROLL
      for (int k = 0; k < 5; ++k) {
        if (k < LRB) {
          const int half = RB >> (k + 1);  // rows left after this step
          const bool upper = ((lane >> k) & 1) != 0;
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
      if (lane < RB && o < nout) {
        if (layer == 2) {
          vl[o] = zk_round<T>(a[0]);
        } else {
          const float z = zk_round<T>(a[0] + bias);
          const float gl = zk_round<T>(0.5f * z * (1.0f + zk_erf(z * 0.7071067811865476f)));
          if (layer == 0) {
            va[zk_pad(o)] = gl;
          } else {
            vh[zk_pad(o)] = gl;
          }
        }
      }
    }
    ZK_BARRIER();
  }

  // Softmax over the NE1 logits (one SIMD group), then the biased argmax (every thread, from the same values).
  if (warp == 0) {
    float m = -3.0e38f;
    for (int j = lane; j < NE1; j += 32) {
      m = (vl[j] > m) ? vl[j] : m;
    }
    m = zk_simd_max(m);
    float s = 0.0f;
    for (int j = lane; j < NE1; j += 32) {
      s += zk_exp(vl[j] - m);
    }
    s = zk_simd_sum(s);
    float pj[(NE1 + 31) / 32];
    for (int j = lane, t = 0; j < NE1; j += 32, ++t) {
      pj[t] = zk_exp(vl[j] - m) / s;
    }
    for (int j = lane, t = 0; j < NE1; j += 32, ++t) {
      vl[j] = pj[t];
    }
  }
  ZK_BARRIER();
  zk_routed best = {0, vl[0]};
  float top = vl[0] + bal[0];
  for (int j = 1; j < NE1; ++j) {
    const float v = vl[j] + bal[j];
    if (v > top) {
      top = v;
      best.choice = j;
      best.prob = vl[j];
    }
  }
  return best;
}

// What zk_cca_step leaves a thread of its head group (see there).
struct zk_cca_out {
  float o;   // channel tid of the head, normalised and rotated (tid < D)
  float v;   // a key group: channel tid of its value head (tid < D)
  float vd;  // a key group: channel tid of the new delayed value (tid < D / 2)
};

// The CCA decode step of one head group g (query heads 0..NH-1, then the NKV key heads) of batch row b, by NTC
// threads (tid, and their lane and SIMD group warp, counted from the first of them); metal/cca_decode.h says what
// it computes, and its header the inputs (dw_w, dw_b, gw_b, temp, inv_freq: float32 views of the pack). Shared by
// the CCA kernel and attention with the CCA step inside (decode_attention.h, HAS_CCA). Threadgroup scratch: sdw
// [T1 * D + T1 * D / 32], sy and snorm [D], red [NTC / 32]; every thread of the threadgroup must call it (it holds
// barriers). Writes the group's channels of the new conv state into conv_out where write_state.
template <typename T, int D, int NH, int NKV, int T0, int T1, int RD, int NTC, typename PX, typename PF,
          typename PW, typename PI, typename PL, typename PO>
ZK_DEV zk_cca_out zk_cca_step(PX qkv, PX conv_state, PX v_prev, PF dw_w, PF dw_b, PW gw_w, PF gw_b, PF temp,
                              PI offset, PF inv_freq, float eps, int g, int b, int tid, int lane, int warp, PL sdw,
                              PL sy, PL snorm, PL red, PO conv_out, bool write_state) {
  constexpr int C = (NH + NKV) * D;
  constexpr int S = (T0 - 1) + (T1 - 1);
  constexpr int VH = (NKV * D) / 2;
  constexpr int P = C + 2 * VH;
  constexpr int REP = NH / NKV;
  constexpr int NWARP = NTC / 32;
  constexpr int HALF = RD / 2;
  constexpr int CPW = (D + NWARP - 1) / NWARP;  // grouped-conv channels a SIMD group
  constexpr int QMW = (sizeof(T) == 2) ? 0 : 1;  // grouped-conv weights as zk_dot_u4 reads them: bf16 or f32
  constexpr int VPC = 16 / sizeof(T);              // weights a 16-byte chunk
  constexpr int NCH = (T1 * D) / VPC;                // chunks a channel's weight row
  constexpr int KI = (NCH + 31) / 32;                // chunks a lane, per channel
  const int cbase = g * D;
  const int xrow = b * P;

  // 0. Every load, issued before any result is used and with no branch between them: a load behind a branch
  // waits for what came before it, so each group of loads would cost its own trip to memory. A thread with no
  // item in a step reads a valid element and drops it.
  const int c0 = tid;                         // this thread's channel of the head in steps 4-6 (when < D)
  const int cc = (c0 < D) ? c0 : 0;
  const bool has1 = tid < T1 * D;             // step 1: depthwise output item tid
  const int m1 = has1 ? tid / D : 0;
  const int ch1 = cbase + (has1 ? tid - m1 * D : 0);
  float dwx[T0];
  float dww[T0];
  ZK_UNROLL
  for (int i = 0; i < T0; ++i) {
    const int j = m1 + i;
    const float st = static_cast<float>(conv_state[(b * S + ((j < S) ? j : S - 1)) * C + ch1]);
    dwx[i] = (j < S) ? st : static_cast<float>(qkv[xrow + ch1]);
    dww[i] = dw_w[ch1 * T0 + i];
  }
  const float dwb = dw_b[ch1];
  const bool has2 = tid < S * D;              // step 2: conv state item tid
  const int j2 = has2 ? tid / D : 0;
  const int ch2 = cbase + (has2 ? tid - j2 * D : 0);
  const float st2 = static_cast<float>(conv_state[(b * S + ((j2 + 1 < S) ? j2 + 1 : S - 1)) * C + ch2]);
  const float statev = (j2 + 1 < S) ? st2 : static_cast<float>(qkv[xrow + ch2]);
  // step 4: the residual path. A query head: (q + its key) / 2; a key head: the mean of that over its queries.
  const int kh = (g < NH) ? g / REP : g - NH;  // the key head of this group
  const float kv = static_cast<float>(qkv[xrow + NH * D + kh * D + cc]);
  float qs[REP];
  ZK_UNROLL
  for (int r = 0; r < REP; ++r) {
    qs[r] = static_cast<float>(qkv[xrow + ((g < NH) ? g : kh * REP + r) * D + cc]);
  }
  // steps 5-6: the key temperature, RoPE's angle, the value channel and the delayed value
  const float tempv = temp[kh];
  const int f = kh * D + cc;
  const float vcur = static_cast<float>(qkv[xrow + C + ((f < VH) ? f : 0)]);
  const float vold = static_cast<float>(v_prev[b * VH + ((f < VH) ? 0 : f - VH)]);
  const float vd = static_cast<float>(qkv[xrow + C + VH + kh * (D / 2) + ((cc < D / 2) ? cc : 0)]);
  const int ri = (cc < HALF) ? cc : ((cc < RD) ? cc - HALF : 0);
  const float pos = static_cast<float>(offset[b]);
  const float freq = inv_freq[ri];
  // step 3: this SIMD group's grouped-conv rows, 16 bytes a lane, and their biases
  uint4 gwv[CPW][KI];
  float gb[CPW];
  ZK_UNROLL
  for (int i = 0; i < CPW; ++i) {
    const int c = warp + i * NWARP;
    const int ch = cbase + ((c < D) ? c : 0);
    gb[i] = gw_b[ch];
    ZK_UNROLL
    for (int it = 0; it < KI; ++it) {
      const int v = it * 32 + lane;
      gwv[i][it] = ZK_LOAD_U4(gw_w, ch * NCH + ((v < NCH) ? v : 0));
    }
  }

  float res;
  if (g < NH) {
    res = zk_round<T>(zk_round<T>(qs[0] + kv) * 0.5f);
  } else {
    float sum = 0.0f;
    ZK_UNROLL
    for (int r = 0; r < REP; ++r) {
      sum += zk_round<T>(zk_round<T>(qs[r] + kv) * 0.5f);
    }
    res = zk_round<T>(sum / float(REP));
  }
  const float theta = pos * freq;
  const float cs = zk_cos(theta);
  const float sn = zk_sin(theta);

  // 1. Depthwise conv over the window [conv_state[b], qkv[b, :C]] (S + 1 positions): T1 outputs.
  if (has1) {
    float acc = 0.0f;
    ZK_UNROLL
    for (int i = 0; i < T0; ++i) {
      acc += dww[i] * dwx[i];
    }
    sdw[zk_pad(tid)] = zk_round<T>(acc + dwb);
  }
  // 2. The new conv state: window positions 1..S.
  if (has2 && write_state) {
    conv_out[(b * S + j2) * C + ch2] = static_cast<T>(statev);
  }
  ZK_BARRIER();

  // 3. Grouped conv: a SIMD group per output channel, CPW channels a group, the lanes along the T1 * D
  // weights in 16-byte chunks.
  {
    float acc[CPW];
    ZK_UNROLL
    for (int i = 0; i < CPW; ++i) {
      float a = 0.0f;
      ZK_UNROLL
      for (int it = 0; it < KI; ++it) {
        const int v = it * 32 + lane;
        if (v < NCH) {
          a += zk_dot_u4<QMW, 16>(gwv[i][it], sdw, v * VPC).d;
        }
      }
      acc[i] = a;
    }
    ZK_UNROLL
    for (int i = 0; i < CPW; ++i) {
      const int c = warp + i * NWARP;
      const float a = zk_simd_sum(acc[i]);
      if (lane == 0 && c < D) {
        sy[c] = zk_round<T>(a + gb[i]);
      }
    }
  }
  ZK_BARRIER();

  // 4. Conv output plus the residual path, then the squared norm of the head.
  const float val = (c0 < D) ? zk_round<T>(sy[c0] + res) : 0.0f;
  float nrm = zk_sqrt(zk_threadgroup_sum<NWARP>(val * val, red, lane, warp));
  nrm = (nrm < eps) ? eps : nrm;
  const float fac = zk_sqrt(float(D)) / nrm;

  // 5. Scale to norm sqrt(D), key temperature, RoPE (NeoX halves) on the first RD channels.
  if (c0 < D) {
    float v = zk_round<T>(val * fac);
    if (g >= NH) {
      v = zk_round<T>(v * tempv);
    }
    snorm[c0] = v;
  }
  ZK_BARRIER();
  zk_cca_out out;
  out.o = snorm[cc];
  if (c0 < RD) {
    out.o = (c0 < HALF) ? (snorm[c0] * cs - snorm[c0 + HALF] * sn) : (snorm[c0] * cs + snorm[c0 - HALF] * sn);
  }
  // 6. The value, [v_current, previous v_delayed] viewed as NKV heads of D, and the new delayed state.
  out.v = (f < VH) ? vcur : vold;
  out.vd = vd;
  return out;
}
