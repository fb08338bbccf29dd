// Load-balancing statistics, after rust/core/src/balance/mod.rs: per-group sums of normalised
// router scores and their gradient, the router z-loss. (Expert counts are integer work:
// sr_expert_counts in plan.cu.)
//
//   sr_score_stats         one warp per token (4 per block of 128): the row's max and the
//                          inverse of the normaliser (softmax: 1 / sum exp(l - max); sigmoid:
//                          1 / (sum sigmoid(l) + 1e-20)), then the normalised scores into a
//                          [T, E] workspace. Masked tokens get scores of 0; rows holding NaN
//                          or an infinity are counted and get 0 the same way.
//   sr_score_partials      one thread per (group, segment, expert): a group's tokens split at
//                          multiples of SR_SCORE_SEGMENT (64) tokens into at most J segments;
//                          each thread sums its segment's scores in token order in float64,
//                          from 0. The scores are computed in parallel by sr_score_stats, and
//                          the segments are short, so that no chain of dependent additions
//                          (each waiting on a load) is long.
//   sr_score_totals        per (group, expert): the group's J segment sums, by one thread in
//                          segment order (J <= 32), or by a warp (J > 32): lane l adds segments
//                          l, l + 32, ... in order, then a butterfly over the lanes in a fixed
//                          order. Rounded once to the accumulator type. The order depends on
//                          the shape alone (deterministic); it is not the CPU's (token blocks
//                          of 1024), and the scores come from the GPU's exp, so the sums agree
//                          with the CPU to float tolerance.
//   sr_score_sums_backward one warp per token: the Jacobian-vector product of its normalised
//                          scores with grad_sums of its group; zeros for masked and
//                          non-finite (counted) rows.
//   sr_z_loss_count        one block of 1024 threads: the unmasked tokens, n, and 1 / n.
//   sr_z_loss_rows         one warp per token: z = logsumexp(row), z^2 (float64) and the
//                          row's stats for the backward: its max and the gradient factor
//                          2 * (1 / n) * z / sum; (0, 0) for masked rows and for rows whose z
//                          is not finite (counted).
//   sr_z_loss_backward     one warp per token: the gradient exp(l - max) * factor * grad,
//                          recomputed from the logits and the stats; zeros for rows whose
//                          factor is 0 (their logits are not read).
//   sr_z_loss_total        one block of 1024 threads: the squares summed (strided, then a
//                          fixed-order tree), divided by n (0 without unmasked tokens).

#include "common.cuh"

