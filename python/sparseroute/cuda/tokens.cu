// Token selection for conditional computation (Mixture-of-Depths), matching
// rust/core/src/tokens.rs: the same positions, masks and rows bit for bit, the gated scatter
// and the dot products with the same roundings in the same order (add_rn / mul_rn, no fused
// multiply-add).
//
//   sr_token_inverse   inverse[b, p] = the entry c with indices[b, c] = p, -1 where no entry
//                      keeps p. Entries outside [-1, S) are counted and skipped; a position
//                      that two or more entries of one sequence name is marked -2 (kept by
//                      none of them) and every extra entry is counted. The result does not
//                      depend on the order of the threads. 256 threads per block, one per
//                      entry (grid-stride).
//   sr_gather_tokens   out[b, c] = x[b, p] (times scale[b, p], in acc_t, rounded once) for
//                      p = indices[b, c] when inverse[b, p] == c; zeros otherwise (-1,
//                      invalid and repeated entries). One block of 128 threads per output
//                      row (grid-stride over rows), 16-byte words when `vectorized`.
//   sr_scatter_tokens  out[b, p] = base[b, p] (zeros without base) where no entry keeps p;
//                      at a kept position the entry's row of `rows` (zeros without rows), or
//                      base + gate[b, p] * row in acc_t (a product, then a sum, each rounded
//                      once, then one conversion) with a gate. One block of 128 threads per
//                      output row (grid-stride), 16-byte words when `vectorized`.
//   sr_token_dots      out[b, p] = dot(grad[b, p], rows[b, c]) at kept positions, 0
//                      elsewhere: eight threads per dot over fixed lanes, as sr_slot_dots.
//                      32 dots per block of 256 threads.
//   sr_select_tokens   one block per sequence (grid-stride over sequences), of 32 to 1024
//                      threads by the sequence's length. Top C: a radix select (8 bits a
//                      pass, 4 passes for float32 keys, 8 for float64; histograms in shared
//                      memory, added a warp at a time) finds the C-th largest score in acc_t
//                      (-0.0 == 0.0); positions above it are kept, and of those equal to it
//                      the lowest. Each warp then compacts one run of positions in
//                      ascending order (ballots), after one barrier that gives every run its
//                      first entry. Threshold mode keeps the positions whose score, in
//                      float64, is greater than the threshold, the earliest C of them. A
//                      sequence with a NaN score at a valid position, or a length outside
//                      [0, S], is counted and gets -1 entries and an empty mask. With
//                      `kept_scores` it also writes the kept scores (expert choice's gates).

#include "common.cuh"

