// Shared definitions of sparseroute's CUDA kernels.
//
// The kernels are compiled at run time by NVRTC (see sparseroute/_cuda.py), once per device
// and element type. They include no CUDA headers: the element type is chosen with
// -DSR_DTYPE=<code> and float16 / bfloat16 values are handled as their 16-bit patterns, with
// explicit round-to-nearest-even conversions (the conversions torch and the Rust core use).
//
// Arithmetic that must match the Rust core bit for bit (the combine, the weighted gather, the
// slot dot products) goes through add_rn / mul_rn: one rounding per operation, never a fused
// multiply-add. The loader also compiles with --fmad=false and without flush-to-zero, so
// subnormal values survive as they do on the CPU.

#pragma once

typedef long long i64;
typedef unsigned long long u64;

#define SR_FULL_MASK 0xffffffffu

// ---- the element type of the tensors a module reads and writes ----------------------------

#if defined(SR_DTYPE)

__device__ __forceinline__ float sr_bf16_to_f32(unsigned short bits) {
  return __uint_as_float(static_cast<unsigned int>(bits) << 16);
}

// Round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ unsigned short sr_f32_to_bf16(float value) {
  unsigned int u = __float_as_uint(value);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<unsigned short>((u >> 16) | 0x40u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<unsigned short>(u >> 16);
}

#if defined(SR_HOST_EMULATION)  // tests/cuda_emulation.h: the same IEEE conversions on the host
__device__ __forceinline__ float sr_f16_to_f32(unsigned short bits) { return sr_emulated_f16_to_f32(bits); }
__device__ __forceinline__ unsigned short sr_f32_to_f16(float value) { return sr_emulated_f32_to_f16(value); }
#else
__device__ __forceinline__ float sr_f16_to_f32(unsigned short bits) {
  float value;
  asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
  return value;
}

__device__ __forceinline__ unsigned short sr_f32_to_f16(float value) {
  unsigned short bits;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
  return bits;
}
#endif

#if SR_DTYPE == 0  // float32
typedef float elem_t;
typedef float acc_t;
__device__ __forceinline__ acc_t to_acc(elem_t v) { return v; }
__device__ __forceinline__ elem_t from_acc(acc_t v) { return v; }
#elif SR_DTYPE == 1  // float16, as its bits
typedef unsigned short elem_t;
typedef float acc_t;
__device__ __forceinline__ acc_t to_acc(elem_t v) { return sr_f16_to_f32(v); }
__device__ __forceinline__ elem_t from_acc(acc_t v) { return sr_f32_to_f16(v); }
#elif SR_DTYPE == 2  // bfloat16, as its bits
typedef unsigned short elem_t;
typedef float acc_t;
__device__ __forceinline__ acc_t to_acc(elem_t v) { return sr_bf16_to_f32(v); }
__device__ __forceinline__ elem_t from_acc(acc_t v) { return sr_f32_to_bf16(v); }
#elif SR_DTYPE == 3  // float64 (gradient checks)
typedef double elem_t;
typedef double acc_t;
__device__ __forceinline__ acc_t to_acc(elem_t v) { return v; }
__device__ __forceinline__ elem_t from_acc(acc_t v) { return v; }
#else
#error "SR_DTYPE must be 0 (float32), 1 (float16), 2 (bfloat16) or 3 (float64)"
#endif

#endif  // SR_DTYPE

// ---- accumulator arithmetic: one rounding per operation ------------------------------------

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// The range reduction of sr_fast_exp and sr_fma_exp (rust/core/src/element.rs: EXP_MAGIC,
// LN2_HI, LN2_LO).
constexpr float kExpMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kLog2e = 1.44269504088896340735992468100189214f;
constexpr float kLn2Hi = 0.6933594f;
constexpr float kLn2Lo = -2.1219444e-4f;
// The clamp (EXP_LOWEST, EXP_HIGHEST): e^x rounds to 0 below, overflows above.
constexpr float kExpLowest = -104.0f;
constexpr float kExpHighest = 89.0f;

// y 2^n for n in [-150, 128] as (y 2^(n - n/2)) 2^(n/2) (exp_scale in element.rs): the
// first product is exact, the second rounds once, to a subnormal (kept: --ftz=false), 0 or
// inf where the result leaves the normal range.
__device__ __forceinline__ float sr_exp_scale(float y, int n) {
  const int low = n >> 1;
  const int high = n - low;
  const float y_high = __fmul_rn(y, __uint_as_float(static_cast<unsigned int>(high + 127) << 23));
  return __fmul_rn(y_high, __uint_as_float(static_cast<unsigned int>(low + 127) << 23));
}

