// The dropless permutation plan on the GPU: the same plan as rust/core/src/dispatch.rs
// (build_plan), which is unique: rows in expert-major order, within an expert ascending slot
// index. Integer counting only, so the plan is identical to the CPU's, bit for bit.
//
// The S = T * k slots are cut into consecutive chunks, one warp per chunk:
//   sr_plan_count    per-chunk histograms, counts[c, e] (an int64 workspace; each warp zeroes
//                    its chunk's row first)
//   sr_plan_totals   tokens_per_expert[e] = sum over chunks of counts[c, e] (a warp per expert)
//   sr_plan_scan     offsets = exclusive prefix sums of tokens_per_expert, each rounded up to
//                    whole blocks of block_size rows (1: as they are; one block)
//   sr_plan_cursors  counts[c, e] becomes the first row of chunk c's slots of expert e (a warp
//                    per expert, scanning over the chunks); it also writes the -1 of the rows
//                    that hold no slot (padding, and past the plan) and the dropless plan's
//                    zero drop counts, so that no output needs a fill before the plan
//   sr_plan_scatter  each warp walks its chunk in slot order, 32 slots at a time; slots of the
//                    same expert in a step are ranked by lane (__match_any_sync), so the row
//                    of a slot is its expert's cursor plus its rank: a stable counting sort.
// Small plans (few slots, few experts) take all five steps in one block, sr_plan_small, with
// the workspace in shared memory: one launch instead of five, which is most of their time.
// No atomics decide an order anywhere; each chunk's row of the workspace belongs to one warp.
//
// A warp reads its chunk's ids SR_PLAN_BATCH steps at a time, every load of the batch in
// flight at once: each step's work is a few instructions, so a walk that waited for one
// step's load before the next paid one memory latency per 32 slots, most of a plan's time.
//
// Invalid expert ids (not -1 and outside [0, E)) are treated as empty slots and counted in the
// error buffer; so are slots that do not fit in num_rows rows (their slot_to_row is -1).

#include "common.cuh"

#define SR_PLAN_BATCH 8

// Slot s goes to `row` (-1: nowhere): both maps record it. A row past num_rows leaves the
// slot unrouted and sets `overflow` (the caller counts it as SR_ERR_NUM_ROWS).
__device__ __forceinline__ void place_slot(i64 s, i64 row, i64 num_rows, i64* row_to_slot, i64* slot_to_row,
                                           int& overflow) {
  if (row >= num_rows) {
    overflow = 1;
    row = -1;
  }
  slot_to_row[s] = row;
  if (row >= 0) {
    row_to_slot[row] = s;
  }
}

// The expert ids of this lane's slots base + 32 * j + lane (j < SR_PLAN_BATCH) of a chunk
// that ends at `end`: -1 past it, and -1 for an invalid id. Returns the number of invalid ids
// among this lane's slots (no warp-wide step: only the count pass needs the number).
__device__ __forceinline__ int load_batch(const i64* experts, i64 base, i64 end, int num_experts, int lane,
                                          int (&ids)[SR_PLAN_BATCH]) {
  i64 raw[SR_PLAN_BATCH];
#pragma unroll
  for (int j = 0; j < SR_PLAN_BATCH; ++j) {
    const i64 s = base + 32 * j + lane;
    raw[j] = s < end ? experts[s] : -1;
  }
  int invalid = 0;
#pragma unroll
  for (int j = 0; j < SR_PLAN_BATCH; ++j) {
    const bool bad = raw[j] < -1 || raw[j] >= num_experts;
    invalid += bad ? 1 : 0;
    ids[j] = bad ? -1 : static_cast<int>(raw[j]);
  }
  return invalid;
}

// One warp's histogram of slots [begin, end) into mine[0, E), which it zeroes first; returns
// the number of invalid ids among them (every lane gets the answer).
__device__ __forceinline__ int warp_count_chunk(const i64* experts, i64 begin, i64 end, int num_experts, int lane,
                                                i64* mine) {
  for (int e = lane; e < num_experts; e += 32) {
    mine[e] = 0;
  }
  __syncwarp();
  int invalid = 0;
  for (i64 base = begin; base < end; base += 32 * SR_PLAN_BATCH) {
    int ids[SR_PLAN_BATCH];
    invalid += load_batch(experts, base, end, num_experts, lane, ids);
#pragma unroll
    for (int j = 0; j < SR_PLAN_BATCH; ++j) {
      if (base + 32 * j >= end) {
        break;  // the same for every lane
      }
      const int e = ids[j];
      const unsigned peers = __match_any_sync(SR_FULL_MASK, e);
      if (e >= 0 && lane == __ffs(peers) - 1) {
        mine[e] += __popc(peers);
      }
      __syncwarp();
    }
  }
  // The lanes' counts summed by a butterfly: every lane gets the total.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    invalid += __shfl_xor_sync(SR_FULL_MASK, invalid, offset);
  }
  return invalid;
}

