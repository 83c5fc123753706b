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
    for (int j = 0; j < 8; ++j) {
      p.d += xs[k + j] * zk_fp4((w >> (4 * j)) & 15u);
    }
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

// Where x[k] lives in a padded threadgroup vector: one spare word after every 32. A SIMD group whose
// lanes read runs of 4, 8, 16 or 32 consecutive values (one 16-byte weight chunk each) then touches 32
// different banks per read instead of a few banks many times over.
ZK_DEV int zk_pad(int k) {
  return k + (k >> 5);
}

// The dot product of one 16-byte chunk (four words, 4 * 32 / BITS values from k) with a padded
// vector xs (see zk_pad; a chunk never straddles a 32-value boundary, so it stays contiguous there).
template <int QM, int BITS, typename PX>
ZK_DEV zk_pair zk_dot_u4(uint4 u, PX xs, int k) {
  constexpr int VPW = (QM == 0) ? 2 : ((QM == 1) ? 1 : (32 / BITS));
  const int p = zk_pad(k);
  const zk_pair a = zk_dot_word<QM, BITS>(u.x, xs, p);
  const zk_pair b = zk_dot_word<QM, BITS>(u.y, xs, p + VPW);
  const zk_pair c = zk_dot_word<QM, BITS>(u.z, xs, p + 2 * VPW);
  const zk_pair d = zk_dot_word<QM, BITS>(u.w, xs, p + 3 * VPW);
  zk_pair r = {(a.d + b.d) + (c.d + d.d), (a.s + b.s) + (c.s + d.s)};
  return r;
}
