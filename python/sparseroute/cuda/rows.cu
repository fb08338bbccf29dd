// Row movement of permute / unpermute and their gradients, matching rust/core/src/dispatch.rs
// bit for bit: the same products and sums, rounded once each (add_rn / mul_rn, no fused
// multiply-add), in the same order.
//
//   sr_gather_rows   out[r] = x[s / k] (times weights[s]) for s = row_to_slot[r]; zeros where
//                    s < 0. Permute, and (weighted) the gradient of unpermute for its rows.
//                    One block of 128 threads per row (grid-stride over rows).
//   sr_combine_rows  out[t] = sum over t's non-empty slots j, in slot order, of
//                    weights[t, j] * rows[slot_to_row[t, j]], accumulated in acc_t, starting
//                    from the first product (no leading 0 +). Unpermute, and (unweighted) the
//                    gradient of permute. One block of 128 threads per token (grid-stride).
//   sr_slot_dots     out[t, j] = dot(grad_y[t], rows[slot_to_row[t, j]]): eight threads per
//                    dot, thread i summing elements i, i + 8, ... in index order, then the
//                    eight partial sums added in thread order from 0: the Rust kernel's eight
//                    lanes exactly. 32 dots per block of 256 threads.
//
// With `vectorized` set (the row length in bytes and both base pointers are multiples of 16)
// rows move as 16-byte words. Plan entries that point outside the tensors are treated as empty
// and counted in the error buffer; nothing is read or written out of bounds.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128)
    sr_gather_rows(const elem_t* x, i64 num_tokens, i64 row_len, const i64* row_to_slot,
                   i64 num_rows, i64 k, const acc_t* weights, elem_t* out, int vectorized,
                   int* errors) {
  for (i64 r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const i64 s = row_to_slot[r];
    i64 token = s >= 0 ? s / k : -1;
    if (token >= num_tokens) {
      if (threadIdx.x == 0) {
        atomicAdd(&errors[SR_ERR_PLAN_INDEX], 1);
      }
      token = -1;
    }
    elem_t* dst = out + r * row_len;
    const elem_t* src = x + (token >= 0 ? token : 0) * row_len;
    const acc_t w = (token >= 0 && weights != nullptr) ? weights[s] : acc_t(1);
    if (vectorized) {
      const i64 words = row_len / kPerWord;
      for (i64 i = threadIdx.x; i < words; i += blockDim.x) {
        Word v;
        if (token < 0) {
          v.bits = make_uint4(0u, 0u, 0u, 0u);
        } else {
          v = load_word(src + i * kPerWord);
          if (weights != nullptr) {
#pragma unroll
            for (int q = 0; q < kPerWord; ++q) {
              v.values[q] = from_acc(mul_rn(w, to_acc(v.values[q])));
            }
          }
        }
        store_word(dst + i * kPerWord, v);
      }
    } else {
      for (i64 i = threadIdx.x; i < row_len; i += blockDim.x) {
        elem_t v = from_acc(acc_t(0));
        if (token >= 0) {
          v = weights != nullptr ? from_acc(mul_rn(w, to_acc(src[i]))) : src[i];
        }
        dst[i] = v;
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(128)
    sr_combine_rows(const elem_t* rows, i64 num_rows, i64 row_len, const i64* slot_to_row,
                    i64 num_tokens, i64 k, const acc_t* weights, elem_t* out, int vectorized,
                    int* errors) {
  for (i64 t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const i64* slots = slot_to_row + t * k;
    if (threadIdx.x == 0) {
      for (i64 j = 0; j < k; ++j) {
        if (slots[j] >= num_rows) {
          atomicAdd(&errors[SR_ERR_PLAN_INDEX], 1);
        }
      }
    }
    elem_t* dst = out + t * row_len;
    if (vectorized) {
      const i64 words = row_len / kPerWord;
      for (i64 i = threadIdx.x; i < words; i += blockDim.x) {
        acc_t acc[kPerWord];
        bool any = false;
        for (i64 j = 0; j < k; ++j) {
          const i64 r = slots[j];
          if (r < 0 || r >= num_rows) {
            continue;
          }
          const Word v = load_word(rows + r * row_len + i * kPerWord);
          const acc_t w = weights != nullptr ? weights[t * k + j] : acc_t(1);
#pragma unroll
          for (int q = 0; q < kPerWord; ++q) {
            const acc_t term = weights != nullptr ? mul_rn(w, to_acc(v.values[q])) : to_acc(v.values[q]);
            acc[q] = any ? add_rn(acc[q], term) : term;
          }
          any = true;
        }
        Word result;
#pragma unroll
        for (int q = 0; q < kPerWord; ++q) {
          result.values[q] = from_acc(any ? acc[q] : acc_t(0));
        }
        store_word(dst + i * kPerWord, result);
      }
    } else {
      for (i64 i = threadIdx.x; i < row_len; i += blockDim.x) {
        acc_t acc = acc_t(0);
        bool any = false;
        for (i64 j = 0; j < k; ++j) {
          const i64 r = slots[j];
          if (r < 0 || r >= num_rows) {
            continue;
          }
          const acc_t v = to_acc(rows[r * row_len + i]);
          const acc_t term = weights != nullptr ? mul_rn(weights[t * k + j], v) : v;
          acc = any ? add_rn(acc, term) : term;
          any = true;
        }
        dst[i] = from_acc(any ? acc : acc_t(0));
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(256)
    sr_slot_dots(const elem_t* grad_y, const elem_t* rows, i64 num_rows, i64 row_len,
                 const i64* slot_to_row, i64 num_tokens, i64 k, acc_t* out, int* errors) {
  const i64 dot = static_cast<i64>(blockIdx.x) * 32 + (threadIdx.x >> 3);
  const int lane = static_cast<int>(threadIdx.x & 7);
  const bool active = dot < num_tokens * k;
  i64 r = -1;
  if (active) {
    r = slot_to_row[dot];
    if (r >= num_rows) {
      if (lane == 0) {
        atomicAdd(&errors[SR_ERR_PLAN_INDEX], 1);
      }
      r = -1;
    }
  }
  acc_t partial = acc_t(0);
  if (r >= 0) {
    const elem_t* a = grad_y + (dot / k) * row_len;
    const elem_t* b = rows + r * row_len;
    for (i64 i = lane; i < row_len; i += 8) {
      partial = add_rn(partial, mul_rn(to_acc(a[i]), to_acc(b[i])));
    }
  }
  // Every thread of the warp takes part in the shuffles, active or not.
  acc_t sum = acc_t(0);
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    sum = add_rn(sum, __shfl_sync(SR_FULL_MASK, partial, q, 8));
  }
  if (active && lane == 0) {
    out[dot] = r >= 0 ? sum : acc_t(0);
  }
}
