// Layer routing decisions, matching rust/core/src/layers.rs (layer_plan) exactly.
//
//   sr_layer_plan  one thread per (request, layer) row of logits [N, 3] (skip, execute,
//                  repeat), 256 per block (grid-stride): the argmax compared in acc_t, a tie
//                  involving execute is execute (1), a tie of skip and repeat is skip (0),
//                  else repeat (2). A row holding NaN is counted in the error buffer and gets
//                  the decision -1.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
    sr_layer_plan(const elem_t* logits, i64 num_rows, i64* plans, int* errors) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 r = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; r < num_rows; r += stride) {
    const acc_t skip = to_acc(logits[3 * r]);
    const acc_t execute = to_acc(logits[3 * r + 1]);
    const acc_t repeat = to_acc(logits[3 * r + 2]);
    i64 decision;
    if (skip != skip || execute != execute || repeat != repeat) {
      atomicAdd(&errors[SR_ERR_NON_FINITE_LOGITS], 1);
      decision = -1;
    } else if (execute >= skip && execute >= repeat) {
      decision = 1;
    } else if (skip >= repeat) {
      decision = 0;
    } else {
      decision = 2;
    }
    plans[r] = decision;
  }
}