// The CPU's float32 exp (rust/core/src/element.rs, fast_exp_f32): a degree-6 polynomial on
// x - n ln 2 scaled by 2^n, within 2 ulp of exp (one step where that is subnormal). Each
// step rounded once, as on the CPU, so kernels that use it (top-p, expert choice) compute
// the CPU's bits. float64 uses exp on both sides (within 1 ulp of each other, not always
// equal).
__device__ __forceinline__ float sr_fast_exp(float x) {
  x = x < kExpLowest ? kExpLowest : x;
  x = x > kExpHighest ? kExpHighest : x;
  const float t = __fadd_rn(__fmul_rn(x, kLog2e), kExpMagic);
  const float n = __fsub_rn(t, kExpMagic);
  const int exponent = static_cast<int>(__float_as_uint(t) - __float_as_uint(kExpMagic));
  const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, kLn2Hi)), __fmul_rn(n, kLn2Lo));
  float p = 1.9875691e-4f;
  p = __fadd_rn(__fmul_rn(p, r), 1.3982e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
  p = __fadd_rn(__fmul_rn(p, r), 0.16666665f);
  p = __fadd_rn(__fmul_rn(p, r), 0.5f);
  const float y = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
  return sr_exp_scale(y, exponent);
}
// The CPU's fused float32 exp (rust/core/src/element.rs, fma_exp_f32): sr_fast_exp's clamp
// and range reduction, a degree-5 polynomial, in fused multiply-adds (each rounded once, as
// on the CPU), within 2 ulp of exp. Sinkhorn's cost uses it: the CPU's bits in 13 operations
// instead of 21.
__device__ __forceinline__ float sr_fma_exp(float x) {
  x = x < kExpLowest ? kExpLowest : x;
  x = x > kExpHighest ? kExpHighest : x;
  const float t = __fmaf_rn(x, kLog2e, kExpMagic);
  const float n = __fsub_rn(t, kExpMagic);
  const int exponent = static_cast<int>(__float_as_uint(t) - __float_as_uint(kExpMagic));
  float r = __fmaf_rn(n, -kLn2Hi, x);
  r = __fmaf_rn(n, -kLn2Lo, r);
  float p = 1.381454e-3f;
  p = __fmaf_rn(p, r, 8.368745e-3f);
  p = __fmaf_rn(p, r, 4.166839e-2f);
  p = __fmaf_rn(p, r, 0.16666521f);
  p = __fmaf_rn(p, r, 0.49999994f);
  const float y = __fmaf_rn(r, __fmaf_rn(p, r, 1.0f), 1.0f);
  return sr_exp_scale(y, exponent);
}
__device__ __forceinline__ float fast_exp_acc(float x) { return sr_fast_exp(x); }
__device__ __forceinline__ double fast_exp_acc(double x) { return exp(x); }

__device__ __forceinline__ bool is_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool is_finite(double x) {
  return (static_cast<u64>(__double_as_longlong(x)) & 0x7ff0000000000000ull) !=
         0x7ff0000000000000ull;
}

template <class T>
__device__ __forceinline__ T neg_infinity();
template <>
__device__ __forceinline__ float neg_infinity<float>() {
  return __uint_as_float(0xff800000u);
}
template <>
__device__ __forceinline__ double neg_infinity<double>() {
  return __longlong_as_double(static_cast<i64>(0xfff0000000000000ull));
}

// ---- error counters -------------------------------------------------------------------------
// A torch-allocated int32 buffer per device (sparseroute._cuda.error_counters): kernels count
// invalid inputs here instead of raising, so that no op has to synchronise with the host.
// sparseroute.check_cuda_errors() reads and clears it.

#define SR_ERR_NON_FINITE_LOGITS 0
#define SR_ERR_EXPERT_ID 1
#define SR_ERR_PLAN_INDEX 2
#define SR_ERR_NUM_ROWS 3
#define SR_ERR_TOKEN_INDEX 4
#define SR_ERR_TOKEN_SCORES 5
#define SR_ERR_DROP_WEIGHTS 6
#define SR_ERR_SINKHORN_LOGITS 7

// ---- a team of NT threads working on one item: a warp (NT = 32) or a whole block -----------
// Reductions give every thread of the team the same bits: the xor butterfly combines the
// same two partial values on both partners (the operations are commutative), and the
// cross-warp step combines the warp results in warp order.

template <int NT>
__device__ __forceinline__ void team_sync() {
  if constexpr (NT == 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

struct MaxOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b > a ? b : a; }
};
struct SumOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return add_rn(a, b); }
};
struct MinIntOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return b < a ? b : a; }
};

