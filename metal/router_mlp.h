// ZAYA router MLP for decode, as a launch of its own: from the router state r (the router's down-projection plus
// the previous layer's state, which the residual norm before it adds) to each token's expert and its probability,
// where the plain path takes about a dozen primitives. The expert kernel runs the same function (zk_route in
// common.h) itself when it can; this launch serves the experts it cannot take. Plain-MLX reference:
// zaya_mlx/kernels/router.py, router_mlp_reference.
//
// Grid: one threadgroup of NT threads per token (x = n).
// Template: T (activation dtype), R (router width, a multiple of 8), NE1 (experts + skip), WQ (weights: 0 bf16,
// 1 f32), REPS (the RMSNorm eps's float32 bits), NT.
// Inputs: r [N, R], nw [R], w1 [R, R], b1 [R], w2 [R, R], b2 [R], wo [NE1, R], bal [NE1] float32.
// Outputs: choice [N] int32, prob [N] float32 (softmax in float32 over T logits).
const int n = zk_bx;

ZK_SHARED float zk_a[R + R / 32];
ZK_SHARED float zk_h[R + R / 32];
ZK_SHARED float zk_l[NE1];
ZK_SHARED float zk_red[NT / 32];

const zk_routed best = zk_route<T, R, NE1, WQ, NT>(r + n * R, nw, w1, b1, w2, b2, wo, bal, ZK_U2F(REPS), zk_a, zk_h,
                                                   zk_l, zk_red, zk_tid);
if (zk_tid == 0) {
  choice[n] = best.choice;
  prob[n] = best.prob;
}
