// Top-p (dynamic-k) gating on the GPU: the semantics of rust/core/src/gating/mod.rs
// (topp_gating) and docs/semantics.md, with the CPU's bits for float32, bfloat16 and float16
// logits: the probabilities use the CPU's exp (sr_fast_exp) and its eight-lane softmax sum
// (warp_lane_softmax_sum), and the cumulative probability is added in rank order, so the
// kept prefix, the experts and the weights are the CPU's. float64 uses exp, within an ulp of
// the CPU's.
//
// One warp routes one token (four tokens per 128-thread block), for any E. Ranks are found
// one per round, as in sr_topk_gating: the best (logit, expert) pair after the previous
// round's pair (higher logit first, equal logits the lower expert first). Rounds stop at the
// first rank that is not kept, so a token costs (kept + 1) passes over its logits.
//
// Rows holding NaN or an infinity are not routed (experts -1, weights 0) and are counted in
// the error buffer (SR_ERR_NON_FINITE_LOGITS); the kernel never synchronises with the host.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128)
    sr_topp_gating(const elem_t* logits, i64 num_tokens, int num_experts, double p, int min_k, int max_k,
                   int inclusive, int normalize, acc_t* weights, i64* experts, int* errors) {
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (t >= num_tokens) {
    return;  // the whole warp
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const elem_t* row = logits + t * static_cast<i64>(num_experts);
  acc_t* out_weights = weights + t * static_cast<i64>(max_k);
  i64* out_experts = experts + t * static_cast<i64>(max_k);

  acc_t row_max;
  if (!warp_finite_row_max(row, num_experts, lane, row_max)) {
    for (int r = lane; r < max_k; r += 32) {
      out_experts[r] = -1;
      out_weights[r] = acc_t(0);
    }
    if (lane == 0) {
      atomicAdd(&errors[SR_ERR_NON_FINITE_LOGITS], 1);
    }
    return;
  }
  const acc_t row_sum = warp_lane_softmax_sum(row, num_experts, row_max, lane);
  // The CPU converts p to the accumulator type the same way (round to nearest).
  const acc_t threshold = static_cast<acc_t>(p);

  acc_t cumulative = acc_t(0);
  int kept = 0;
  acc_t previous_key = neg_infinity<acc_t>();
  int previous_index = 0;
  for (int r = 0; r < max_k; ++r) {
    acc_t best_key = neg_infinity<acc_t>();
    int best_index = 0x7fffffff;
    for (int e = lane; e < num_experts; e += 32) {
      const acc_t key = to_acc(row[e]);
      const bool after_previous = r == 0 || pair_before(previous_key, previous_index, key, e);
      if (after_previous && pair_before(key, e, best_key, best_index)) {
        best_key = key;
        best_index = e;
      }
    }
    team_best_pair<32>(best_key, best_index, static_cast<acc_t*>(nullptr), static_cast<int*>(nullptr));
    // Every lane computes the same probability from the same bits.
    const acc_t prob = div_rn(fast_exp_acc(sub_rn(best_key, row_max)), row_sum);
    const bool keep = r < min_k || (inclusive ? cumulative < threshold : add_rn(cumulative, prob) <= threshold);
    if (!keep) {
      break;  // uniform over the warp
    }
    cumulative = add_rn(cumulative, prob);
    kept = r + 1;
    if (lane == r % 32) {
      out_experts[r] = best_index;
      out_weights[r] = prob;
    }
    previous_key = best_key;
    previous_index = best_index;
  }
  // Lane r % 32 reads back only the slots it wrote.
  const acc_t total = normalize ? cumulative : acc_t(1);
  for (int r = lane; r < max_k; r += 32) {
    if (r < kept) {
      out_weights[r] = div_rn(out_weights[r], total);
    } else {
      out_experts[r] = -1;
      out_weights[r] = acc_t(0);
    }
  }
}
