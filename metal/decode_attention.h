// Decode attention: one query token per sequence against its KV cache, read in place from the cache's
// preallocated buffers. It replaces, per layer and step, slicing the keys and values to the filled length,
// building the mask (left padding of a batch, a sliding window) and mx.fast.scaled_dot_product_attention,
// whose host-side setup costs more than its GPU time for one token. Plain-MLX reference:
// zaya_mlx/kernels/attention.py, decode_attention_reference.
//
// Grid: x = chunk c of the key range (SPLIT), or in one pass the share rs of o_proj's rows (HAS_O: RS threadgroups
// compute the same heads, each adds o_proj's rows [rs * HO / RS, (rs + 1) * HO / RS), so o_proj, the longest part
// at batch 1, spreads over RS times the SMs); y = b * (NH / HB) + head block. A threadgroup serves HB query heads
// that share a KV head (HB divides NH / NKV): HB = NH / NKV reads each key and value once, a smaller HB
// spreads a batch row over more threadgroups and shortens each one's work. Each SIMD group takes KS = 32 / LPK
// keys at once, LPK lanes a key along the head dimension (DPL = D / LPK values a lane: LPK 32 reads 4 bf16 a lane
// of a head of 128, 16 a whole 16-byte load, and a score's sum then needs 4 shuffles for two keys instead of 5 for
// one), U of them at a time (all loaded before use), and each of its KS key slots keeps an online softmax per query
// head; a SIMD group's slots are merged by shuffles, the SIMD groups through threadgroup memory. Row b attends to
// keys [start_b, L) with start_b = max(left_padding[b], L - W if W > 0 else 0); chunk c covers
// [start_b + c * CH, start_b + (c + 1) * CH).
// With HAS_O (one pass), the threadgroup then adds its heads' share of o_proj: W_o[:, heads] times their output
// (rounded to T, as the plain path feeds o_proj), for all HO rows (zk_slice_matvec), so o_proj needs no launch of
// its own; the NH / HB shares sum to o_proj's output in the residual norm that reads it.
// With HAS_CCA, the layer's CCA step runs first, inside (zk_cca_step, as metal/cca_decode.h; one head a threadgroup,
// HB = 1): the first NT / 2 threads compute the query head, the rest its key head and value, which the REP query
// heads' threadgroups (and each chunk's) all compute; the first of them in chunk 0 writes the new key and value into
// the cache, in place at position L - 1, and the key head's new states. The new key and value are taken from
// threadgroup memory, not the cache (chunk 0's and row share 0's threadgroups write the cache and states). So the
// step and attention are one launch: the query never leaves the threadgroup, and a layer has one graph node less.
// Template: T (dtype of q, keys, values), D (a multiple of 32), NH, NKV, HB, NT, LPK (32 or 16), SPLIT (false: one
// chunk, write the output; true: write each chunk's normalised output and its (max, sum) for attention_combine.h),
// FUSE (in chunks, on CUDA: merge them in this launch instead), HAS_O, HO,
// QM, BITS, GS, HAS_OB (o_proj: output rows; weight format as in zk_load_chunk; a bias, added by head block 0),
// SCALE (the softmax scale's float32 bits), HAS_CCA, T0, T1, RD, EPS (the CCA step's, as cca_decode.h's; without
// it, placeholders), KVB, KVG (a quantized cache: its bits, 8 or 4, and the values a scale and bias serve; KVB 0:
// keys and values of type T).
// Inputs: q [B, NH, 1, D], keys, values [B, NKV, CAP, D] (quantized: [B, NKV, CAP, D * KVB / 32] uint32, with
// kscales, kbiases, vscales, vbiases [B, NKV, CAP, D / KVG] of type T; else those four absent), lpad [B] int32,
// filled [1] int32 (L <= CAP),
// meta [6] int32 (W, CH, CAP, NC: the chunks in the grid, enough for CAP keys; a chunk past L has no keys; RS: with
// HAS_O, o_proj's row shares, in this grid in one pass, else in attention_combine.h's; read at run time, so that a
// grown buffer or another RS compiles no new variant; B * NH), wo, wos, wob, bo (o_proj's weight [HO, NH * D] dense or
// packed, scales, biases, bias; each absent (ZK_ABSENT) where the variant reads none), after (not read: an output
// of the CCA step where that wrote q in place, which orders this launch after it). L is read on the GPU, so one
// launch serves every step.
// With HAS_CCA: no q; keys and values are written in place; and the CCA step's inputs as cca_decode.h names them
// (qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, inv_freq).
// Outputs: SPLIT false: out [B, 1, NH * D] (T), or with HAS_O o_proj's partial sums [B, NH / HB, HO] float32;
// no ml. SPLIT true: out [B, NH, NC, D] float32, ml [B, NH, NC, 2] float32; with FUSE also fin (what out is in one
// pass), and ml followed by the tickets, B * NH / HB int32 words, all zeroed before the launch (without FUSE, fin
// absent). With HAS_CCA, also the CCA step's conv_out [B, S, C] and vprev_out [B, NKV * D / 2].
constexpr int NWARP = NT / 32;
constexpr int REP = NH / NKV;
constexpr int NHB = NH / HB;  // head blocks a batch row
constexpr int KS = 32 / LPK;  // keys a SIMD group takes at once, a key slot each
constexpr int DPL = D / LPK;
// keys a key slot loads at once (each batch is a trip to memory): 8, as long as their 2 * U * DPL values
// fit in 64 registers a thread (a head dim of 256 at LPK 32 takes 4: at 8, 512 threads no longer fit an SM)
constexpr int U = (DPL <= 4) ? 8 : ((DPL <= 32) ? 32 / DPL : 1);
const int kslot = zk_lane / LPK;  // this lane's key slot
const int ksub = zk_lane - kslot * LPK;  // its share of the head dimension: values [ksub * DPL, (ksub + 1) * DPL)