namespace {

// sr_select_tokens: one block per sequence, of up to 1024 threads (a multiple of 32, chosen by
// the glue for the sequence length: a block walks its whole sequence once per digit).
constexpr int kSelectMaxWarps = 32;
// Keys each thread loads before their histogram adds, so that the loads overlap.
constexpr int kSelectAhead = 4;
constexpr double kFractionRoundingSlack = 1e-9;

// ceil(fraction * length), except that a product within a relative 1e-9 of an integer is
// that integer: rust/core/src/tokens.rs, fraction_count.
__device__ __forceinline__ i64 fraction_count(double fraction, i64 length) {
  const double exact = mul_rn(fraction, static_cast<double>(length));
  const double nearest = round(exact);
  const double distance = fabs(sub_rn(exact, nearest));
  if (distance <= mul_rn(kFractionRoundingSlack, nearest > 1.0 ? nearest : 1.0)) {
    return static_cast<i64>(nearest);
  }
  return static_cast<i64>(ceil(exact));
}

// Keys whose unsigned order is the order of the scores (-0.0 ranks as 0.0; no NaN here).
#if SR_DTYPE == 3
typedef u64 score_key;
__device__ __forceinline__ score_key order_key(double v) {
  u64 u = static_cast<u64>(__double_as_longlong(v));
  if (u == 0x8000000000000000ull) {
    u = 0ull;
  }
  return (u >> 63) != 0ull ? ~u : (u | 0x8000000000000000ull);
}
#else
typedef unsigned score_key;
__device__ __forceinline__ score_key order_key(float v) {
  unsigned u = __float_as_uint(v);
  if (u == 0x80000000u) {
    u = 0u;
  }
  return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
}
#endif

// Adds each lane's key to histogram[bin] (bin < 0: the lane has no key). Lanes with equal
// bins add together, through their lowest lane: the first digit of similar scores puts nearly
// every key in one bin, where one atomic per key would serialise. Every lane takes part.
__device__ __forceinline__ void warp_histogram_add(int* histogram, int bin) {
  const unsigned same = __match_any_sync(SR_FULL_MASK, bin);
  const unsigned lanes_below = (1u << (threadIdx.x & 31u)) - 1u;
  if (bin >= 0 && (same & lanes_below) == 0u) {
    atomicAdd(&histogram[bin], __popc(same));
  }
}

// The bin that holds the `remaining`-th largest key: the bins above it hold fewer keys, with
// it at least `remaining`. Writes the bin, and `remaining` less the keys above it. Run by one
// warp: lane l sums bins 255 - 8l down to 248 - 8l, a scan over the lanes finds the lane whose
// bins cross `remaining` (exactly one: 1 <= remaining <= the keys counted), and that lane walks
// its eight bins. Replaces a walk of one thread over all 256 bins, once per digit.
__device__ __forceinline__ void choose_bin(const int* histogram, i64 remaining, int* chosen_bin,
                                           i64* chosen_remaining) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int top = 255 - 8 * lane;
  i64 own = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    own += histogram[top - i];
  }
  i64 through = own;  // the keys in this lane's bins and in the (higher) bins of lanes before it
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    const i64 before = __shfl_up_sync(SR_FULL_MASK, through, delta);
    if (lane >= delta) {
      through += before;
    }
  }
  i64 above = through - own;
  if (above < remaining && remaining <= through) {
    int bin = top;
    while (bin > top - 7 && above + histogram[bin] < remaining) {
      above += histogram[bin];
      --bin;
    }
    *chosen_bin = bin;
    *chosen_remaining = remaining - above;
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256)
    sr_token_inverse(const i64* indices, i64 batch, i64 seq_len, i64 capacity, int* inverse,
                     int* errors) {
  const i64 entries = batch * capacity;
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < entries; e += stride) {
    const i64 p = indices[e];
    if (p == -1) {
      continue;
    }
    if (p < -1 || p >= seq_len) {
      atomicAdd(&errors[SR_ERR_TOKEN_INDEX], 1);
      continue;
    }
    const i64 b = e / capacity;
    const int c = static_cast<int>(e - b * capacity);
    int* slot = inverse + b * seq_len + p;
    if (atomicCAS(slot, -1, c) != -1) {
      atomicExch(slot, -2);
      atomicAdd(&errors[SR_ERR_TOKEN_INDEX], 1);
    }
  }
}

extern "C" __global__ void __launch_bounds__(128)
    sr_gather_tokens(const elem_t* x, i64 batch, i64 seq_len, i64 row_len, const i64* indices,
                     i64 capacity, const int* inverse, const acc_t* scale, elem_t* out,
                     int vectorized) {
  const i64 num_rows = batch * capacity;
  for (i64 r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const i64 b = r / capacity;
    const i64 c = r - b * capacity;
    const i64 p = indices[r];
    const bool kept = p >= 0 && p < seq_len && inverse[b * seq_len + p] == static_cast<int>(c);
    elem_t* dst = out + r * row_len;
    const i64 source = b * seq_len + (kept ? p : 0);
    const elem_t* src = x + source * row_len;
    const bool scaled = kept && scale != nullptr;
    const acc_t w = scaled ? scale[source] : acc_t(1);
    if (vectorized) {
      for (i64 i = threadIdx.x; i < row_len / kPerWord; i += blockDim.x) {
        Word v = kept ? load_word(src + i * kPerWord) : zero_word();
        if (scaled) {
#pragma unroll
          for (int q = 0; q < kPerWord; ++q) {
            v.values[q] = from_acc(mul_rn(w, to_acc(v.values[q])));
          }
        }
        store_word(dst + i * kPerWord, v);
      }
      continue;
    }
    for (i64 i = threadIdx.x; i < row_len; i += blockDim.x) {
      elem_t v = from_acc(acc_t(0));
      if (kept) {
        v = scaled ? from_acc(mul_rn(w, to_acc(src[i]))) : src[i];
      }
      dst[i] = v;
    }
  }
}

