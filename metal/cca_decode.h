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
// Template: T (activation dtype), D, NH, NKV, T0, T1, RD (rope dims, even, <= D), NT (threads, >= D;
// 1024 keeps the grouped conv's loads wide: a few channels a SIMD group).
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
constexpr int CPW = (D + NWARP - 1) / NWARP;  // grouped-conv channels a SIMD group
constexpr int KW = (T1 * D + 31) / 32;        // grouped-conv weights a lane, per channel

const int g = zk_bx;
const int b = zk_by;
const int cbase = g * D;
const int xrow = b * P;

ZK_SHARED float zk_dw[T1 * D];
ZK_SHARED float zk_y[D];
ZK_SHARED float zk_n[D];
ZK_SHARED float zk_red[NWARP];

// 0. Everything the later steps read from memory besides the grouped-conv weights, loaded up front (a
// store can alias a later load, so loads interleaved with stores would wait out their latencies in turn);
// L2 fetches the group's grouped-conv weights meanwhile.
zk_prefetch(gw_w + cbase * (T1 * D), D * (T1 * D), zk_tid, NT);
const int c0 = zk_tid;  // this thread's channel of the head in steps 4-6 (when < D)
float dwx[T0];          // step 1: the depthwise window of item zk_tid (when < T1 * D)
float dww[T0];
float dwb = 0.0f;
float statev = 0.0f;    // step 2: conv state item zk_tid (when < S * D)
float res = 0.0f;       // step 4: the residual path
float tempv = 1.0f;     // step 5: the key temperature
float cs = 1.0f;        // step 5: RoPE cos / sin
float sn = 0.0f;
float vv = 0.0f;        // step 6: value channel c0, and delayed value zk_tid (when < D / 2)
float vd = 0.0f;
if (zk_tid < T1 * D) {
  const int m = zk_tid / D;
  const int ch = cbase + (zk_tid - m * D);
  ZK_UNROLL
  for (int i = 0; i < T0; ++i) {
    const int j = m + i;
    dwx[i] = (j < S) ? static_cast<float>(conv_state[(b * S + j) * C + ch]) : static_cast<float>(qkv[xrow + ch]);
    dww[i] = static_cast<float>(dw_w[ch * T0 + i]);
  }
  dwb = static_cast<float>(dw_b[ch]);
}
if (zk_tid < S * D) {
  const int j = zk_tid / D;
  const int ch = cbase + (zk_tid - j * D);
  statev = (j + 1 < S) ? static_cast<float>(conv_state[(b * S + j + 1) * C + ch]) : static_cast<float>(qkv[xrow + ch]);
}
if (c0 < D) {
  if (g < NH) {
    const float qv = static_cast<float>(qkv[xrow + g * D + c0]);
    const float kv = static_cast<float>(qkv[xrow + NH * D + (g / REP) * D + c0]);
    res = zk_round<T>(zk_round<T>(qv + kv) * 0.5f);
  } else {
    const int h = g - NH;
    const float kv = static_cast<float>(qkv[xrow + NH * D + h * D + c0]);
    float sum = 0.0f;
    for (int r = 0; r < REP; ++r) {
      const float qv = static_cast<float>(qkv[xrow + (h * REP + r) * D + c0]);
      sum += zk_round<T>(zk_round<T>(qv + kv) * 0.5f);
    }
    res = zk_round<T>(sum / float(REP));
    tempv = static_cast<float>(temp[h]);
    const int f = h * D + c0;
    vv = (f < VH) ? static_cast<float>(qkv[xrow + C + f]) : static_cast<float>(v_prev[b * VH + (f - VH)]);
    if (c0 < D / 2) {
      vd = static_cast<float>(qkv[xrow + C + VH + h * (D / 2) + c0]);
    }
  }
  if (c0 < RD) {
    const int i = (c0 < HALF) ? c0 : c0 - HALF;
    const float theta = static_cast<float>(offset[b]) * inv_freq[i];
    cs = zk_cos(theta);
    sn = zk_sin(theta);
  }
}
const float eps = fparams[0];
float gb[CPW];
ZK_UNROLL
for (int i = 0; i < CPW; ++i) {
  const int c = zk_warp + i * NWARP;
  gb[i] = (c < D) ? static_cast<float>(gw_b[cbase + c]) : 0.0f;
}

// 1. Depthwise conv over the window [conv_state[b], qkv[b, :C]] (S + 1 positions): T1 outputs.
if (zk_tid < T1 * D) {
  float acc = 0.0f;
  ZK_UNROLL
  for (int i = 0; i < T0; ++i) {
    acc += dww[i] * dwx[i];
  }
  zk_dw[zk_tid] = zk_round<T>(acc + dwb);
}
// 2. The new conv state: window positions 1..S.
if (zk_tid < S * D) {
  const int j = zk_tid / D;
  conv_out[(b * S + j) * C + cbase + (zk_tid - j * D)] = static_cast<T>(statev);
}
ZK_BARRIER();

// 3. Grouped conv: a SIMD group per output channel, CPW channels a group with all their loads in
// flight, the lanes along the T1 * D weights.
{
  float acc[CPW];
  ZK_UNROLL
  for (int i = 0; i < CPW; ++i) {
    const int c = zk_warp + i * NWARP;
    const int ch = cbase + c;
    float a = 0.0f;
    ZK_UNROLL
    for (int j = 0; j < KW; ++j) {
      const int k = zk_lane + 32 * j;
      if (c < D && k < T1 * D) {
        a += static_cast<float>(gw_w[ch * (T1 * D) + k]) * zk_dw[k];
      }
    }
    acc[i] = a;
  }
  ZK_UNROLL
  for (int i = 0; i < CPW; ++i) {
    const int c = zk_warp + i * NWARP;
    const float a = zk_simd_sum(acc[i]);
    if (zk_lane == 0 && c < D) {
      zk_y[c] = zk_round<T>(a + gb[i]);
    }
  }
}
ZK_BARRIER();

// 4. Conv output plus the residual path, then the squared norm of the head.
const float val = (c0 < D) ? zk_round<T>(zk_y[c0] + res) : 0.0f;
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
nrm = (nrm < eps) ? eps : nrm;
const float fac = zk_sqrt(float(D)) / nrm;

// 5. Scale to norm sqrt(D), key temperature, RoPE (NeoX halves) on the first RD channels.
if (c0 < D) {
  float v = zk_round<T>(val * fac);
  if (g >= NH) {
    v = zk_round<T>(v * tempv);
  }
  zk_n[c0] = v;
}
ZK_BARRIER();
if (c0 < D) {
  float o = zk_n[c0];
  if (c0 < RD) {
    o = (c0 < HALF) ? (zk_n[c0] * cs - zk_n[c0 + HALF] * sn) : (zk_n[c0] * cs + zk_n[c0 - HALF] * sn);
  }
  if (g < NH) {
    q_out[(b * NH + g) * D + c0] = static_cast<T>(o);
  } else {
    k_out[(b * NKV + (g - NH)) * D + c0] = static_cast<T>(o);
  }
}

// 6. Values: [v_current, previous v_delayed] viewed as NKV heads of D; the new delayed state.
if (g >= NH && c0 < D) {
  const int h = g - NH;
  v_out[(b * NKV + h) * D + c0] = static_cast<T>(vv);
  if (c0 < D / 2) {
    vprev_out[b * VH + h * (D / 2) + c0] = static_cast<T>(vd);
  }
}
