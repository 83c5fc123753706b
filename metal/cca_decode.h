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
// lane and channel, so NT sets the registers a thread may use), EPS (the norm's eps clamp, its float32 bits).
// Inputs: qkv [B, P] (P = C + NKV*D, C = (NH+NKV)*D: q, k, v_current, v_delayed), conv_state [B, S, C]
// (S = T0-1 + T1-1 >= 1), v_prev [B, NKV*D/2], dw_w [C, T0], dw_b [C], gw_w [C, T1, D], gw_b [C],
// temp [NKV], offset [B] int32, inv_freq [RD/2] float32,
// kcache, vcache [B, NKV, CAP, D] (T; written in place), filled [1] int32 (positions held after the write),
// capacity [1] int32 (CAP, read at run time: a grown buffer then compiles no new variant),
// after (not read: an array that orders this launch after the last reader of an array it writes in place).
// Outputs: q_out [B, NH, 1, D] (may be written into a given array: ZK_INPLACE), conv_out [B, S, C], vprev_out
// [B, NKV*D/2]. Arithmetic is float32, rounded to T where the reference rounds.
constexpr int G = NH + NKV;
constexpr int C = G * D;
constexpr int S = (T0 - 1) + (T1 - 1);
constexpr int VH = (NKV * D) / 2;
constexpr int P = C + 2 * VH;
constexpr int REP = NH / NKV;
constexpr int NWARP = NT / 32;
constexpr int HALF = RD / 2;
constexpr int CPW = (D + NWARP - 1) / NWARP;  // grouped-conv channels a SIMD group
constexpr int QMW = (sizeof(T) == 2) ? 0 : 1;  // grouped-conv weights as zk_dot_u4 reads them: bf16 or f32
constexpr int VPC = 16 / sizeof(T);             // weights a 16-byte chunk
constexpr int NCH = (T1 * D) / VPC;             // chunks a channel's weight row
constexpr int KI = (NCH + 31) / 32;             // chunks a lane, per channel

const int g = zk_bx;
const int b = zk_by;
const int slot = filled[0] - 1;
const int cap = capacity[0];
const int cbase = g * D;
const int xrow = b * P;

ZK_SHARED float zk_dw[T1 * D + (T1 * D) / 32];  // padded: see zk_pad
ZK_SHARED float zk_y[D];
ZK_SHARED float zk_n[D];
ZK_SHARED float zk_red[NWARP];

// 0. Every load of the kernel, issued before any result is used and with no branch between them: a load
// behind a branch waits for what came before it, so each group of loads would cost its own trip to memory.
// A thread with no item in a step reads a valid element and drops it.
const int c0 = zk_tid;                      // this thread's channel of the head in steps 4-6 (when < D)
const int cc = (c0 < D) ? c0 : 0;
const bool has1 = zk_tid < T1 * D;          // step 1: depthwise output item zk_tid
const int m1 = has1 ? zk_tid / D : 0;
const int ch1 = cbase + (has1 ? zk_tid - m1 * D : 0);
float dwx[T0];
float dww[T0];
ZK_UNROLL
for (int i = 0; i < T0; ++i) {
  const int j = m1 + i;
  const float st = static_cast<float>(conv_state[(b * S + ((j < S) ? j : S - 1)) * C + ch1]);
  dwx[i] = (j < S) ? st : static_cast<float>(qkv[xrow + ch1]);
  dww[i] = static_cast<float>(dw_w[ch1 * T0 + i]);
}
const float dwb = static_cast<float>(dw_b[ch1]);
const bool has2 = zk_tid < S * D;           // step 2: conv state item zk_tid
const int j2 = has2 ? zk_tid / D : 0;
const int ch2 = cbase + (has2 ? zk_tid - j2 * D : 0);
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
const float tempv = static_cast<float>(temp[kh]);
const int f = kh * D + cc;
const float vcur = static_cast<float>(qkv[xrow + C + ((f < VH) ? f : 0)]);
const float vold = static_cast<float>(v_prev[b * VH + ((f < VH) ? 0 : f - VH)]);
const float vd = static_cast<float>(qkv[xrow + C + VH + kh * (D / 2) + ((cc < D / 2) ? cc : 0)]);
const int ri = (cc < HALF) ? cc : ((cc < RD) ? cc - HALF : 0);
const float pos = static_cast<float>(offset[b]);
const float freq = inv_freq[ri];
const float eps = ZK_U2F(EPS);
// step 3: this SIMD group's grouped-conv rows, 16 bytes a lane, and their biases
uint4 gwv[CPW][KI];
float gb[CPW];
ZK_UNROLL
for (int i = 0; i < CPW; ++i) {
  const int c = zk_warp + i * NWARP;
  const int ch = cbase + ((c < D) ? c : 0);
  gb[i] = static_cast<float>(gw_b[ch]);
  ZK_UNROLL
  for (int it = 0; it < KI; ++it) {
    const int v = it * 32 + zk_lane;
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
const float vv = (f < VH) ? vcur : vold;
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
  zk_dw[zk_pad(zk_tid)] = zk_round<T>(acc + dwb);
}
// 2. The new conv state: window positions 1..S.
if (has2) {
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
      const int v = it * 32 + zk_lane;
      if (v < NCH) {
        a += zk_dot_u4<QMW, 16>(gwv[i][it], zk_dw, v * VPC).d;
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
float nrm = zk_sqrt(zk_threadgroup_sum<NWARP>(val * val, zk_red, zk_lane, zk_warp));
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
    ZK_WRITABLE(T, kcache)[((b * NKV + (g - NH)) * cap + slot) * D + c0] = static_cast<T>(o);
  }
}

// 6. Values: [v_current, previous v_delayed] viewed as NKV heads of D; the new delayed state.
if (g >= NH && c0 < D) {
  const int h = g - NH;
  ZK_WRITABLE(T, vcache)[((b * NKV + h) * cap + slot) * D + c0] = static_cast<T>(vv);
  if (c0 < D / 2) {
    vprev_out[b * VH + h * (D / 2) + c0] = static_cast<T>(vd);
  }
}