const int c = SPLIT ? zk_bx : 0;
const int rs = SPLIT ? 0 : zk_bx;
const int b = zk_by / NHB;
const int h0 = (zk_by - b * NHB) * HB;  // the threadgroup's first query head
const int kvh = h0 / REP;
const int L = filled[0];
const int W = meta[0];
const int CH = meta[1];
const int CAP = meta[2];
const int NC = meta[3];
const int RS = meta[4];

int start = lpad[b];
if (W > 0 && L - W > start) {
  start = L - W;
}
const int lo = start + c * CH;
const int hi = (lo + CH < L) ? lo + CH : L;
const float scale = ZK_U2F(SCALE);
const int slot = L - 1;  // the new token's position

// The CCA step (HAS_CCA): the query, the new key and value into zk_new (rounded to T, as the cache holds them).
constexpr int NTC = HAS_CCA ? NT / 2 : 64;  // threads a head group (a placeholder without the step)
constexpr int DWN = T1 * D + (T1 * D) / 32;  // zk_cca_step's padded depthwise outputs
ZK_SHARED float zk_new[HAS_CCA ? 3 * D : 1];
ZK_SHARED float zk_cdw[HAS_CCA ? 2 * DWN : 1];
ZK_SHARED float zk_cy[HAS_CCA ? 2 * D : 1];
ZK_SHARED float zk_cn[HAS_CCA ? 2 * D : 1];
ZK_SHARED float zk_cred[HAS_CCA ? NWARP : 1];
constexpr int NG = (KVB > 0) ? 2 * D / KVG : 1;  // quantization groups of the new key and value
ZK_SHARED float zk_qp[HAS_CCA ? 2 * NG : 1];  // their scales and biases
if (HAS_CCA) {
  const int half = zk_tid / NTC;  // 0: the query head h0, 1: its key head
  const int t = zk_tid - half * NTC;
  const bool writer = c == 0 && rs == 0 && (half == 0 || h0 % REP == 0);
  const zk_cca_out r = zk_cca_step<T, D, NH, NKV, T0, T1, RD, NTC>(
      qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, inv_freq, ZK_U2F(EPS),
      (half == 0) ? h0 : NH + kvh, b, t, zk_lane, zk_warp - half * (NTC / 32), zk_cdw + half * DWN, zk_cy + half * D,
      zk_cn + half * D, zk_cred + half * (NTC / 32), conv_out, writer);
  if (t < D) {
    zk_new[half * D + t] = zk_round<T>(r.o);
    if (half == 1) {
      zk_new[2 * D + t] = zk_round<T>(r.v);
      if (writer) {
        if (KVB == 0) {  // (zk_writable: keys and values are uint32 words where KVB > 0)
          zk_writable(keys)[((b * NKV + kvh) * CAP + slot) * D + t] = static_cast<T>(r.o);
          zk_writable(values)[((b * NKV + kvh) * CAP + slot) * D + t] = static_cast<T>(r.v);
        }
        if (t < D / 2) {
          vprev_out[(b * NKV + kvh) * (D / 2) + t] = static_cast<T>(r.vd);
        }
      }
    }
  }
  ZK_BARRIER();
  if (KVB > 0) {
    // A quantized cache: the new key and value quantized, and zk_new's replaced by the values the cache then holds,
    // so that this step attends to what the next ones will read. Every threadgroup does it alike; the writer also
    // writes the words, scales and biases.
    zk_quantize_kv<T, D, KVB, KVG, NT>(zk_new + D, zk_qp, keys, values, kscales, kbiases, vscales, vbiases,
                                        (b * NKV + kvh) * CAP + slot, zk_tid, c == 0 && rs == 0 && h0 % REP == 0);
    ZK_BARRIER();
  }
}

