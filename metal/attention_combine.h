// Decode attention, second pass for long caches: merges the chunks that decode_attention.h (SPLIT)
// wrote for each query head, weighting chunk c's normalised output by its softmax sum l_c * exp(m_c - M).
// With HAS_O it then adds the head's share of o_proj, as decode_attention.h does in one pass: RS threadgroups
// merge the same head, each adding o_proj's rows [rs * HO / RS, (rs + 1) * HO / RS), so that o_proj spreads over
// more SMs where B * NH threadgroups would leave most of them idle (batch 1).
// Plain-MLX reference: zaya_mlx/kernels/attention.py, decode_attention_reference.
//
// Grid: x = (b * NH + h) * RS + rs (threadgroups of NT threads, thread d < D merges output value d).
// Template: T (output dtype), D, NH, NT (>= D), HAS_O, HO, QM, BITS, GS, HAS_OB (as in decode_attention.h).
// Inputs: part [B, NH, NC, D] float32, ml [B, NH, NC, 2] float32 (max, sum), meta [6] int32 (NC at 3, RS at 4:
// 1 without o_proj), wo, wos,
// wob, bo (o_proj, as in decode_attention.h).
// Output: out [B, 1, NH * D] (T), or with HAS_O o_proj's partial sums [B, NH, HO] float32.
const int NC = meta[3];
const int RS = meta[4];
const int bh = zk_bx / RS;
const int rs = zk_bx - bh * RS;
const int d = zk_tid;
ZK_SHARED float zk_o[HAS_O ? D : 1];
if (d < D) {
  const float y = zk_merge_chunks<D>(part, ml, bh, NC, d);
  if (HAS_O) {
    zk_o[d] = zk_round<T>(y);
  } else {
    out[bh * D + d] = static_cast<T>(y);
  }
}
if (HAS_O) {
  ZK_BARRIER();
  const int h = bh % NH;
  zk_slice_matvec<QM, BITS, GS, NH * D, D, NT>(wo, wos, wob, bo, HAS_OB && h == 0, zk_o, h * D, out + bh * HO, zk_tid,
                                               rs * HO / RS, (rs + 1) * HO / RS);
}
