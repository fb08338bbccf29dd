// Replica maps on the GPU: the CPU's placement::replica_map (rust/core/src/placement.rs) maps
// the logical expert of each slot of experts [T, k] (row-major, -1 = empty) to one of the
// physical slots holding a replica of it, from one layer's table: logical_to_physical [E, R]
// (each expert's slots in ascending order) and replica_counts [E].
//
//   sr_replica_round_robin  one thread per slot. The n-th occurrence of expert e in row-major
//                           order goes to its replica n mod r_e; n is the slot's rank in the
//                           dropless plan (slot_to_row[s] - offsets[e]), whose rows keep each
//                           expert's slots in ascending order (plan.cu).
//   sr_replica_load         one thread walks the slots in row-major order (the policy is a
//                           sequential greedy): each occurrence goes to the replica whose GPU
//                           has received the fewest tokens so far, then whose slot has, then
//                           to the lower replica number. The counters live in shared memory
//                           when the G + P of them fit (REPLICA_SHARED_COUNTERS int32), else
//                           in a torch-zeroed int64 workspace.
//
// Where the CPU raises, the GPU writes -1 and counts: an expert id outside [0, E) other than -1
// (SR_ERR_EXPERT_ID), a used expert's replica count outside [1, R] or a replica slot outside
// [0, num_slots) (SR_ERR_PLAN_INDEX).

#include "common.cuh"

// The slot of replica `j` of expert `e`, or -1 (with `bad` set) for an invalid table entry.
__device__ __forceinline__ i64 replica_slot(const i64* table, int replicas, i64 e, i64 j, i64 num_slots,
                                            int& bad) {
  const i64 slot = table[e * replicas + j];
  if (slot < 0 || slot >= num_slots) {
    bad = 1;
    return -1;
  }
  return slot;
}

extern "C" __global__ void __launch_bounds__(256)
    sr_replica_round_robin(const i64* experts, i64 num_entries, const i64* slot_to_row, const i64* offsets,
                           const i64* table, const i64* counts, int num_experts, int replicas, i64 num_slots,
                           i64* out, int* errors) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  int bad_table = 0;
  for (i64 s = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_entries; s += stride) {
    const i64 e = experts[s];
    i64 slot = -1;
    if (e >= 0 && e < num_experts) {  // invalid ids: already counted by the plan
      const i64 count = counts[e];
      const i64 row = slot_to_row[s];
      if (count < 1 || count > replicas || row < offsets[e]) {
        bad_table = 1;
      } else {
        slot = replica_slot(table, replicas, e, (row - offsets[e]) % count, num_slots, bad_table);
      }
    }
    out[s] = slot;
  }
  if (bad_table) {
    atomicAdd(&errors[SR_ERR_PLAN_INDEX], 1);
  }
}

// GPU and slot counters of sr_replica_load that fit in shared memory (32 KiB of int32: a call
// routes fewer than 2^31 slots).
#define REPLICA_SHARED_COUNTERS 8192

extern "C" __global__ void __launch_bounds__(32)
    sr_replica_load(const i64* experts, i64 num_entries, const i64* table, const i64* counts, int num_experts,
                    int replicas, i64 num_slots, i64 slots_per_gpu, i64* workspace, i64* out, int* errors) {
  __shared__ int shared_counters[REPLICA_SHARED_COUNTERS];
  const i64 num_gpus = num_slots / slots_per_gpu;
  const bool counters_in_shared = num_gpus + num_slots <= REPLICA_SHARED_COUNTERS;
  int* shared_gpu = shared_counters;
  int* shared_slot = shared_counters + num_gpus;
  if (counters_in_shared) {
    for (i64 i = threadIdx.x; i < num_gpus + num_slots; i += blockDim.x) {
      shared_counters[i] = 0;
    }
  }
  __syncwarp();
  if (threadIdx.x != 0) {
    return;
  }
  i64* global_gpu = workspace;
  i64* global_slot = workspace + num_gpus;
  int bad_id = 0;
  int bad_table = 0;
  for (i64 s = 0; s < num_entries; ++s) {
    const i64 e = experts[s];
    i64 best = -1;
    if (e < -1 || e >= num_experts) {
      bad_id = 1;
    } else if (e >= 0) {
      const i64 count = counts[e];
      if (count < 1 || count > replicas) {
        bad_table = 1;
      } else {
        i64 best_gpu_tokens = 0;
        i64 best_slot_tokens = 0;
        for (i64 j = 0; j < count; ++j) {
          int bad = 0;
          const i64 slot = replica_slot(table, replicas, e, j, num_slots, bad);
          if (bad) {
            bad_table = 1;
            best = -1;
            break;
          }
          const i64 gpu = slot / slots_per_gpu;
          const i64 gpu_tokens = counters_in_shared ? shared_gpu[gpu] : global_gpu[gpu];
          const i64 slot_tokens = counters_in_shared ? shared_slot[slot] : global_slot[slot];
          // Strictly fewer: equal keys keep the lower replica number.
          if (best < 0 || gpu_tokens < best_gpu_tokens ||
              (gpu_tokens == best_gpu_tokens && slot_tokens < best_slot_tokens)) {
            best = slot;
            best_gpu_tokens = gpu_tokens;
            best_slot_tokens = slot_tokens;
          }
        }
        if (best >= 0) {
          const i64 gpu = best / slots_per_gpu;
          if (counters_in_shared) {
            shared_gpu[gpu] += 1;
            shared_slot[best] += 1;
          } else {
            global_gpu[gpu] += 1;
            global_slot[best] += 1;
          }
        }
      }
    }
    out[s] = best;
  }
  if (bad_id) {
    atomicAdd(&errors[SR_ERR_EXPERT_ID], 1);
  }
  if (bad_table) {
    atomicAdd(&errors[SR_ERR_PLAN_INDEX], 1);
  }
}
