// CCA decode step: one launch for everything between the fused q/k/v projection and attention, for one
// new token per sequence. It replaces, per layer and step: appending the q/k inputs to the conv state,
// the causal depthwise conv (kernel T0, bias), the causal grouped conv (kernel T1, one group per head,
// bias), the residual means q_res = (q + repeat_kv(k)) / 2 and k_res = mean of q_res over each KV group,
// L2 normalisation to norm sqrt(D) with an eps clamp, the key temperature, NeoX RoPE on the first RD
// channels of each head, assembling the value from the current half and the previous token's delayed
// half, and writing the key and value into the KV cache (two slice updates). Plain-MLX reference:
// zaya_mlx/kernels/cca.py, cca_decode_step_reference and write_kv_reference.
//
// The key and value go into the cache's buffers in place, at position filled[0] - 1 of every row: MLX's
// custom kernels only make new outputs, and a new [B, NKV, CAP, D] buffer a step would copy the cache.
// The caller owns the buffers (zaya_mlx/kernels/cca.py says how), and orders attention after this launch
// (attention reads q_out, or, where q_out is written in place, takes another output as its ``after``).
//
// Grid: one threadgroup of NT threads per (head group g, batch row b): x = g (NH query heads, then NKV
// key heads), y = b. Each group's D channels depend only on that group's inputs, so no threadgroup
// waits for another.
// Template: T (activation dtype: bfloat16 or float32), D, NH, NKV, T0, T1, RD (rope dims, even, <= D), NT
// (threads, >= D, T1 * D and S * D; each SIMD group holds its grouped-conv rows in registers, 16 bytes a
// lane and channel, so NT sets the registers a thread may use), EPS (the norm's eps clamp, its float32 bits),
// KVB, KVG (a quantized cache: its bits, 8 or 4, and the values a scale and bias serve; KVB 0: a cache of type T).
// Inputs: qkv [B, P] (P = C + NKV*D, C = (NH+NKV)*D: q, k, v_current, v_delayed), conv_state [B, S, C]
// (S = T0-1 + T1-1 >= 1), v_prev [B, NKV*D/2], dw_w [C, T0], dw_b [C], gw_w [C, T1, D], gw_b [C],
// temp [NKV], offset [B] int32, inv_freq [RD/2] float32,
// kcache, vcache [B, NKV, CAP, D] (T; written in place; quantized: [B, NKV, CAP, D * KVB / 32] uint32, with
// kscales, kbiases, vscales, vbiases [B, NKV, CAP, D / KVG] of type T, else those four absent, the new key and value
// quantized as mx.quantize does, zk_quantize_kv), filled [1] int32 (positions held after the write),
// capacity [1] int32 (CAP, read at run time: a grown buffer then compiles no new variant),
// after (not read: an array that orders this launch after the last reader of an array it writes in place).
// Outputs: q_out [B, NH, 1, D] (may be written into a given array: ZK_INPLACE), conv_out [B, S, C], vprev_out
// [B, NKV*D/2]. Arithmetic is float32, rounded to T where the reference rounds.
// The step itself is zk_cca_step (metal/common.h), which attention also runs inside (decode_attention.h, HAS_CCA).
constexpr int VH = (NKV * D) / 2;
constexpr int NWARP = NT / 32;

const int g = zk_bx;
const int b = zk_by;
const int slot = filled[0] - 1;
const int cap = capacity[0];

ZK_SHARED float zk_dw[T1 * D + (T1 * D) / 32];  // padded: see zk_pad
ZK_SHARED float zk_y[D];
ZK_SHARED float zk_n[D];
ZK_SHARED float zk_red[NWARP];
ZK_SHARED float zk_kv[KVB > 0 ? 2 * D : 1];  // a quantized cache: the new key and value
ZK_SHARED float zk_qp[KVB > 0 ? 4 * D / KVG : 1];
const zk_cca_out r = zk_cca_step<T, D, NH, NKV, T0, T1, RD, NT>(
    qkv, conv_state, v_prev, dw_w, dw_b, gw_w, gw_b, temp, offset, inv_freq, ZK_U2F(EPS), g, b, zk_tid, zk_lane,
    zk_warp, zk_dw, zk_y, zk_n, zk_red, conv_out, true);
if (zk_tid < D) {
  if (g < NH) {
    q_out[(b * NH + g) * D + zk_tid] = static_cast<T>(r.o);
  } else {
    const int h = g - NH;
    if (KVB == 0) {  // (zk_writable: kcache and vcache are uint32 words where KVB > 0)
      zk_writable(kcache)[((b * NKV + h) * cap + slot) * D + zk_tid] = static_cast<T>(r.o);
      zk_writable(vcache)[((b * NKV + h) * cap + slot) * D + zk_tid] = static_cast<T>(r.v);
    } else {
      zk_kv[zk_tid] = zk_round<T>(r.o);
      zk_kv[D + zk_tid] = zk_round<T>(r.v);
    }
    if (zk_tid < D / 2) {
      vprev_out[b * VH + h * (D / 2) + zk_tid] = static_cast<T>(r.vd);
    }
  }
}
if (KVB > 0 && g >= NH) {  // the whole threadgroup: a key head's
  ZK_BARRIER();
  zk_quantize_kv<T, D, KVB, KVG, NT>(zk_kv, zk_qp, kcache, vcache, kscales, kbiases, vscales, vbiases,
                                      (b * NKV + g - NH) * cap + slot, zk_tid, true);
}