// One warp places slots [begin, end) in slot order from the cursors mine[0, E) (the first row
// of each expert's slots in this chunk), advancing them; returns the number of slots that did
// not fit in num_rows rows (every lane gets the answer).
__device__ __forceinline__ int warp_scatter_chunk(const i64* experts, i64 begin, i64 end, int num_experts, int lane,
                                                  i64* mine, i64 num_rows, i64* row_to_slot, i64* slot_to_row) {
  const unsigned lanes_below = (1u << lane) - 1u;
  int overflowed = 0;
  for (i64 base = begin; base < end; base += 32 * SR_PLAN_BATCH) {
    int ids[SR_PLAN_BATCH];
    load_batch(experts, base, end, num_experts, lane, ids);  // the count pass counted the invalid
#pragma unroll
    for (int j = 0; j < SR_PLAN_BATCH; ++j) {
      if (base + 32 * j >= end) {
        break;  // the same for every lane
      }
      const i64 s = base + 32 * j + lane;
      const int e = ids[j];
      const unsigned peers = __match_any_sync(SR_FULL_MASK, e);
      i64 row = -1;
      if (e >= 0) {
        row = mine[e] + __popc(peers & lanes_below);
      }
      __syncwarp();  // every peer has read the cursor
      if (e >= 0 && lane == __ffs(peers) - 1) {
        mine[e] += __popc(peers);
      }
      int overflow = 0;
      if (s < end) {
        place_slot(s, row, num_rows, row_to_slot, slot_to_row, overflow);
      }
      overflowed += __popc(__ballot_sync(SR_FULL_MASK, overflow));
      __syncwarp();  // the cursor update is visible to the next step
    }
  }
  return overflowed;
}

// Slots [begin, end) of chunk c (empty for a chunk past the slots).
__device__ __forceinline__ void chunk_bounds(i64 c, i64 chunk, i64 num_slots, i64& begin, i64& end) {
  begin = c * chunk < num_slots ? c * chunk : num_slots;
  end = begin + chunk < num_slots ? begin + chunk : num_slots;
}

// Inclusive prefix sums over the lanes of a warp.
__device__ __forceinline__ i64 warp_inclusive_sum(i64 value, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const i64 other = __shfl_up_sync(SR_FULL_MASK, value, offset);
    value += lane >= offset ? other : 0;
  }
  return value;
}

// One warp walks column e of the [num_chunks, E] counts, 32 chunks at a time. With
// `to_cursors`, counts[c, e] becomes the first row of chunk c's slots of e, counted from
// `first`, the expert's first row (otherwise the column is only summed). Returns the expert's
// total (every lane gets it).
__device__ __forceinline__ i64 warp_expert_column(i64* counts, i64 num_chunks, int num_experts, int e, int lane,
                                                  bool to_cursors, i64 first) {
  i64 before = first;
  i64 total = 0;
  for (i64 base = 0; base < num_chunks; base += 32) {
    const i64 c = base + lane;
    const i64 n = c < num_chunks ? counts[c * num_experts + e] : 0;
    const i64 inclusive = warp_inclusive_sum(n, lane);
    if (to_cursors && c < num_chunks) {
      counts[c * num_experts + e] = before + inclusive - n;
    }
    const i64 step = __shfl_sync(SR_FULL_MASK, inclusive, 31);
    before += step;
    total += step;
  }
  return total;
}

// The rows of expert e that hold no slot, [start + tokens, min(end, num_rows)) (its padding up
// to whole blocks), get -1; the warp's lanes take every 32nd.
__device__ __forceinline__ void fill_padding(i64 start, i64 tokens, i64 end, i64 num_rows, int lane,
                                             i64* row_to_slot) {
  end = end < num_rows ? end : num_rows;
  for (i64 row = start + tokens + lane; row < end; row += 32) {
    row_to_slot[row] = -1;
  }
}