namespace {

// Tokens per segment of sr_score_partials (sparseroute._cuda_ops.SCORE_SEGMENT_TOKENS).
#define SR_SCORE_SEGMENT 64
constexpr int kTokenSegment = SR_SCORE_SEGMENT;
// Segments per group above which sr_score_totals gives each sum a warp.
#define SR_SCORE_TOTALS_BY_WARP 32

__device__ __forceinline__ acc_t sigmoid(acc_t v) {
  return div_rn(acc_t(1), add_rn(acc_t(1), exp_acc(-v)));
}

// The unnormalised score of one logit: exp(l - max), or sigmoid(l).
__device__ __forceinline__ acc_t raw_score(acc_t v, acc_t max_logit, int use_sigmoid) {
  return use_sigmoid ? sigmoid(v) : exp_acc(sub_rn(v, max_logit));
}

__device__ __forceinline__ bool token_counts(const unsigned char* mask, i64 t) {
  return mask == nullptr || mask[t] != 0;
}

// Max and normaliser of one token's row, for a warp; false (on every lane) when the row holds
// NaN or an infinity.
__device__ __forceinline__ bool row_stats(const elem_t* row, int num_experts, int use_sigmoid,
                                          acc_t& max_logit, acc_t& normaliser) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  bool finite = true;
  acc_t m = neg_infinity<acc_t>();
  for (int e = lane; e < num_experts; e += 32) {
    const acc_t v = to_acc(row[e]);
    finite = finite && is_finite(v);
    m = v > m ? v : m;
  }
  if (__any_sync(SR_FULL_MASK, finite ? 0 : 1)) {
    return false;
  }
  m = team_reduce<32>(m, MaxOp(), static_cast<acc_t*>(nullptr));
  acc_t sum = acc_t(0);
  for (int e = lane; e < num_experts; e += 32) {
    sum = add_rn(sum, raw_score(to_acc(row[e]), m, use_sigmoid));
  }
  sum = team_reduce<32>(sum, SumOp(), static_cast<acc_t*>(nullptr));
  max_logit = m;
  normaliser = use_sigmoid ? add_rn(sum, acc_t(1e-20)) : sum;
  return true;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128)
    sr_score_stats(const elem_t* logits, i64 num_tokens, int num_experts, int use_sigmoid,
                   const unsigned char* mask, acc_t* scores, int* errors) {
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (t >= num_tokens) {
    return;  // a whole warp: the shuffles below involve only this warp
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const elem_t* row = logits + t * num_experts;
  acc_t m = acc_t(0);
  acc_t z = acc_t(0);
  acc_t inverse = acc_t(0);
  if (token_counts(mask, t)) {
    if (row_stats(row, num_experts, use_sigmoid, m, z)) {
      inverse = div_rn(acc_t(1), z);
    } else if (lane == 0) {
      atomicAdd(&errors[SR_ERR_NON_FINITE_LOGITS], 1);
    }
  }
  // A skipped token's scores are 0: adding them leaves the (non-negative) sums unchanged.
  acc_t* out = scores + t * num_experts;
  for (int e = lane; e < num_experts; e += 32) {
    out[e] = inverse == acc_t(0) ? acc_t(0) : mul_rn(raw_score(to_acc(row[e]), m, use_sigmoid), inverse);
  }
}

extern "C" __global__ void __launch_bounds__(256)
    sr_score_partials(const acc_t* scores, i64 num_tokens, int num_experts, i64 group_size, i64 num_groups,
                      i64 segments, double* partials) {
  const i64 items = num_groups * segments * num_experts;
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += stride) {
    const int e = static_cast<int>(i % num_experts);
    const i64 segment = i / num_experts;
    const i64 g = segment / segments;
    const i64 j = segment - g * segments;
    const i64 start = g * group_size;
    const i64 end = start + group_size < num_tokens ? start + group_size : num_tokens;
    const i64 block = start / kTokenSegment + j;
    const i64 lo = block * kTokenSegment > start ? block * kTokenSegment : start;
    const i64 hi = (block + 1) * kTokenSegment < end ? (block + 1) * kTokenSegment : end;
    // A chain of dependent float64 additions: sixteen loads are issued before their adds, so
    // that the chain waits for memory once per sixteen tokens, not once per token.
    constexpr int kAhead = 16;
    double sum = 0.0;
    for (i64 t = lo; t < hi; t += kAhead) {
      acc_t ahead[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        ahead[u] = t + u < hi ? scores[(t + u) * num_experts + e] : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        if (t + u < hi) {
          sum = add_rn(sum, static_cast<double>(ahead[u]));
        }
      }
    }
    partials[i] = sum;
  }
}

extern "C" __global__ void __launch_bounds__(256)
    sr_score_totals(const double* partials, i64 num_groups, i64 segments, int num_experts,
                    acc_t* sums) {
  const i64 items = num_groups * num_experts;
  // One thread, or one warp (the grid-stride steps are then whole warps), per sum.
  const int lanes = segments > SR_SCORE_TOTALS_BY_WARP ? 32 : 1;
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);
  const i64 first = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) / lanes;
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x / lanes;
  for (i64 i = first; i < items; i += stride) {
    const i64 g = i / num_experts;
    const i64 e = i - g * num_experts;
    const double* column = partials + g * segments * num_experts + e;
    double total = 0.0;
    for (i64 j = lane; j < segments; j += lanes) {
      total = add_rn(total, column[j * num_experts]);
    }
    if (lanes == 32) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        total = add_rn(total, __shfl_xor_sync(SR_FULL_MASK, total, offset));
      }
    }
    if (lane == 0) {
      // Rounded once to the accumulator type (cvt.rn), as torch's conversion would.
      sums[i] = static_cast<acc_t>(total);
    }
  }
}