// This lane's slice of the HB queries, pre-scaled.
float qv[HB][DPL];
ZK_UNROLL
for (int r = 0; r < HB; ++r) {
  ZK_UNROLL
  for (int j = 0; j < DPL; ++j) {
    if (HAS_CCA) {
      qv[r][j] = zk_new[ksub * DPL + j] * scale;
    } else {
      qv[r][j] = static_cast<float>(q[(b * NH + h0 + r) * D + ksub * DPL + j]) * scale;
    }
  }
}
float m[HB];
float l[HB];
float acc[HB][DPL];
ZK_UNROLL
for (int r = 0; r < HB; ++r) {
  m[r] = -3.0e38f;
  l[r] = 0.0f;
  ZK_UNROLL
  for (int j = 0; j < DPL; ++j) {
    acc[r][j] = 0.0f;
  }
}

const int base = (b * NKV + kvh) * CAP;
for (int t0 = lo + zk_warp * U * KS; t0 < hi; t0 += NWARP * U * KS) {
  // This slot's keys t0 + u * KS + kslot. All U keys and values are loaded before any is used, with no branch
  // between the loads (a load behind a branch waits for the loads before it): a key past hi reads key lo and is
  // dropped.
  float kk[U][DPL];
  float vv[U][DPL];
  ZK_UNROLL
  for (int u = 0; u < U; ++u) {
    const int t = t0 + u * KS + kslot;
    const int idx = (base + ((t < hi) ? t : lo)) * D + ksub * DPL;
    if (KVB > 0) {
      zk_load_qvals<T, DPL, KVB, KVG>(keys, kscales, kbiases, idx, kk[u]);
      zk_load_qvals<T, DPL, KVB, KVG>(values, vscales, vbiases, idx, vv[u]);
    } else {
      zk_load_vals<T, DPL>(keys, idx, kk[u]);
      zk_load_vals<T, DPL>(values, idx, vv[u]);
    }
  }
  if (HAS_CCA) {  // the new key and value: this launch's own (zk_new), as the cache may not hold them yet
    ZK_UNROLL
    for (int u = 0; u < U; ++u) {
      const bool fresh = t0 + u * KS + kslot == slot;
      ZK_UNROLL
      for (int j = 0; j < DPL; ++j) {
        kk[u][j] = fresh ? zk_new[D + ksub * DPL + j] : kk[u][j];
        vv[u][j] = fresh ? zk_new[2 * D + ksub * DPL + j] : vv[u][j];
      }
    }
  }
  // The U scores (their sums over the slot's lanes independent of each other), then one online-softmax update for
  // all of them.
  ZK_UNROLL
  for (int r = 0; r < HB; ++r) {
    float s[U];
    ZK_UNROLL
    for (int u = 0; u < U; ++u) {
      float a = 0.0f;
      ZK_UNROLL
      for (int j = 0; j < DPL; ++j) {
        a += qv[r][j] * kk[u][j];
      }
      s[u] = a;
    }
    ZK_UNROLL
    for (int u = 0; u < U; ++u) {
      if (LPK == 32) {
        s[u] = zk_simd_sum(s[u]);
      } else {
        ZK_UNROLL
        for (int o = LPK / 2; o > 0; o >>= 1) {
          s[u] += zk_simd_xor(s[u], o);
        }
      }
    }
    float mn = m[r];
    ZK_UNROLL
    for (int u = 0; u < U; ++u) {
      mn = (t0 + u * KS + kslot < hi && s[u] > mn) ? s[u] : mn;
    }
    const float corr = zk_exp(m[r] - mn);
    l[r] *= corr;
    ZK_UNROLL
    for (int j = 0; j < DPL; ++j) {
      acc[r][j] *= corr;
    }
    ZK_UNROLL
    for (int u = 0; u < U; ++u) {
      const float p = (t0 + u * KS + kslot < hi) ? zk_exp(s[u] - mn) : 0.0f;
      l[r] += p;
      ZK_UNROLL
      for (int j = 0; j < DPL; ++j) {
        acc[r][j] += p * vv[u][j];
      }
    }
    m[r] = mn;
  }
}

