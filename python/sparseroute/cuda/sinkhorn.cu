// Sinkhorn balancing on the GPU, float32: the iteration of rust/core/src/balance/mod.rs
// (sinkhorn) with the CPU's sums in the CPU's order, so the scores and the number of
// iterations are the CPU's bits.
//
//   sr_sinkhorn_cost     cost = exp(logits) (the CPU's fused exp, sr_fma_exp), into the output
//                        buffer
//   sr_sinkhorn_block    one CUDA block per block of SINKHORN_BLOCK tokens: d0[t] from d1 (the
//                        sum over experts in eight lanes, lane j adding experts j, j + 8, ...,
//                        then the lanes in order), then the block's column sums of d0 * cost
//                        (tokens in order), one thread per expert
//   sr_sinkhorn_update   d1 from the blocks' column sums (blocks in order) and the mean
//                        absolute change of d1 (experts in order); sets `done` when it is at
//                        most tol
//   sr_sinkhorn_scores   out = d1[e] * cost * d0[t]
//
// `state` is {done, iterations}: once done is set, the iteration kernels return at once, so
// the host can queue several iterations before it reads `done`. Logits that are NaN, -inf or
// above 88 (exp would overflow) are counted (SR_ERR_SINKHORN_LOGITS) and their cost is 0.

#include "common.cuh"

#define SR_SINKHORN_BLOCK 512
#define SR_SINKHORN_EPS 1e-8f

extern "C" __global__ void __launch_bounds__(256)
    sr_sinkhorn_cost(const float* logits, i64 count, float* cost, int* errors) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  int invalid = 0;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const float v = logits[i];
    const bool ok = v <= 88.0f && v > neg_infinity<float>();  // NaN fails both
    invalid |= ok ? 0 : 1;
    cost[i] = ok ? sr_fma_exp(v) : 0.0f;
  }
  if (invalid) {
    atomicAdd(&errors[SR_ERR_SINKHORN_LOGITS], 1);
  }
}

extern "C" __global__ void __launch_bounds__(256)
    sr_sinkhorn_block(const float* cost, i64 num_tokens, int num_experts, float t_inv, const float* d1,
                      float* d0, float* partials, const int* state) {
  if (state[0]) {
    return;
  }
  __shared__ float block_d0[SR_SINKHORN_BLOCK];
  const i64 first = static_cast<i64>(blockIdx.x) * SR_SINKHORN_BLOCK;
  const i64 remaining = num_tokens - first;
  const int count = remaining < SR_SINKHORN_BLOCK ? static_cast<int>(remaining) : SR_SINKHORN_BLOCK;
  // d0: teams of eight threads, one token each, 32 tokens per step (every lane of a warp
  // takes part in the shuffles of every step).
  const int lane8 = static_cast<int>(threadIdx.x & 7);
  const int team = static_cast<int>(threadIdx.x >> 3);
  for (int base = 0; base < count; base += 32) {
    const int token = base + team;
    const bool active = token < count;
    float lane_sum = 0.0f;
    if (active) {
      const float* row = cost + (first + token) * num_experts;
      for (int e = lane8; e < num_experts; e += 8) {
        lane_sum = __fadd_rn(lane_sum, __fmul_rn(d1[e], row[e]));
      }
    }
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      sum = __fadd_rn(sum, __shfl_sync(SR_FULL_MASK, lane_sum, j, 8));
    }
    if (active && lane8 == 0) {
      const float d = __fdiv_rn(t_inv, __fadd_rn(sum, SR_SINKHORN_EPS));
      block_d0[token] = d;
      d0[first + token] = d;
    }
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < num_experts; e += static_cast<int>(blockDim.x)) {
    float column = 0.0f;
    const float* column_start = cost + first * num_experts + e;
    for (int token = 0; token < count; ++token) {
      column = __fadd_rn(column, __fmul_rn(block_d0[token], column_start[static_cast<i64>(token) * num_experts]));
    }
    partials[static_cast<i64>(blockIdx.x) * num_experts + e] = column;
  }
}

// One block of 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    sr_sinkhorn_update(const float* partials, i64 num_blocks, int num_experts, float e_inv, float tol,
                       float* d1, float* changes, int* state) {
  if (state[0]) {
    return;
  }
  for (int e = static_cast<int>(threadIdx.x); e < num_experts; e += static_cast<int>(blockDim.x)) {
    float sum = 0.0f;
    for (i64 b = 0; b < num_blocks; ++b) {
      sum = __fadd_rn(sum, partials[b * num_experts + e]);
    }
    const float next = __fdiv_rn(e_inv, __fadd_rn(sum, SR_SINKHORN_EPS));
    changes[e] = fabsf(__fsub_rn(next, d1[e]));
    d1[e] = next;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float change = 0.0f;
    for (int e = 0; e < num_experts; ++e) {
      change = __fadd_rn(change, changes[e]);
    }
    state[1] += 1;
    if (__fdiv_rn(change, static_cast<float>(num_experts)) <= tol) {
      state[0] = 1;
    }
  }
}

extern "C" __global__ void __launch_bounds__(256)
    sr_sinkhorn_scores(float* out, i64 num_tokens, int num_experts, const float* d0, const float* d1) {
  const i64 count = num_tokens * num_experts;
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    out[i] = __fmul_rn(__fmul_rn(d1[i % num_experts], out[i]), d0[i / num_experts]);
  }
}