extern "C" __global__ void __launch_bounds__(128)
    sr_score_sums_backward(const elem_t* logits, i64 num_tokens, int num_experts,
                           int use_sigmoid, i64 group_size, const unsigned char* mask,
                           const acc_t* grad_sums, elem_t* grad_logits, int* errors) {
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (t >= num_tokens) {
    return;
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const elem_t* row = logits + t * num_experts;
  elem_t* out = grad_logits + t * num_experts;
  acc_t m = acc_t(0);
  acc_t z = acc_t(0);
  bool valid = token_counts(mask, t);
  if (valid && !row_stats(row, num_experts, use_sigmoid, m, z)) {
    if (lane == 0) {
      atomicAdd(&errors[SR_ERR_NON_FINITE_LOGITS], 1);
    }
    valid = false;
  }
  if (!valid) {
    for (int e = lane; e < num_experts; e += 32) {
      out[e] = from_acc(acc_t(0));
    }
    return;
  }
  const acc_t inverse = div_rn(acc_t(1), z);
  const acc_t* a = grad_sums + (t / group_size) * num_experts;
  acc_t dot = acc_t(0);
  for (int e = lane; e < num_experts; e += 32) {
    const acc_t p = mul_rn(raw_score(to_acc(row[e]), m, use_sigmoid), inverse);
    dot = add_rn(dot, mul_rn(p, a[e]));
  }
  dot = team_reduce<32>(dot, SumOp(), static_cast<acc_t*>(nullptr));
  for (int e = lane; e < num_experts; e += 32) {
    const acc_t s = raw_score(to_acc(row[e]), m, use_sigmoid);
    const acc_t difference = sub_rn(a[e], dot);
    acc_t g;
    if (use_sigmoid) {
      // p = s / z: dL/ds = (a - dot) / z, ds/dl = s (1 - s)
      g = mul_rn(mul_rn(div_rn(difference, z), s), sub_rn(acc_t(1), s));
    } else {
      // dp_e/dl_j = p_e (delta_ej - p_j)
      g = mul_rn(mul_rn(s, inverse), difference);
    }
    out[e] = from_acc(g);
  }
}

extern "C" __global__ void __launch_bounds__(1024)
    sr_z_loss_count(const unsigned char* mask, i64 num_tokens, double* count, acc_t* scale) {
  __shared__ double scratch[32];
  double local = 0.0;
  for (i64 t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    local = add_rn(local, token_counts(mask, t) ? 1.0 : 0.0);
  }
  const double n = team_reduce<1024>(local, SumOp(), scratch);
  if (threadIdx.x == 0) {
    count[0] = n;
    scale[0] = n > 0.0 ? static_cast<acc_t>(div_rn(1.0, n)) : acc_t(0);
  }
}

extern "C" __global__ void __launch_bounds__(128)
    sr_z_loss_rows(const elem_t* logits, i64 num_tokens, int num_experts,
                   const unsigned char* mask, const acc_t* scale, acc_t* stats,
                   double* squares, int* errors) {
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (t >= num_tokens) {
    return;
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const elem_t* row = logits + t * num_experts;
  bool valid = token_counts(mask, t);
  acc_t m = neg_infinity<acc_t>();
  acc_t sum = acc_t(0);
  acc_t z = acc_t(0);
  if (valid) {
    for (int e = lane; e < num_experts; e += 32) {
      const acc_t v = to_acc(row[e]);
      m = v > m ? v : m;
    }
    m = team_reduce<32>(m, MaxOp(), static_cast<acc_t*>(nullptr));
    for (int e = lane; e < num_experts; e += 32) {
      sum = add_rn(sum, exp_acc(sub_rn(to_acc(row[e]), m)));
    }
    sum = team_reduce<32>(sum, SumOp(), static_cast<acc_t*>(nullptr));
    z = add_rn(m, log_acc(sum));
    if (!is_finite(z)) {  // NaN, +inf, or every logit -inf
      if (lane == 0) {
        atomicAdd(&errors[SR_ERR_NON_FINITE_LOGITS], 1);
      }
      valid = false;
    }
  }
  if (lane != 0) {
    return;
  }
  if (!valid) {
    stats[2 * t] = acc_t(0);
    stats[2 * t + 1] = acc_t(0);
    squares[t] = 0.0;
    return;
  }
  stats[2 * t] = m;
  stats[2 * t + 1] = div_rn(mul_rn(mul_rn(acc_t(2), scale[0]), z), sum);
  const double zd = static_cast<double>(z);
  squares[t] = mul_rn(zd, zd);
}

extern "C" __global__ void __launch_bounds__(128)
    sr_z_loss_backward(const elem_t* logits, i64 num_tokens, int num_experts, const acc_t* stats,
                       const acc_t* grad, elem_t* grad_logits) {
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (t >= num_tokens) {
    return;
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const elem_t* row = logits + t * num_experts;
  elem_t* out = grad_logits + t * num_experts;
  const acc_t m = stats[2 * t];
  const acc_t factor = stats[2 * t + 1];
  const acc_t g = grad[0];
  for (int e = lane; e < num_experts; e += 32) {
    out[e] = from_acc(factor == acc_t(0) ? acc_t(0)
                                         : mul_rn(mul_rn(exp_acc(sub_rn(to_acc(row[e]), m)), factor), g));
  }
}

extern "C" __global__ void __launch_bounds__(1024)
    sr_z_loss_total(const double* squares, i64 num_tokens, const double* count, acc_t* loss) {
  __shared__ double scratch[32];
  double local = 0.0;
  for (i64 t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    local = add_rn(local, squares[t]);
  }
  const double total = team_reduce<1024>(local, SumOp(), scratch);
  if (threadIdx.x == 0) {
    const double n = count[0];
    loss[0] = static_cast<acc_t>(n > 0.0 ? div_rn(total, n) : 0.0);
  }
}