// Merge a SIMD group's key slots (lanes LPK apart hold the same values of different slots), then the SIMD groups:
// each writes its (m, l, acc), then thread i finishes output value i.
ZK_UNROLL
for (int o = LPK; o < 32; o <<= 1) {
  ZK_UNROLL
  for (int r = 0; r < HB; ++r) {
    const float m2 = zk_simd_xor(m[r], o);
    const float l2 = zk_simd_xor(l[r], o);
    const float mm = (m2 > m[r]) ? m2 : m[r];
    const float f1 = (l[r] > 0.0f) ? zk_exp(m[r] - mm) : 0.0f;
    const float f2 = (l2 > 0.0f) ? zk_exp(m2 - mm) : 0.0f;
    l[r] = l[r] * f1 + l2 * f2;
    ZK_UNROLL
    for (int j = 0; j < DPL; ++j) {
      acc[r][j] = acc[r][j] * f1 + zk_simd_xor(acc[r][j], o) * f2;
    }
    m[r] = mm;
  }
}
ZK_SHARED float zk_m[NWARP * HB];
ZK_SHARED float zk_l[NWARP * HB];
ZK_SHARED float zk_acc[NWARP * HB * D];
ZK_SHARED float zk_o[HAS_O ? HB * D : 1];  // the heads' output, o_proj's input
ZK_UNROLL
for (int r = 0; r < HB; ++r) {
  if (zk_lane == 0) {
    zk_m[zk_warp * HB + r] = m[r];
    zk_l[zk_warp * HB + r] = l[r];
  }
  if (kslot == 0) {
    ZK_UNROLL
    for (int j = 0; j < DPL; ++j) {
      zk_acc[(zk_warp * HB + r) * D + ksub * DPL + j] = acc[r][j];
    }
  }
}
ZK_BARRIER();
for (int i = zk_tid; i < HB * D; i += NT) {
  const int r = i / D;
  const int d = i - r * D;
  float mmax = -3.0e38f;
  for (int w = 0; w < NWARP; ++w) {
    mmax = (zk_m[w * HB + r] > mmax) ? zk_m[w * HB + r] : mmax;
  }
  float sum = 0.0f;
  float o = 0.0f;
  for (int w = 0; w < NWARP; ++w) {
    const float f = (zk_l[w * HB + r] > 0.0f) ? zk_exp(zk_m[w * HB + r] - mmax) : 0.0f;
    sum += zk_l[w * HB + r] * f;
    o += zk_acc[(w * HB + r) * D + d] * f;
  }
  const int h = h0 + r;
  if (SPLIT) {
    const int pi = (b * NH + h) * NC + c;
    out[pi * D + d] = (sum > 0.0f) ? o / sum : 0.0f;
    if (d == 0) {
      ml[pi * 2] = mmax;
      ml[pi * 2 + 1] = sum;
    }
  } else if (HAS_O) {
    zk_o[r * D + d] = zk_round<T>((sum > 0.0f) ? o / sum : 0.0f);
  } else {
    out[(b * NH + h) * D + d] = static_cast<T>((sum > 0.0f) ? o / sum : 0.0f);
  }
}
#ifdef ZK_GRID_FENCE
// FUSE (in chunks, CUDA only: see ZK_GRID_FENCE): the last of a head block's NC chunk threadgroups to finish merges
// the chunks as attention_combine.h does, into fin (or, with HAS_O, adds the head block's share of o_proj there), so
// the combine takes no launch of its own. Each threadgroup fences its chunk's results before it takes a ticket (an
// int32 a grid row after ml's B * NH * NC * 2 floats, zeroed by the launch's init value as ml is: no output of its
// own); the one that takes ticket NC - 1 sees them all.
if (SPLIT && FUSE) {
  ZK_SHARED int zk_ticket[1];
  ZK_GRID_FENCE();
  ZK_BARRIER();
  if (zk_tid == 0) {
    zk_ticket[0] = ZK_TICKET(ml + meta[5] * NC * 2, zk_by);
  }
  ZK_BARRIER();
  if (zk_ticket[0] == NC - 1) {
    ZK_GRID_FENCE();
    for (int i = zk_tid; i < HB * D; i += NT) {
      const int r = i / D;
      const int d = i - r * D;
      const float y = zk_merge_chunks<D>(out, ml, b * NH + h0 + r, NC, d);
      if (HAS_O) {
        zk_o[r * D + d] = zk_round<T>(y);
      } else {
        fin[(b * NH + h0 + r) * D + d] = static_cast<T>(y);
      }
    }
    if (HAS_O) {
      ZK_BARRIER();
      zk_slice_matvec<QM, BITS, GS, NH * D, HB * D, NT>(wo, wos, wob, bo, HAS_OB && h0 == 0, zk_o, h0 * D,
                                                        fin + (b * NHB + h0 / HB) * HO, zk_tid, 0, HO);
    }
  }
}
#endif
if (HAS_O && !SPLIT) {
  ZK_BARRIER();
  zk_slice_matvec<QM, BITS, GS, NH * D, HB * D, NT>(wo, wos, wob, bo, HAS_OB && h0 == 0, zk_o, h0 * D,
                                                    out + (b * NHB + h0 / HB) * HO, zk_tid, rs * HO / RS,
                                                    (rs + 1) * HO / RS);
}
