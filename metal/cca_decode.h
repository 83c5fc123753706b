// CCA decode step: one launch for everything between the fused q/k/v projection and attention, for one
// new token per sequence. It replaces, per layer and step: appending the q/k inputs to the conv state,
// the causal depthwise conv (kernel T0, bias), the causal grouped conv (kernel T1, one group per head,
// bias), the residual means q_res = (q + repeat_kv(k)) / 2 and k_res = mean of q_res over each KV group,
// L2 normalisation to norm sqrt(D) with an eps clamp, the key temperature, NeoX RoPE on the first RD
// channels of each head, and assembling the value from the current half and the previous token's
// delayed half. Plain-MLX reference: zaya_mlx/kernels/cca.py, cca_decode_step_reference.
//
// Grid: one threadgroup of NT threads per (head group g, batch row b): x = g (NH query heads, then NKV
// key heads), y = b. Each group's D channels depend only on that group's inputs, so no threadgroup
// waits for another.
// Template: T (activation dtype), D, NH, NKV, T0, T1, RD (rope dims, even, <= D), NT (threads, >= D).
// Inputs: qkv [B, P] (P = C + NKV*D, C = (NH+NKV)*D: q, k, v_current, v_delayed), conv_state [B, S, C]
// (S = T0-1 + T1-1 >= 1), v_prev [B, NKV*D/2], dw_w [C, T0], dw_b [C], gw_w [C, T1, D], gw_b [C],
// temp [NKV], offset [B] int32, inv_freq [RD/2] float32, fparams [1] float32 (the norm's eps clamp).
// Outputs: q_out [B, NH, 1, D], k_out [B, NKV, 1, D], v_out [B, NKV, 1, D], conv_out [B, S, C],
// vprev_out [B, NKV*D/2]. Arithmetic is float32, rounded to T where the reference rounds.
constexpr int G = NH + NKV;
constexpr int C = G * D;
constexpr int S = (T0 - 1) + (T1 - 1);
constexpr int VH = (NKV * D) / 2;
constexpr int P = C + 2 * VH;
constexpr int REP = NH / NKV;
constexpr int NWARP = NT / 32;
constexpr int HALF = RD / 2;

const int g = zk_bx;
const int b = zk_by;
const int cbase = g * D;
const int xrow = b * P;

ZK_SHARED float zk_dw[T1 * D];
ZK_SHARED float zk_y[D];
ZK_SHARED float zk_n[D];
ZK_SHARED float zk_red[NWARP];

// 1. Depthwise conv over the window [conv_state[b], qkv[b, :C]] (S + 1 positions): T1 outputs.
for (int idx = zk_tid; idx < T1 * D; idx += NT) {
  const int m = idx / D;
  const int ch = cbase + (idx - m * D);
  float acc = 0.0f;
  for (int i = 0; i < T0; ++i) {
    const int j = m + i;
    const float xv = (j < S) ? static_cast<float>(conv_state[(b * S + j) * C + ch])
                             : static_cast<float>(qkv[xrow + ch]);
    acc += static_cast<float>(dw_w[ch * T0 + i]) * xv;
  }
  zk_dw[idx] = zk_round<T>(acc + static_cast<float>(dw_b[ch]));
}
// 2. The new conv state: window positions 1..S.
for (int idx = zk_tid; idx < S * D; idx += NT) {
  const int j = idx / D;
  const int ch = cbase + (idx - j * D);
  conv_out[(b * S + j) * C + ch] = (j + 1 < S) ? conv_state[(b * S + j + 1) * C + ch] : qkv[xrow + ch];
}
ZK_BARRIER();

// 3. Grouped conv: one SIMD group per output channel, its lanes along the T1 * D weights.
for (int c = zk_warp; c < D; c += NWARP) {
  const int ch = cbase + c;
  float acc = 0.0f;
  for (int k = zk_lane; k < T1 * D; k += 32) {
    acc += static_cast<float>(gw_w[ch * (T1 * D) + k]) * zk_dw[k];
  }
  acc = zk_simd_sum(acc);
  if (zk_lane == 0) {
    zk_y[c] = zk_round<T>(acc + static_cast<float>(gw_b[ch]));
  }
}
ZK_BARRIER();

// 4. Residual path, then the squared norm of the head.
float val = 0.0f;
if (zk_tid < D) {
  const int c = zk_tid;
  float res;
  if (g < NH) {
    const float qv = static_cast<float>(qkv[xrow + g * D + c]);
    const float kv = static_cast<float>(qkv[xrow + NH * D + (g / REP) * D + c]);
    res = zk_round<T>(zk_round<T>(qv + kv) * 0.5f);
  } else {
    const int h = g - NH;
    const float kv = static_cast<float>(qkv[xrow + NH * D + h * D + c]);
    float s = 0.0f;
    for (int r = 0; r < REP; ++r) {
      const float qv = static_cast<float>(qkv[xrow + (h * REP + r) * D + c]);
      s += zk_round<T>(zk_round<T>(qv + kv) * 0.5f);
    }
    res = zk_round<T>(s / float(REP));
  }
  val = zk_round<T>(zk_y[c] + res);
}
const float sq = zk_simd_sum(val * val);
if (zk_lane == 0) {
  zk_red[zk_warp] = sq;
}
ZK_BARRIER();
float tot = 0.0f;
for (int w = 0; w < NWARP; ++w) {
  tot += zk_red[w];
}
float nrm = zk_sqrt(tot);
nrm = (nrm < fparams[0]) ? fparams[0] : nrm;
const float fac = zk_sqrt(float(D)) / nrm;

// 5. Scale to norm sqrt(D), key temperature, RoPE (NeoX halves) on the first RD channels.
if (zk_tid < D) {
  float v = zk_round<T>(val * fac);
  if (g >= NH) {
    v = zk_round<T>(v * static_cast<float>(temp[g - NH]));
  }
  zk_n[zk_tid] = v;
}
ZK_BARRIER();
if (zk_tid < D) {
  const int c = zk_tid;
  float o = zk_n[c];
  if (c < RD) {
    const int i = (c < HALF) ? c : c - HALF;
    const float theta = static_cast<float>(offset[b]) * inv_freq[i];
    const float cs = zk_cos(theta);
    const float sn = zk_sin(theta);
    o = (c < HALF) ? (zk_n[c] * cs - zk_n[c + HALF] * sn) : (zk_n[c] * cs + zk_n[c - HALF] * sn);
  }
  if (g < NH) {
    q_out[(b * NH + g) * D + c] = static_cast<T>(o);
  } else {
    k_out[(b * NKV + (g - NH)) * D + c] = static_cast<T>(o);
  }
}

// 6. Values: [v_current, previous v_delayed] viewed as NKV heads of D; the new delayed state.
if (g >= NH) {
  const int h = g - NH;
  for (int c = zk_tid; c < D; c += NT) {
    const int f = h * D + c;
    v_out[(b * NKV + h) * D + c] = (f < VH) ? qkv[xrow + C + f] : v_prev[b * VH + (f - VH)];
  }
  for (int f = h * (D / 2) + zk_tid; f < (h + 1) * (D / 2); f += NT) {
    vprev_out[b * VH + f] = qkv[xrow + C + VH + f];
  }
}
