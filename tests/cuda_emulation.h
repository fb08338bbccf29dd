// A host emulation of the CUDA features that sparseroute's kernels use, so that the kernel
// sources themselves (python/sparseroute/cuda/*.cu) can run in the tests on a machine without
// a GPU. See cuda_emulation.py, which compiles a kernel module with this header forced in
// (g++ -include cuda_emulation.h) and launches it from the ops' own Python glue.
//
// Every thread of a block is an OS thread; blocks run one after another, so a `__shared__`
// variable can be a function-local static. Barriers are std::barrier; warp shuffles, votes and
// __match_any_sync exchange values through a per-warp array between two warp barriers. All of
// it requires what CUDA requires of these calls: every lane of the warp (block) takes part.
// Float intrinsics with an explicit rounding mode are plain IEEE operations (the file is
// compiled with -ffp-contract=off); expf / exp come from the host's libm.
//
// This checks the kernels' logic (indexing, reductions, selection order, plan construction,
// argument passing) against the CPU kernels, and, built with ThreadSanitizer
// (test_cuda_races.py), that no two threads touch the same memory unordered by a barrier or
// an atomic. It cannot check timing-dependent behaviour of real hardware (memory-model
// subtleties beyond barriers, occupancy, performance).

#pragma once

#include <math.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define SR_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// 16-byte aligned as in CUDA, where a 16-byte load or store at an address that is not a
// multiple of 16 faults: built with -fsanitize=alignment (test_cuda_memory.py), such an access
// is reported here too.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace sr_emulation {
struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  std::uint64_t slots[32] = {};
};
inline thread_local Warp* warp = nullptr;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local unsigned lane = 0;

template <class T>
inline std::uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= 8);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}
template <class T>
inline T from_bits(std::uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}
// Every lane publishes `value`; returns the value published by lane `source`.
template <class T>
inline T exchange(T value, unsigned source) {
  warp->slots[lane] = to_bits(value);
  warp->barrier.arrive_and_wait();
  const T result = from_bits<T>(warp->slots[source]);
  warp->barrier.arrive_and_wait();
  return result;
}
}  // namespace sr_emulation

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline void __syncthreads() { sr_emulation::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { sr_emulation::warp->barrier.arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
  return sr_emulation::exchange(value, sr_emulation::lane ^ static_cast<unsigned>(lane_mask));
}
template <class T>
inline T __shfl_sync(unsigned, T value, int source, int width = 32) {
  const unsigned base = sr_emulation::lane & ~static_cast<unsigned>(width - 1);
  return sr_emulation::exchange(value, base + (static_cast<unsigned>(source) & static_cast<unsigned>(width - 1)));
}
template <class T>
inline T __shfl_up_sync(unsigned, T value, unsigned delta, int width = 32) {
  const unsigned in_segment = sr_emulation::lane & static_cast<unsigned>(width - 1);
  return sr_emulation::exchange(value, in_segment >= delta ? sr_emulation::lane - delta : sr_emulation::lane);
}
template <class T>
inline unsigned __match_any_sync(unsigned, T value) {
  auto* w = sr_emulation::warp;
  w->slots[sr_emulation::lane] = sr_emulation::to_bits(value);
  w->barrier.arrive_and_wait();
  unsigned peers = 0;
  for (unsigned l = 0; l < 32; ++l) {
    peers |= (w->slots[l] == w->slots[sr_emulation::lane] ? 1u : 0u) << l;
  }
  w->barrier.arrive_and_wait();
  return peers;
}
inline int __any_sync(unsigned, int predicate) {
  auto* w = sr_emulation::warp;
  w->slots[sr_emulation::lane] = predicate != 0;
  w->barrier.arrive_and_wait();
  int any = 0;
  for (unsigned l = 0; l < 32; ++l) {
    any |= static_cast<int>(w->slots[l]);
  }
  w->barrier.arrive_and_wait();
  return any;
}

inline unsigned __ballot_sync(unsigned, int predicate) {
  auto* w = sr_emulation::warp;
  w->slots[sr_emulation::lane] = predicate != 0;
  w->barrier.arrive_and_wait();
  unsigned votes = 0;
  for (unsigned l = 0; l < 32; ++l) {
    votes |= static_cast<unsigned>(w->slots[l] != 0) << l;
  }
  w->barrier.arrive_and_wait();
  return votes;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_add(value);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return std::atomic_ref<unsigned long long>(*address).fetch_add(value);
}
inline int atomicCAS(int* address, int compare, int value) {
  std::atomic_ref<int>(*address).compare_exchange_strong(compare, value);
  return compare;
}
inline int atomicExch(int* address, int value) { return std::atomic_ref<int>(*address).exchange(value); }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __uint_as_float(unsigned x) { return sr_emulation::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(sr_emulation::to_bits(x)); }
inline long long __double_as_longlong(double x) { return static_cast<long long>(sr_emulation::to_bits(x)); }
inline double __longlong_as_double(long long x) { return sr_emulation::from_bits<double>(static_cast<std::uint64_t>(x)); }

// float16 conversions (the GPU uses cvt.f32.f16 / cvt.rn.f16.f32): IEEE, round to nearest even.
inline float sr_emulated_f16_to_f32(unsigned short bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}
inline unsigned short sr_emulated_f32_to_f16(float value) {
  const _Float16 h = static_cast<_Float16>(value);
  unsigned short bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

namespace sr_emulation {

template <class... A, std::size_t... I>
inline void invoke(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::decay_t<A>*>(args[I])...);
}

// Runs `kernel` over `grid` blocks of `block` threads (block: a multiple of 32). The same
// `block` OS threads run every block in turn, all finishing one block before the next starts;
// each block gets fresh barriers (a thread that returns drops out of its block's barriers).
template <class... A>
inline int run(void (*kernel)(A...), unsigned grid, unsigned block, void** args) {
  if (block == 0 || block % 32 != 0 || block > 1024) {
    return -2;
  }
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{block, 1, 1};
  const unsigned warps_per_block = block / 32;
  std::vector<std::unique_ptr<std::barrier<>>> block_barriers;
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned b = 0; b < grid; ++b) {
    block_barriers.push_back(std::make_unique<std::barrier<>>(block));
    for (unsigned w = 0; w < warps_per_block; ++w) {
      warps.push_back(std::make_unique<Warp>(32));
    }
  }
  std::barrier<> between_blocks(block);
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = dim3{t, 1, 1};
      lane = t % 32;
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx = dim3{b, 1, 1};
        warp = warps[b * warps_per_block + t / 32].get();
        block_barrier = block_barriers[b].get();
        invoke(kernel, args, std::index_sequence_for<A...>{});
        warp->barrier.arrive_and_drop();
        block_barrier->arrive_and_drop();
        between_blocks.arrive_and_wait();
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  return 0;
}

}  // namespace sr_emulation
