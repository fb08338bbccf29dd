// Expert-choice routing on the GPU: the softmax-over-experts probabilities that every expert
// ranks its tokens by, written expert-major. The selection itself (each expert's `capacity`
// best tokens, equal probabilities to the lower token, in ascending token order) is
// sr_select_tokens (tokens.cu) over each expert's row of probabilities, which also writes the
// chosen probabilities (the gates).
//
// The probabilities are the CPU's bits for float32, bfloat16 and float16 logits (the CPU's
// exp and eight-lane softmax sum, see common.cuh), so the GPU chooses the CPU's tokens, ties
// included. One warp per token, four tokens per 128-thread block.
//
// Rows holding NaN or an infinity get probability 0 for every expert (they are chosen only
// where an expert has nothing better) and are counted in the error buffer.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128)
    sr_expert_probs(const elem_t* logits, i64 num_tokens, int num_experts, acc_t* probs, int* errors) {
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (t >= num_tokens) {
    return;  // the whole warp
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const elem_t* row = logits + t * static_cast<i64>(num_experts);
  acc_t row_max;
  const bool finite = warp_finite_row_max(row, num_experts, lane, row_max);
  if (!finite) {
    for (int e = lane; e < num_experts; e += 32) {
      probs[e * num_tokens + t] = acc_t(0);
    }
    if (lane == 0) {
      atomicAdd(&errors[SR_ERR_NON_FINITE_LOGITS], 1);
    }
    return;
  }
  const acc_t row_sum = warp_lane_softmax_sum(row, num_experts, row_max, lane);
  for (int e = lane; e < num_experts; e += 32) {
    probs[e * num_tokens + t] = div_rn(fast_exp_acc(sub_rn(to_acc(row[e]), row_max)), row_sum);
  }
}

// expert_choice's [E, C] choices in permute's [T, E] slot layout: slot (t, e) gets expert e
// (unless `experts` is null) and value values[e, c] where indices[e, c] = t: the gates for
// the slot layout, the gates' gradient for sr_expert_choice_backward. Slots that no expert
// chose stay as the caller filled them (-1, 0). Token indices outside [0, T) are counted
// (SR_ERR_TOKEN_INDEX) and skipped. Here elem_t is the values' type (float32 or float64).
extern "C" __global__ void __launch_bounds__(256)
    sr_expert_choice_slots(const i64* indices, const elem_t* values, int num_experts, i64 capacity,
                           i64 num_tokens, i64* experts, elem_t* slot_values, int* errors) {
  const i64 count = static_cast<i64>(num_experts) * capacity;
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  int invalid = 0;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const i64 e = i / capacity;
    const i64 t = indices[i];
    if (t < 0 || t >= num_tokens) {
      invalid = 1;
      continue;
    }
    if (experts != nullptr) {
      experts[t * num_experts + e] = e;
    }
    slot_values[t * num_experts + e] = values[i];
  }
  if (invalid) {
    atomicAdd(&errors[SR_ERR_TOKEN_INDEX], 1);
  }
}

// The gradient of the gates with respect to the logits, one warp per token (4 per 128-thread
// block): with p the token's probabilities (recomputed, the forward's bits) and g its row of
// the gates' gradient in the slot layout (`placed`, [T, E] in acc_t, 0 where no expert chose
// the token), grad = p * (g - <p, g>). The dot product is the CPU's (rust/core/src/gating,
// choice_gradient_row): lane j of eight adds p * g of experts j, j + 8, ... in order, then
// the lanes in order; each product, sum and difference rounded once. So for float32,
// bfloat16 and float16 logits the gradient is the CPU's bit for bit. Rows holding NaN or an
// infinity get a zero gradient and are counted.
extern "C" __global__ void __launch_bounds__(128)
    sr_expert_choice_backward(const elem_t* logits, i64 num_tokens, int num_experts, const acc_t* placed,
                              elem_t* grad, int* errors) {
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (t >= num_tokens) {
    return;  // the whole warp
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const elem_t* row = logits + t * static_cast<i64>(num_experts);
  const acc_t* g = placed + t * static_cast<i64>(num_experts);
  elem_t* out = grad + t * static_cast<i64>(num_experts);
  acc_t row_max;
  if (!warp_finite_row_max(row, num_experts, lane, row_max)) {
    for (int e = lane; e < num_experts; e += 32) {
      out[e] = from_acc(acc_t(0));
    }
    if (lane == 0) {
      atomicAdd(&errors[SR_ERR_NON_FINITE_LOGITS], 1);
    }
    return;
  }
  const acc_t row_sum = warp_lane_softmax_sum(row, num_experts, row_max, lane);
  auto prob = [&](int e) { return div_rn(fast_exp_acc(sub_rn(to_acc(row[e]), row_max)), row_sum); };
  acc_t lane_dot = acc_t(0);
  if (lane < 8) {
    for (int e = lane; e < num_experts; e += 8) {
      lane_dot = add_rn(lane_dot, mul_rn(prob(e), g[e]));
    }
  }
  acc_t dot = acc_t(0);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    dot = add_rn(dot, __shfl_sync(SR_FULL_MASK, lane_dot, j));
  }
  for (int e = lane; e < num_experts; e += 32) {
    out[e] = from_acc(mul_rn(prob(e), sub_rn(g[e], dot)));
  }
}