// One element of a scattered row: `base` where no entry keeps the position (zeros without
// base), else the entry's row (zeros without rows), or base + gate * row with a gate. It
// takes the two elements by value (a zero where there is none to read) so that a row's
// 16-byte words stay in registers: taking a word's address would put it in local memory.
struct ScatterRow {
  const elem_t* base;  // the base row to read (nullptr: none, read as zeros)
  const elem_t* row;   // the entry's row of rows; nullptr without an entry or rows
  bool kept;
  bool gated;
  acc_t gate;

  __device__ __forceinline__ elem_t at(elem_t b, elem_t y) const {
    if (!kept || !gated) {
      return kept ? y : b;
    }
    const acc_t product = mul_rn(gate, to_acc(y));
    // Without a base the product alone: adding a zero would turn -0.0 into +0.0.
    return from_acc(base != nullptr ? add_rn(to_acc(b), product) : product);
  }
};

extern "C" __global__ void __launch_bounds__(128)
    sr_scatter_tokens(const elem_t* base, const elem_t* rows, i64 batch, i64 seq_len,
                      i64 row_len, i64 capacity, const int* inverse, const acc_t* gate,
                      elem_t* out, int vectorized) {
  const i64 num_rows = batch * seq_len;
  const elem_t zero = from_acc(acc_t(0));
  for (i64 r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int entry = inverse[r];
    elem_t* dst = out + r * row_len;
    ScatterRow s;
    s.kept = entry >= 0;
    s.row = s.kept && rows != nullptr ? rows + ((r / seq_len) * capacity + entry) * row_len : nullptr;
    s.gated = s.row != nullptr && gate != nullptr;
    s.gate = s.gated ? gate[r] : acc_t(0);
    // The base is read where no entry keeps the position, or under a gate.
    s.base = base != nullptr && (!s.kept || s.gated) ? base + r * row_len : nullptr;
    if (vectorized) {
      for (i64 i = threadIdx.x; i < row_len / kPerWord; i += blockDim.x) {
        const i64 at = i * kPerWord;
        const Word b = s.base != nullptr ? load_word(s.base + at) : zero_word();
        const Word y = s.row != nullptr ? load_word(s.row + at) : zero_word();
        Word v;
#pragma unroll
        for (int q = 0; q < kPerWord; ++q) {
          v.values[q] = s.at(b.values[q], y.values[q]);
        }
        store_word(dst + at, v);
      }
      continue;
    }
    for (i64 i = threadIdx.x; i < row_len; i += blockDim.x) {
      dst[i] = s.at(s.base != nullptr ? s.base[i] : zero, s.row != nullptr ? s.row[i] : zero);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256)
    sr_token_dots(const elem_t* grad, const elem_t* rows, i64 batch, i64 seq_len, i64 row_len,
                  i64 capacity, const int* inverse, acc_t* out) {
  const i64 dot = static_cast<i64>(blockIdx.x) * 32 + (threadIdx.x >> 3);
  const int lane = static_cast<int>(threadIdx.x & 7);
  const bool active = dot < batch * seq_len;
  const int entry = active ? inverse[dot] : -1;
  acc_t partial = acc_t(0);
  if (entry >= 0) {
    const elem_t* a = grad + dot * row_len;
    const elem_t* b = rows + ((dot / seq_len) * capacity + entry) * row_len;
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
    out[dot] = entry >= 0 ? sum : acc_t(0);
  }
}

// rule: 0 top C, 1 a fraction (`value`) of each length (at most C), 2 threshold (`value`).
// `mask` and `kept_scores` may be null; `kept_scores[b, c]` is the score at indices[b, c]
// (0 where the entry is -1).
extern "C" __global__ void __launch_bounds__(1024)
    sr_select_tokens(const elem_t* scores, i64 batch, i64 seq_len, i64 capacity,
                     const i64* lengths, int rule, double value, i64* indices,
                     unsigned char* mask, elem_t* kept_scores, int* errors) {
  __shared__ int invalid;
  __shared__ int histogram[256];
  __shared__ int chosen_bin;
  __shared__ i64 chosen_remaining;
  __shared__ int warp_flags[kSelectMaxWarps];
  __shared__ int warp_equals[kSelectMaxWarps];
  const i64 threads = blockDim.x;
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const unsigned lane = threadIdx.x & 31u;
  const unsigned lanes_below = (1u << lane) - 1u;
  // The compaction gives each warp one run of positions, whole steps of 32.
  const i64 run = (seq_len + threads - 1) / threads * 32;
  const i64 run_start = warp * run < seq_len ? warp * run : seq_len;
  const i64 run_end = run_start + run < seq_len ? run_start + run : seq_len;
  for (i64 b = blockIdx.x; b < batch; b += gridDim.x) {
    const elem_t* row = scores + b * seq_len;
    const i64 length = lengths != nullptr ? lengths[b] : seq_len;
    const bool bad_length = length < 0 || length > seq_len;
    if (threadIdx.x == 0) {
      invalid = bad_length ? 1 : 0;
    }
    __syncthreads();
    if (!bad_length) {
      for (i64 p = threadIdx.x; p < length; p += threads) {
        const acc_t s = to_acc(row[p]);
        if (s != s) {
          invalid = 1;
        }
      }
    }
    __syncthreads();
    const bool skip = invalid != 0;
    __syncthreads();  // every thread has read `invalid` before the next sequence resets it
    i64* entries = indices + b * capacity;
    unsigned char* kept_mask = mask != nullptr ? mask + b * seq_len : nullptr;
    elem_t* entry_scores = kept_scores != nullptr ? kept_scores + b * capacity : nullptr;
    for (i64 c = threadIdx.x; c < capacity; c += threads) {
      entries[c] = -1;
      if (entry_scores != nullptr) {
        entry_scores[c] = from_acc(acc_t(0));
      }
    }
    if (skip) {
      if (threadIdx.x == 0) {
        atomicAdd(&errors[SR_ERR_TOKEN_SCORES], 1);
      }
      for (i64 p = threadIdx.x; kept_mask != nullptr && p < seq_len; p += threads) {
        kept_mask[p] = 0;
      }
      continue;
    }
    i64 count = capacity;
    if (rule == 0) {
      count = capacity < length ? capacity : length;
    } else if (rule == 1) {
      const i64 wanted = fraction_count(value, length);
      count = wanted < capacity ? wanted : capacity;
    }
    // Top C: the count-th largest key, found digit by digit from the top (radix select);
    // keys above it are kept, and of the keys equal to it the `equal_kept` lowest positions.
    const bool ranked = rule != 2 && count > 0 && count < length;
    score_key threshold_key = 0;
    i64 equal_kept = 0;
    if (ranked) {
      score_key prefix = 0;
      score_key prefix_mask = 0;
      i64 remaining = count;
      for (int shift = static_cast<int>(sizeof(score_key)) * 8 - 8; shift >= 0; shift -= 8) {
        for (i64 i = threadIdx.x; i < 256; i += threads) {
          histogram[i] = 0;
        }
        __syncthreads();
        // Every lane runs the same steps (the warp adds together); positions past the
        // length add nothing.
        for (i64 start = 0; start < length; start += threads * kSelectAhead) {
          score_key keys[kSelectAhead];
#pragma unroll
          for (int u = 0; u < kSelectAhead; ++u) {
            const i64 p = start + u * threads + threadIdx.x;
            keys[u] = p < length ? order_key(to_acc(row[p])) : score_key(0);
          }
#pragma unroll
          for (int u = 0; u < kSelectAhead; ++u) {
            const i64 p = start + u * threads + threadIdx.x;
            const bool counted = p < length && (keys[u] & prefix_mask) == prefix;
            warp_histogram_add(histogram, counted ? static_cast<int>((keys[u] >> shift) & 255u) : -1);
          }
        }
        __syncthreads();
        if (warp == 0) {
          choose_bin(histogram, remaining, &chosen_bin, &chosen_remaining);
        }
        __syncthreads();  // the next digit clears the histogram only after this barrier
        prefix |= static_cast<score_key>(chosen_bin) << shift;
        prefix_mask |= static_cast<score_key>(255u) << shift;
        remaining = chosen_remaining;
      }
      threshold_key = prefix;
      equal_kept = remaining;
    }
    // Whether position p is kept outright (`flag`) or ties with the threshold (`equal`).
    auto classify = [&](i64 p, bool& flag, bool& equal) {
      flag = false;
      equal = false;
      if (p < length) {
        const acc_t s = to_acc(row[p]);
        if (rule == 2) {
          flag = static_cast<double>(s) > value;
        } else if (ranked) {
          const score_key key = order_key(s);
          flag = key > threshold_key;
          equal = key == threshold_key;
        } else {
          flag = count > 0;  // count == length: every valid position
        }
      }
    };
    // The compaction, in two walks of each warp's run: first the run's counts, which a scan
    // over the warps turns into where each run's entries start; then the entries themselves,
    // in ascending order.
    int run_flags = 0;
    int run_equals = 0;
    for (i64 base = run_start; base < run_end; base += 32) {
      bool flag;
      bool equal;
      classify(base + lane, flag, equal);
      run_flags += __popc(__ballot_sync(SR_FULL_MASK, flag ? 1 : 0));
      run_equals += __popc(__ballot_sync(SR_FULL_MASK, equal ? 1 : 0));
    }
    if (lane == 0) {
      warp_flags[warp] = run_flags;
      warp_equals[warp] = run_equals;
    }
    __syncthreads();  // also: the -1 fill lands before the kept entries overwrite it
    i64 flags_before = 0;
    i64 equals_before = 0;
    for (int w = 0; w < warp; ++w) {
      flags_before += warp_flags[w];
      equals_before += warp_equals[w];
    }
    i64 kept_before = flags_before + (equals_before < equal_kept ? equals_before : equal_kept);
    for (i64 base = run_start; base < run_end; base += 32) {
      const i64 p = base + lane;
      bool flag;
      bool equal;
      classify(p, flag, equal);
      if (ranked) {
        const unsigned equal_votes = __ballot_sync(SR_FULL_MASK, equal ? 1 : 0);
        flag = flag || (equal && equals_before + __popc(equal_votes & lanes_below) < equal_kept);
        equals_before += __popc(equal_votes);
      }
      const unsigned votes = __ballot_sync(SR_FULL_MASK, flag ? 1 : 0);
      const i64 position = kept_before + __popc(votes & lanes_below);
      const bool keep = flag && position < count;
      if (kept_mask != nullptr && p < seq_len) {
        kept_mask[p] = keep ? 1 : 0;
      }
      if (keep) {
        entries[position] = p;
        if (entry_scores != nullptr) {
          entry_scores[position] = row[p];
        }
      }
      kept_before += __popc(votes);
    }
    __syncthreads();  // every warp has read warp_flags before the next sequence writes them
  }
}