extern "C" __global__ void __launch_bounds__(128)
    sr_plan_count(const i64* experts, i64 num_slots, int num_experts, i64 chunk, i64 num_chunks,
                  i64* counts, int* errors) {
  const i64 c = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (c >= num_chunks) {
    return;
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  i64 begin;
  i64 end;
  chunk_bounds(c, chunk, num_slots, begin, end);
  const int invalid =
      warp_count_chunk(experts, begin, end, num_experts, lane, counts + c * static_cast<i64>(num_experts));
  if (invalid && lane == 0) {
    atomicAdd(&errors[SR_ERR_EXPERT_ID], invalid);
  }
}

// A warp per expert (eight per block).
extern "C" __global__ void __launch_bounds__(256)
    sr_plan_totals(i64* counts, i64 num_chunks, int num_experts, i64* tokens_per_expert) {
  const i64 e = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (e >= num_experts) {
    return;
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const i64 total = warp_expert_column(counts, num_chunks, num_experts, static_cast<int>(e), lane, false, 0);
  if (lane == 0) {
    tokens_per_expert[e] = total;
  }
}

// An expert's rows: its count of slots rounded up to whole blocks of block_size rows.
__device__ __forceinline__ i64 whole_blocks(i64 count, i64 block_size) {
  return (count + block_size - 1) / block_size * block_size;
}

// offsets = exclusive prefix sums of tokens_per_expert, each rounded up to whole blocks of
// block_size rows, by one block of 1024 threads: tiles of 1024 experts, scanned with warp
// shuffles.
__device__ __forceinline__ void block_scan_offsets(const i64* tokens_per_expert, int num_experts, i64 block_size,
                                                   i64* offsets) {
  __shared__ i64 warp_totals[32];
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  i64 carry = 0;
  for (int base = 0; base < num_experts; base += 1024) {
    const int e = base + static_cast<int>(threadIdx.x);
    const i64 count = e < num_experts ? whole_blocks(tokens_per_expert[e], block_size) : 0;
    const i64 inclusive = warp_inclusive_sum(count, lane);
    if (lane == 31) {
      warp_totals[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0) {
      warp_totals[lane] = warp_inclusive_sum(warp_totals[lane], lane);
    }
    __syncthreads();
    const i64 before_warp = warp > 0 ? warp_totals[warp - 1] : 0;
    if (e < num_experts) {
      offsets[e] = carry + before_warp + inclusive - count;
    }
    carry += warp_totals[31];
    __syncthreads();  // warp_totals is rewritten by the next tile
  }
  if (threadIdx.x == 0) {
    offsets[num_experts] = carry;
  }
}

extern "C" __global__ void __launch_bounds__(1024)
    sr_plan_scan(const i64* tokens_per_expert, int num_experts, i64 block_size, i64* offsets) {
  block_scan_offsets(tokens_per_expert, num_experts, block_size, offsets);
}

// A warp per expert (eight per block) turns its column of counts into cursors and writes its
// padding rows' -1 and its zero drop count (null `dropped`: none); every thread of the grid
// takes a share of the rows past the plan, [offsets[E], num_rows).
extern "C" __global__ void __launch_bounds__(256)
    sr_plan_cursors(i64* counts, i64 num_chunks, int num_experts, const i64* tokens_per_expert,
                    const i64* offsets, i64 num_rows, i64* row_to_slot, i64* dropped) {
  const i64 thread = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  const i64 threads = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 row = offsets[num_experts] + thread; row < num_rows; row += threads) {
    row_to_slot[row] = -1;
  }
  const i64 e = thread >> 5;
  if (e >= num_experts) {
    return;
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  warp_expert_column(counts, num_chunks, num_experts, static_cast<int>(e), lane, true, offsets[e]);
  fill_padding(offsets[e], tokens_per_expert[e], offsets[e + 1], num_rows, lane, row_to_slot);
  if (dropped != nullptr && lane == 0) {
    dropped[e] = 0;
  }
}

extern "C" __global__ void __launch_bounds__(128)
    sr_plan_scatter(const i64* experts, i64 num_slots, int num_experts, i64 chunk, i64 num_chunks,
                    i64* cursors, i64 num_rows, i64* row_to_slot, i64* slot_to_row, int* errors) {
  const i64 c = static_cast<i64>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (c >= num_chunks) {
    return;
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  i64 begin;
  i64 end;
  chunk_bounds(c, chunk, num_slots, begin, end);
  const int overflow = warp_scatter_chunk(experts, begin, end, num_experts, lane,
                                          cursors + c * static_cast<i64>(num_experts), num_rows, row_to_slot,
                                          slot_to_row);
  if (overflow && lane == 0) {
    atomicAdd(&errors[SR_ERR_NUM_ROWS], overflow);
  }
}

// The whole plan in one block of 1024 threads (32 warps, 32 chunks) for at most
// SR_SMALL_PLAN_EXPERTS experts. The [32, E] workspace, the totals and the offsets live in
// shared memory, and the steps of the kernels above follow each other with __syncthreads:
// warp w takes the columns of experts w, w + 32, ... (a lane per chunk), and warp 0 scans
// the at most 128 totals, four per lane. It writes every row of row_to_slot and, unless null,
// the zero drop counts.
#define SR_SMALL_PLAN_EXPERTS 128
extern "C" __global__ void __launch_bounds__(1024)
    sr_plan_small(const i64* experts, i64 num_slots, int num_experts, i64 block_size, i64 num_rows,
                  i64* tokens_per_expert, i64* offsets, i64* row_to_slot, i64* slot_to_row, i64* dropped,
                  int* errors) {
  __shared__ i64 counts[32 * SR_SMALL_PLAN_EXPERTS];
  __shared__ i64 totals[SR_SMALL_PLAN_EXPERTS];
  __shared__ i64 starts[SR_SMALL_PLAN_EXPERTS + 1];
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  i64 begin;
  i64 end;
  chunk_bounds(warp, (num_slots + 31) / 32, num_slots, begin, end);
  i64* mine = counts + warp * num_experts;
  const int invalid = warp_count_chunk(experts, begin, end, num_experts, lane, mine);
  if (invalid && lane == 0) {
    atomicAdd(&errors[SR_ERR_EXPERT_ID], invalid);
  }
  __syncthreads();
  // Each column becomes its chunks' first rows relative to the expert's first row.
  for (int e = warp; e < num_experts; e += 32) {
    const i64 total = warp_expert_column(counts, 32, num_experts, e, lane, true, 0);
    if (lane == 0) {
      totals[e] = total;
    }
  }
  __syncthreads();
  if (warp == 0) {
    i64 rounded[SR_SMALL_PLAN_EXPERTS / 32];
    i64 sum = 0;
#pragma unroll
    for (int j = 0; j < SR_SMALL_PLAN_EXPERTS / 32; ++j) {
      const int e = lane * (SR_SMALL_PLAN_EXPERTS / 32) + j;
      rounded[j] = e < num_experts ? whole_blocks(totals[e], block_size) : 0;
      sum += rounded[j];
    }
    const i64 inclusive = warp_inclusive_sum(sum, lane);
    i64 start = inclusive - sum;
#pragma unroll
    for (int j = 0; j < SR_SMALL_PLAN_EXPERTS / 32; ++j) {
      const int e = lane * (SR_SMALL_PLAN_EXPERTS / 32) + j;
      if (e < num_experts) {
        starts[e] = start;
      }
      start += rounded[j];
    }
    if (lane == 31) {
      starts[num_experts] = inclusive;
    }
  }
  __syncthreads();
  for (int entry = threadIdx.x; entry < 32 * num_experts; entry += blockDim.x) {
    counts[entry] += starts[entry % num_experts];
  }
  const int e = static_cast<int>(threadIdx.x);
  if (e <= num_experts) {
    offsets[e] = starts[e];
  }
  if (e < num_experts) {
    tokens_per_expert[e] = totals[e];
    if (dropped != nullptr) {
      dropped[e] = 0;
    }
  }
  for (i64 row = starts[num_experts] + threadIdx.x; row < num_rows; row += blockDim.x) {
    row_to_slot[row] = -1;
  }
  for (int padded = warp; padded < num_experts; padded += 32) {
    fill_padding(starts[padded], totals[padded], starts[padded + 1], num_rows, lane, row_to_slot);
  }
  __syncthreads();
  const int overflow =
      warp_scatter_chunk(experts, begin, end, num_experts, lane, mine, num_rows, row_to_slot, slot_to_row);
  if (overflow && lane == 0) {
    atomicAdd(&errors[SR_ERR_NUM_ROWS], overflow);
  }
}

// Per-group expert counts of load balancing (rust/core/src/balance/mod.rs, expert_counts):
// counts[g, e] += 1 for every slot of an unmasked token of group g routed to e. Each block
// takes chunks of SR_COUNT_CHUNK consecutive slots of one group (grid-stride over the chunks);
// up to SR_SHARED_COUNT_EXPERTS experts, a chunk is counted in shared memory first and then
// added to the group's counts with one 64-bit atomic per expert it holds (thousands of slots
// contending for E global counters were slower than torch.bincount); above that, each slot
// adds to the global counts itself. Integer sums: the counts do not depend on the order. Ids
// outside [-1, E) are counted in the error buffer (one per slot) and skipped; counts must
// start zeroed; group_size must be at most num_tokens (the host clamps it).
#define SR_COUNT_CHUNK 2048
#define SR_SHARED_COUNT_EXPERTS 4096

extern "C" __global__ void __launch_bounds__(256)
    sr_expert_counts(const i64* experts, i64 num_tokens, i64 k, int num_experts, i64 group_size,
                     const unsigned char* mask, i64* counts, int* errors) {
  __shared__ unsigned int local[SR_SHARED_COUNT_EXPERTS];
  const bool in_shared = num_experts <= SR_SHARED_COUNT_EXPERTS;
  const i64 slots = num_tokens * k;
  const i64 group_slots = group_size * k;
  const i64 chunks_per_group = (group_slots + SR_COUNT_CHUNK - 1) / SR_COUNT_CHUNK;
  const i64 chunks = (num_tokens + group_size - 1) / group_size * chunks_per_group;
  for (i64 c = blockIdx.x; c < chunks; c += gridDim.x) {
    const i64 g = c / chunks_per_group;
    const i64 begin = g * group_slots + (c - g * chunks_per_group) * SR_COUNT_CHUNK;
    const i64 group_end = (g + 1) * group_slots < slots ? (g + 1) * group_slots : slots;
    const i64 end = begin + SR_COUNT_CHUNK < group_end ? begin + SR_COUNT_CHUNK : group_end;
    i64* group_counts = counts + g * num_experts;
    if (in_shared) {
      for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        local[e] = 0;
      }
      __syncthreads();
    }
    for (i64 s = begin + threadIdx.x; s < end; s += blockDim.x) {
      if (mask != nullptr && mask[s / k] == 0) {
        continue;
      }
      const i64 id = experts[s];
      if (id == -1) {
        continue;
      }
      if (id < 0 || id >= num_experts) {
        atomicAdd(&errors[SR_ERR_EXPERT_ID], 1);
      } else if (in_shared) {
        atomicAdd(&local[id], 1u);
      } else {
        atomicAdd(reinterpret_cast<u64*>(group_counts + id), 1ull);
      }
    }
    if (in_shared) {
      __syncthreads();
      for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        if (local[e] != 0) {
          atomicAdd(reinterpret_cast<u64*>(group_counts + e), static_cast<u64>(local[e]));
        }
      }
      // Every count is flushed before the next chunk zeroes them.
      __syncthreads();
    }
  }
}

// Capacity-constrained plans (rust/core/src/dispatch.rs, build_capacity_plan) from the
// dropless plan: dropless row i holds slot s = dropless_rows[i] of expert e, the
// (i - routed_offsets[e])-th slot of e in slot order. It is kept when
//   drop_policy "position" (kept == null): that rank is below `capacity`;
//   drop_policy "probs":    kept[i] (the slot is among e's `capacity` highest weights, decided
//                           by a stable sort in sparseroute._cuda_ops);
// and goes to row offsets[e] + (its rank among e's kept slots, in slot order), where
// kept_before[i] counts the kept rows before i ("probs"; "position": the rank itself).
// `offsets` are the final ones (e * capacity for the padded layout). Rows past
// routed_offsets[E] are unused. slot_to_row must hold the dropless plan's -1 for empty
// slots; row_to_slot must be -1-filled. Kept slots past num_rows are counted (SR_ERR_NUM_ROWS)
// and left unrouted.
extern "C" __global__ void __launch_bounds__(256)
    sr_capacity_rows(const i64* experts, const i64* dropless_rows, i64 num_slots, int num_experts,
                     const i64* routed_offsets, const unsigned char* kept, const i64* kept_before,
                     i64 capacity, const i64* offsets, i64 num_rows, i64* row_to_slot, i64* slot_to_row,
                     int* errors) {
  const i64 routed = routed_offsets[num_experts];
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  int overflowed = 0;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < routed && i < num_slots;
       i += stride) {
    const i64 s = dropless_rows[i];
    const i64 e = experts[s];
    const i64 first = routed_offsets[e];
    bool keep;
    i64 rank;
    if (kept == nullptr) {
      rank = i - first;
      keep = rank < capacity;
    } else {
      keep = kept[i] != 0;
      rank = kept_before[i] - kept_before[first];
    }
    int overflow = 0;
    place_slot(s, keep ? offsets[e] + rank : -1, num_rows, row_to_slot, slot_to_row, overflow);
    overflowed += overflow;
  }
  if (overflowed) {
    atomicAdd(&errors[SR_ERR_NUM_ROWS], overflowed);
  }
}

// The group layout that torch's grouped GEMM needs of a plan's offsets [E + 1] over num_rows
// rows (sparseroute.ops.experts, _group_layout), in two launches instead of a dozen small torch
// ops:
//   sr_group_ends     (one block of 1024 threads) ends[e] = the running maximum of
//                     clamp(offsets[e + 1], 0, num_rows), as int32 (non-decreasing, within the
//                     rows, so that no group can reach outside them); empty[e] = 1 when expert
//                     e has no rows (ends[e] == ends[e - 1], ends[-1] = 0); malformed offsets
//                     (offsets[0] != 0, or an end that differs from its offset) are counted as
//                     SR_ERR_PLAN_INDEX.
//   sr_padding_rows   padding[r] = 1 for the rows past the last group (r >= ends[E - 1]).
extern "C" __global__ void __launch_bounds__(1024)
    sr_group_ends(const i64* offsets, int num_experts, i64 num_rows, int* ends, unsigned char* empty,
                  int* errors) {
  __shared__ i64 warp_maxima[32];
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  int malformed = threadIdx.x == 0 && offsets[0] != 0;
  i64 carry = 0;  // the running maximum of the tiles before
  for (int base = 0; base < num_experts; base += 1024) {
    const int e = base + static_cast<int>(threadIdx.x);
    i64 value = 0;
    if (e < num_experts) {
      value = offsets[e + 1];
      value = value < 0 ? 0 : (value > num_rows ? num_rows : value);
    }
    i64 inclusive = value;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const i64 other = __shfl_up_sync(SR_FULL_MASK, inclusive, offset);
      inclusive = lane >= offset && other > inclusive ? other : inclusive;
    }
    if (lane == 31) {
      warp_maxima[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0) {
      i64 total = warp_maxima[lane];
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const i64 other = __shfl_up_sync(SR_FULL_MASK, total, offset);
        total = lane >= offset && other > total ? other : total;
      }
      warp_maxima[lane] = total;
    }
    __syncthreads();
    i64 end = carry;
    if (warp > 0 && warp_maxima[warp - 1] > end) {
      end = warp_maxima[warp - 1];
    }
    if (inclusive > end) {
      end = inclusive;
    }
    if (e < num_experts) {
      ends[e] = static_cast<int>(end);
      malformed |= offsets[e + 1] != end;
    }
    if (warp_maxima[31] > carry) {
      carry = warp_maxima[31];
    }
    __syncthreads();  // warp_maxima is rewritten by the next tile
  }
  // Every end is written (and visible to the block after the barrier): compare neighbours.
  for (int e = static_cast<int>(threadIdx.x); e < num_experts; e += 1024) {
    empty[e] = ends[e] == (e > 0 ? ends[e - 1] : 0);
  }
  // One count per layout, however many offsets are off.
  __shared__ int warp_malformed[32];
  const int warp_any = __any_sync(SR_FULL_MASK, malformed);
  if (lane == 0) {
    warp_malformed[warp] = warp_any;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int any = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) {
      any |= warp_malformed[w];
    }
    if (any) {
      atomicAdd(&errors[SR_ERR_PLAN_INDEX], 1);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256)
    sr_padding_rows(const int* ends, int num_experts, i64 num_rows, unsigned char* padding) {
  const i64 last = ends[num_experts - 1];
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 r = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; r < num_rows; r += stride) {
    padding[r] = r >= last;
  }
}