// `scratch` holds NT / 32 values in shared memory (unused when NT == 32).
template <int NT, class T, class Op>
__device__ __forceinline__ T team_reduce(T value, Op op, T* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = op(value, __shfl_xor_sync(SR_FULL_MASK, value, offset));
  }
  if constexpr (NT > 32) {
    __syncthreads();  // earlier readers of scratch are done
    if ((threadIdx.x & 31) == 0) {
      scratch[threadIdx.x >> 5] = value;
    }
    __syncthreads();
    value = scratch[0];
#pragma unroll
    for (int w = 1; w < NT / 32; ++w) {
      value = op(value, scratch[w]);
    }
  }
  return value;
}

// (key, index) pairs in selection order: a higher key first, equal keys the lower index first.
template <class K>
__device__ __forceinline__ bool pair_before(K key, int index, K other_key, int other_index) {
  return key > other_key || (key == other_key && index < other_index);
}

// The first pair (in selection order) over the team; every thread gets it.
template <int NT, class K>
__device__ __forceinline__ void team_best_pair(K& key, int& index, K* key_scratch, int* index_scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const K other_key = __shfl_xor_sync(SR_FULL_MASK, key, offset);
    const int other_index = __shfl_xor_sync(SR_FULL_MASK, index, offset);
    if (pair_before(other_key, other_index, key, index)) {
      key = other_key;
      index = other_index;
    }
  }
  if constexpr (NT > 32) {
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
      key_scratch[threadIdx.x >> 5] = key;
      index_scratch[threadIdx.x >> 5] = index;
    }
    __syncthreads();
    key = key_scratch[0];
    index = index_scratch[0];
#pragma unroll
    for (int w = 1; w < NT / 32; ++w) {
      if (pair_before(key_scratch[w], index_scratch[w], key, index)) {
        key = key_scratch[w];
        index = index_scratch[w];
      }
    }
  }
}

// ---- rows as 16-byte words ------------------------------------------------------------------
// The row kernels move a row as 16-byte words when its length in bytes and the base pointers
// are multiples of 16 (the glue's `vectorized` argument), element by element otherwise.
#if defined(SR_DTYPE)
constexpr int kPerWord = 16 / static_cast<int>(sizeof(elem_t));

union Word {
  uint4 bits;
  elem_t values[kPerWord];
};

__device__ __forceinline__ Word load_word(const elem_t* p) {
  Word w;
  w.bits = *reinterpret_cast<const uint4*>(p);
  return w;
}

__device__ __forceinline__ void store_word(elem_t* p, const Word& w) {
  *reinterpret_cast<uint4*>(p) = w.bits;
}

// A word of zeros: +0 in every element type.
__device__ __forceinline__ Word zero_word() {
  Word w;
  w.bits = make_uint4(0u, 0u, 0u, 0u);
  return w;
}
#endif

// ---- the CPU's softmax statistics of one row, for a warp ------------------------------------
// rust/core/src/gating/mod.rs (softmax_row) sums exp(l - max) in eight lanes, lane j adding
// experts j, j + 8, j + 16, ... in order, then adds the lanes 0 to 7 in order. Lanes 0-7 of
// the warp do exactly that, so that probabilities computed as fast_exp_acc(l - max) / sum
// are the CPU's bits. Returns the sum to every lane; `row_max` must be the row's maximum.
#if defined(SR_DTYPE)
// Whether every logit of the row is finite, and the row's maximum in `row_max`; every lane
// of the warp gets both (the maximum means nothing when the row is not finite).
__device__ __forceinline__ bool warp_finite_row_max(const elem_t* row, int num_experts, int lane,
                                                    acc_t& row_max) {
  int finite = 1;
  acc_t lane_max = neg_infinity<acc_t>();
  for (int e = lane; e < num_experts; e += 32) {
    const acc_t v = to_acc(row[e]);
    finite &= is_finite(v) ? 1 : 0;
    lane_max = v > lane_max ? v : lane_max;
  }
  row_max = team_reduce<32>(lane_max, MaxOp(), static_cast<acc_t*>(nullptr));
  return team_reduce<32>(finite, MinIntOp(), static_cast<int*>(nullptr)) != 0;
}

__device__ __forceinline__ acc_t warp_lane_softmax_sum(const elem_t* row, int num_experts, acc_t row_max,
                                                       int lane) {
  acc_t lane_sum = acc_t(0);
  if (lane < 8) {
    for (int e = lane; e < num_experts; e += 8) {
      lane_sum = add_rn(lane_sum, fast_exp_acc(sub_rn(to_acc(row[e]), row_max)));
    }
  }
  acc_t total = acc_t(0);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    total = add_rn(total, __shfl_sync(SR_FULL_MASK, lane_sum, j));
  }
  return total;
}
#endif
