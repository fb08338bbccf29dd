// Top-k gating on the GPU: forward (logits -> weights, experts) and backward (grad of the
// weights -> grad of the logits). The semantics are those of rust/core/src/gating/mod.rs and
// docs/semantics.md; docs/cuda.md says where the GPU results may differ in the last bits.
//
// Without expert_bias or a group limit, and for k <= 16, a team of 1 to 32 lanes routes one
// token (sr_topk_gating_team*, below): selection compares the logits, which each lane keeps
// sorted in registers as it reads its share of the row, and the lanes merge. With a bias but
// no group limit (k <= 16), keyed lane teams (sr_topk_gating_keyed_team*) do the same over the
// keys, score plus bias. Otherwise, one team of threads routes one token: a warp
// (sr_topk_gating_warp, four tokens per
// 128-thread block) for up to a few hundred experts, a 256-thread block
// (sr_topk_gating_block) above. Any E and any k: each of the k selection rounds finds the best
// (key, expert) pair that comes after the previous round's pair in selection order (higher key
// first, equal keys lower expert first), so the k experts come out in order and ties can never
// select an expert twice. The warp kernel computes each key once into shared memory (E is at
// most 512 there), scores a group with several lanes, marks the keys of excluded groups -inf,
// and for k <= 16 selects from each lane's sorted (key, expert) pairs (select_cached_keys), so
// that after the keys it only reads and compares; the block kernel recomputes keys from the
// logits where it needs them, so nothing there scales with E in registers or shared memory.
//
// Rows holding NaN or an infinity (in the logits, or in expert_bias + scores) are not routed:
// their experts are -1 and their weights 0, and the row is counted in the error buffer that
// sparseroute.check_cuda_errors() reads. The kernel never synchronises with the host.

#include "common.cuh"

namespace {

struct GatingArgs {
  const elem_t* logits;  // [T, E]
  i64 num_tokens;
  int num_experts;
  int k;
  int sigmoid;    // 0: softmax, 1: sigmoid
  int normalize;  // 0 / 1
  const acc_t* bias;  // [E] or null
  int num_groups;     // 0: no group limit
  int topk_groups;
  int group_score_k;  // how many of a group's best keys sum to its score
  acc_t* group_scores;  // [T, num_groups] workspace (only with a group limit)
  acc_t scale;
  acc_t* weights;  // [T, k]
  i64* experts;    // [T, k]
  int* errors;
};

// A row that holds NaN or an infinity is not routed: its k slots get expert -1 and weight 0
// (slot r written by lane r of `lanes`, r + lanes, ...), and lane 0 counts the row.
__device__ __forceinline__ void leave_unrouted(i64* experts, acc_t* weights, int k, int lane, int lanes,
                                               int* errors) {
  for (int r = lane; r < k; r += lanes) {
    experts[r] = -1;
    weights[r] = acc_t(0);
  }
  if (lane == 0) {
    atomicAdd(&errors[SR_ERR_NON_FINITE_LOGITS], 1);
  }
}

template <int NT>
struct Scratch {
  acc_t values[NT / 32];
  int indices[NT / 32];
  int flags[NT / 32];
};

// The experts whose keys the warp kernel caches in shared memory: all of them (its rows have
// at most WARP_TEAM_MAX_EXPERTS = 512 experts, _cuda_ops.py).
constexpr int kKeyCacheExperts = 512;

template <int M>
__device__ void select_cached_keys(const acc_t* keys, const elem_t* row, int num_experts, int k, int lane,
                                   acc_t* weights, i64* experts);

// Routes token t. `key_cache` (null, or room for E keys shared by the team) holds the keys
// once computed, where the route needs keys.
template <int NT>
__device__ void route_token(const GatingArgs& a, i64 t, int lane, Scratch<NT>& sm, acc_t* key_cache) {
  const int num_experts = a.num_experts;
  const int k = a.k;
  const elem_t* row = a.logits + t * static_cast<i64>(num_experts);
  acc_t* weights = a.weights + t * static_cast<i64>(k);
  i64* experts = a.experts + t * static_cast<i64>(k);
  const bool use_keys = a.bias != nullptr || a.num_groups > 0;

  // Pass 1: finiteness (of logits and bias) and the largest logit.
  int finite = 1;
  acc_t row_max = neg_infinity<acc_t>();
  for (int e = lane; e < num_experts; e += NT) {
    const acc_t v = to_acc(row[e]);
    finite &= is_finite(v) ? 1 : 0;
    if (a.bias != nullptr) {
      finite &= is_finite(a.bias[e]) ? 1 : 0;
    }
    row_max = v > row_max ? v : row_max;
  }
  finite = team_reduce<NT>(finite, MinIntOp(), sm.flags);
  if (!finite) {
    leave_unrouted(experts, weights, k, lane, NT, a.errors);
    return;
  }

  // Softmax statistics over all experts, when the keys or the weights need them.
  acc_t row_sum = acc_t(1);
  if (!a.sigmoid && (use_keys || !a.normalize)) {
    row_max = team_reduce<NT>(row_max, MaxOp(), sm.values);
    acc_t partial = acc_t(0);
    for (int e = lane; e < num_experts; e += NT) {
      partial = add_rn(partial, exp_acc(sub_rn(to_acc(row[e]), row_max)));
    }
    row_sum = team_reduce<NT>(partial, SumOp(), sm.values);
  }

  // The selection key of expert e, computed from the logits: its score plus its bias.
  auto computed_key = [&](int e) -> acc_t {
    const acc_t v = to_acc(row[e]);
    acc_t s;
    if (a.sigmoid) {
      s = div_rn(acc_t(1), add_rn(acc_t(1), exp_acc(-v)));
    } else {
      s = div_rn(exp_acc(sub_rn(v, row_max)), row_sum);
    }
    return a.bias != nullptr ? add_rn(s, a.bias[e]) : s;
  };
  const bool cached = use_keys && key_cache != nullptr;
  if (cached) {
    for (int e = lane; e < num_experts; e += NT) {
      key_cache[e] = computed_key(e);
    }
    team_sync<NT>();
  }
  // The selection key of expert e: its logit, or its score plus its bias.
  auto key_of = [&](int e) -> acc_t {
    if (!use_keys) {
      return to_acc(row[e]);
    }
    return cached ? key_cache[e] : computed_key(e);
  };

  // Group limit: group scores (the sum of a group's group_score_k best keys, all of them in a
  // smaller group, added best first from zero), then the topk_groups-th best group.
  const int group_size = a.num_groups > 0 ? num_experts / a.num_groups : num_experts;
  acc_t* group_scores = a.group_scores + t * static_cast<i64>(a.num_groups > 0 ? a.num_groups : 0);
  acc_t group_key = neg_infinity<acc_t>();
  int group_index = 0;
  if (a.num_groups > 0) {
    const int summed = a.group_score_k < group_size ? a.group_score_k : group_size;
    bool scored = false;
    if constexpr (NT == 32) {
      if (cached && summed <= 2 && a.num_groups <= 16) {
        // Several lanes per group (32 / num_groups, rounded down to a power of two): each
        // takes the best two of its share of the group's cached keys, and a butterfly within
        // the group's lanes merges them. The two best values do not depend on which lane
        // found them, so the score is the one-pass score below.
        int lanes_per_group = 16;
        while (lanes_per_group * a.num_groups > 32) {
          lanes_per_group >>= 1;
        }
        const int g = lane / lanes_per_group;
        acc_t best = neg_infinity<acc_t>();
        acc_t second = neg_infinity<acc_t>();
        if (g < a.num_groups) {
          const acc_t* group_keys = key_cache + g * group_size;
          for (int i = lane % lanes_per_group; i < group_size; i += lanes_per_group) {
            const acc_t key = group_keys[i];
            if (key > best) {
              second = best;
              best = key;
            } else if (key > second) {
              second = key;
            }
          }
        }
        for (int offset = lanes_per_group >> 1; offset > 0; offset >>= 1) {
          // The best two of both lanes' best two: the larger best, then the larger of the
          // smaller best and the larger second.
          const acc_t other_best = __shfl_xor_sync(SR_FULL_MASK, best, offset);
          const acc_t other_second = __shfl_xor_sync(SR_FULL_MASK, second, offset);
          const acc_t smaller_best = other_best > best ? best : other_best;
          const acc_t larger_second = other_second > second ? other_second : second;
          best = other_best > best ? other_best : best;
          second = larger_second > smaller_best ? larger_second : smaller_best;
        }
        if (g < a.num_groups && lane % lanes_per_group == 0) {
          acc_t sum = add_rn(acc_t(0), best);
          if (summed == 2) {
            sum = add_rn(sum, second);
          }
          group_scores[g] = sum;
        }
        scored = true;
      }
    }
    for (int g = lane; g < a.num_groups && !scored; g += NT) {
      const int first = g * group_size;
      acc_t sum = acc_t(0);
      if (summed <= 2) {
        // The one or two best keys, in one pass.
        acc_t best = neg_infinity<acc_t>();
        acc_t second = neg_infinity<acc_t>();
        for (int i = 0; i < group_size; ++i) {
          const acc_t key = key_of(first + i);
          if (key > best) {
            second = best;
            best = key;
          } else if (key > second) {
            second = key;
          }
        }
        sum = add_rn(sum, best);
        if (summed == 2) {
          sum = add_rn(sum, second);
        }
      } else {
        // More keys: one pass per key, each taking the best pair after the previous one.
        acc_t previous_key = neg_infinity<acc_t>();
        int previous_index = 0;
        for (int r = 0; r < summed; ++r) {
          acc_t best_key = neg_infinity<acc_t>();
          int best_index = 0x7fffffff;
          for (int e = first; e < first + group_size; ++e) {
            const acc_t key = key_of(e);
            const bool after_previous = r == 0 || pair_before(previous_key, previous_index, key, e);
            if (after_previous && pair_before(key, e, best_key, best_index)) {
              best_key = key;
              best_index = e;
            }
          }
          sum = add_rn(sum, best_key);
          previous_key = best_key;
          previous_index = best_index;
        }
      }
      group_scores[g] = sum;
    }
    team_sync<NT>();
    for (int round = 0; round < a.topk_groups; ++round) {
      acc_t best_key = neg_infinity<acc_t>();
      int best_index = 0x7fffffff;
      for (int g = lane; g < a.num_groups; g += NT) {
        const acc_t key = group_scores[g];
        const bool after_previous = round == 0 || pair_before(group_key, group_index, key, g);
        if (after_previous && pair_before(key, g, best_key, best_index)) {
          best_key = key;
          best_index = g;
        }
      }
      team_best_pair<NT>(best_key, best_index, sm.values, sm.indices);
      group_key = best_key;
      group_index = best_index;
    }
  }
  // Expert e competes when its group is one of the topk_groups best: its group's pair does not
  // come after the topk_groups-th best group's pair.
  auto in_kept_group = [&](int e) -> bool {
    const int g = e / group_size;
    return !pair_before(group_key, group_index, group_scores[g], g);
  };
  const bool mask_cached = cached && a.num_groups > 0;
  if (mask_cached) {
    // The other groups' keys become -inf: at least k keys of kept groups are finite (the row
    // and the bias are, and the host checks k <= topk_groups * group size), so the k rounds
    // below never reach a -inf key, and they need not look at groups.
    for (int e = lane; e < num_experts; e += NT) {
      if (!in_kept_group(e)) {
        key_cache[e] = neg_infinity<acc_t>();
      }
    }
    team_sync<NT>();
  }
  auto allowed = [&](int e) -> bool { return a.num_groups <= 0 || mask_cached || in_kept_group(e); };

  // Selection: from the lanes' sorted pairs where a warp holds the keys, else k rounds, each
  // taking the best pair after the previous round's pair.
  bool selected = false;
  if constexpr (NT == 32) {
    if (cached && k <= 16) {
      if (k <= 2) {
        select_cached_keys<2>(key_cache, row, num_experts, k, lane, weights, experts);
      } else if (k <= 4) {
        select_cached_keys<4>(key_cache, row, num_experts, k, lane, weights, experts);
      } else if (k <= 8) {
        select_cached_keys<8>(key_cache, row, num_experts, k, lane, weights, experts);
      } else {
        select_cached_keys<16>(key_cache, row, num_experts, k, lane, weights, experts);
      }
      selected = true;
    }
  }
  acc_t previous_key = neg_infinity<acc_t>();
  int previous_index = 0;
  for (int r = 0; r < k && !selected; ++r) {
    acc_t best_key = neg_infinity<acc_t>();
    int best_index = 0x7fffffff;
    for (int e = lane; e < num_experts; e += NT) {
      if (!allowed(e)) {
        continue;
      }
      const acc_t key = key_of(e);
      const bool after_previous = r == 0 || pair_before(previous_key, previous_index, key, e);
      if (after_previous && pair_before(key, e, best_key, best_index)) {
        best_key = key;
        best_index = e;
      }
    }
    team_best_pair<NT>(best_key, best_index, sm.values, sm.indices);
    if (lane == r % NT) {
      // Slot r is owned by thread r % NT from here on: it keeps the chosen logit there.
      const bool found = best_index < num_experts;
      experts[r] = found ? best_index : -1;
      weights[r] = found ? to_acc(row[best_index]) : acc_t(0);
    }
    previous_key = best_key;
    previous_index = best_index;
  }

  // Weights from the chosen logits (each thread reads back only the slots it wrote).
  const acc_t scale = a.scale;
  if (!a.sigmoid && a.normalize) {
    acc_t chosen_max = neg_infinity<acc_t>();
    for (int r = lane; r < k; r += NT) {
      if (experts[r] >= 0) {
        chosen_max = weights[r] > chosen_max ? weights[r] : chosen_max;
      }
    }
    chosen_max = team_reduce<NT>(chosen_max, MaxOp(), sm.values);
    acc_t partial = acc_t(0);
    for (int r = lane; r < k; r += NT) {
      if (experts[r] >= 0) {
        partial = add_rn(partial, exp_acc(sub_rn(weights[r], chosen_max)));
      }
    }
    const acc_t total = team_reduce<NT>(partial, SumOp(), sm.values);
    for (int r = lane; r < k; r += NT) {
      if (experts[r] >= 0) {
        weights[r] = mul_rn(div_rn(exp_acc(sub_rn(weights[r], chosen_max)), total), scale);
      }
    }
  } else if (!a.sigmoid) {
    for (int r = lane; r < k; r += NT) {
      if (experts[r] >= 0) {
        weights[r] = mul_rn(div_rn(exp_acc(sub_rn(weights[r], row_max)), row_sum), scale);
      }
    }
  } else {
    acc_t partial = acc_t(0);
    for (int r = lane; r < k; r += NT) {
      if (experts[r] >= 0) {
        weights[r] = div_rn(acc_t(1), add_rn(acc_t(1), exp_acc(-weights[r])));
        partial = add_rn(partial, weights[r]);
      }
    }
    if (a.normalize) {
      const acc_t total = add_rn(team_reduce<NT>(partial, SumOp(), sm.values), acc_t(1e-20));
      for (int r = lane; r < k; r += NT) {
        if (experts[r] >= 0) {
          weights[r] = div_rn(weights[r], total);
        }
      }
    }
    for (int r = lane; r < k; r += NT) {
      if (experts[r] >= 0) {
        weights[r] = mul_rn(weights[r], scale);
      }
    }
  }
}

struct BackwardArgs {
  const elem_t* logits;   // [T, E]
  i64 num_tokens;
  int num_experts;
  int k;
  const i64* experts;       // [T, k]
  const acc_t* grad_weights;  // [T, k]
  int sigmoid;
  int normalize;
  acc_t scale;
  elem_t* grad_logits;  // [T, E]
  int* errors;
};

// The last slot of the token that chose expert e (the Rust kernel writes slots in order, so
// with a repeated expert the last slot's value stands), or -1.
__device__ __forceinline__ int last_slot_of(const i64* ids, int k, int e) {
  int found = -1;
  for (int j = 0; j < k; ++j) {
    found = ids[j] == e ? j : found;
  }
  return found;
}

template <int NT>
__device__ void backward_token(const BackwardArgs& a, i64 t, int lane, Scratch<NT>& sm) {
  const int num_experts = a.num_experts;
  const int k = a.k;
  const elem_t* row = a.logits + t * static_cast<i64>(num_experts);
  const i64* ids = a.experts + t * static_cast<i64>(k);
  const acc_t* g = a.grad_weights + t * static_cast<i64>(k);
  elem_t* out = a.grad_logits + t * static_cast<i64>(num_experts);
  const acc_t scale = a.scale;
  auto live = [&](int j) -> bool { return ids[j] >= 0 && ids[j] < num_experts; };

  int valid = 1;
  for (int j = lane; j < k; j += NT) {
    valid &= (ids[j] >= -1 && ids[j] < num_experts) ? 1 : 0;
  }
  valid = team_reduce<NT>(valid, MinIntOp(), sm.flags);
  if (!valid && lane == 0) {
    atomicAdd(&a.errors[SR_ERR_EXPERT_ID], 1);
  }

  if (!a.sigmoid && !a.normalize) {
    // w_j = scale * s_j, s the softmax over all experts:
    // dL/dl_n = s_n * (a_n - c), a_n = scale * g_j for the slot j holding n, c = sum_j a_j s_j.
    acc_t m = neg_infinity<acc_t>();
    for (int e = lane; e < num_experts; e += NT) {
      const acc_t v = to_acc(row[e]);
      m = v > m ? v : m;
    }
    m = team_reduce<NT>(m, MaxOp(), sm.values);
    acc_t partial = acc_t(0);
    for (int e = lane; e < num_experts; e += NT) {
      partial = add_rn(partial, exp_acc(sub_rn(to_acc(row[e]), m)));
    }
    const acc_t z = team_reduce<NT>(partial, SumOp(), sm.values);
    auto score = [&](int e) -> acc_t { return div_rn(exp_acc(sub_rn(to_acc(row[e]), m)), z); };
    acc_t c_partial = acc_t(0);
    for (int j = lane; j < k; j += NT) {
      if (live(j)) {
        c_partial = add_rn(c_partial, mul_rn(mul_rn(scale, g[j]), score(static_cast<int>(ids[j]))));
      }
    }
    const acc_t c = team_reduce<NT>(c_partial, SumOp(), sm.values);
    for (int e = lane; e < num_experts; e += NT) {
      const acc_t s = score(e);
      const int j = last_slot_of(ids, k, e);
      const acc_t upstream = j >= 0 ? mul_rn(scale, g[j]) : acc_t(0);
      out[e] = from_acc(mul_rn(s, sub_rn(upstream, c)));
    }
    return;
  }

  if (!a.sigmoid) {
    // w_j = scale * p_j, p the softmax over the chosen logits:
    // dL/dl_j = scale * p_j * (g_j - sum_i p_i g_i); unchosen logits get 0.
    acc_t m = neg_infinity<acc_t>();
    for (int j = lane; j < k; j += NT) {
      if (live(j)) {
        const acc_t v = to_acc(row[ids[j]]);
        m = v > m ? v : m;
      }
    }
    m = team_reduce<NT>(m, MaxOp(), sm.values);
    acc_t partial = acc_t(0);
    for (int j = lane; j < k; j += NT) {
      if (live(j)) {
        partial = add_rn(partial, exp_acc(sub_rn(to_acc(row[ids[j]]), m)));
      }
    }
    const acc_t total = team_reduce<NT>(partial, SumOp(), sm.values);
    acc_t mean_partial = acc_t(0);
    for (int j = lane; j < k; j += NT) {
      if (live(j)) {
        const acc_t p = div_rn(exp_acc(sub_rn(to_acc(row[ids[j]]), m)), total);
        mean_partial = add_rn(mean_partial, mul_rn(p, g[j]));
      }
    }
    const acc_t mean_g = team_reduce<NT>(mean_partial, SumOp(), sm.values);
    for (int e = lane; e < num_experts; e += NT) {
      const int j = last_slot_of(ids, k, e);
      acc_t grad = acc_t(0);
      if (j >= 0) {
        const acc_t p = div_rn(exp_acc(sub_rn(to_acc(row[e]), m)), total);
        grad = mul_rn(mul_rn(scale, p), sub_rn(g[j], mean_g));
      }
      out[e] = from_acc(grad);
    }
    return;
  }

  // Sigmoid: w_j = scale * s_j (/ (sum_i s_i + 1e-20) when normalised); unchosen logits get 0.
  auto sigmoid = [&](int e) -> acc_t {
    return div_rn(acc_t(1), add_rn(acc_t(1), exp_acc(-to_acc(row[e]))));
  };
  acc_t total = acc_t(1);
  acc_t weighted = acc_t(0);
  if (a.normalize) {
    acc_t sum_partial = acc_t(0);
    acc_t weighted_partial = acc_t(0);
    for (int j = lane; j < k; j += NT) {
      if (live(j)) {
        const acc_t s = sigmoid(static_cast<int>(ids[j]));
        sum_partial = add_rn(sum_partial, s);
        weighted_partial = add_rn(weighted_partial, mul_rn(g[j], s));
      }
    }
    total = add_rn(team_reduce<NT>(sum_partial, SumOp(), sm.values), acc_t(1e-20));
    weighted = team_reduce<NT>(weighted_partial, SumOp(), sm.values);
  }
  for (int e = lane; e < num_experts; e += NT) {
    const int j = last_slot_of(ids, k, e);
    acc_t grad = acc_t(0);
    if (j >= 0) {
      const acc_t s = sigmoid(e);
      const acc_t d_score =
          a.normalize ? mul_rn(scale, sub_rn(div_rn(g[j], total), div_rn(weighted, mul_rn(total, total))))
                      : mul_rn(scale, g[j]);
      grad = mul_rn(mul_rn(d_score, s), sub_rn(acc_t(1), s));
    }
    out[e] = from_acc(grad);
  }
}

// ---- selection pairs as integers ------------------------------------------------------------
// The lane-team kernel below holds (logit, expert) pairs as unsigned integers whose order is
// the selection order: the logit's bits made monotone (a positive value gets its sign bit set,
// a negative value all its bits flipped, -0 counts as +0) above the complement of the expert,
// so that of equal logits the lower expert is the larger integer. One integer comparison then
// orders two pairs, and a sorted list takes a new pair with min/max instructions alone.
// float16 / bfloat16 logits and their expert fit 32 bits (E <= 65536: the host checks),
// float32 64 bits; float64 keeps (key, expert) and compares with pair_before.
#if SR_DTYPE == 1 || SR_DTYPE == 2
typedef unsigned pair_t;
constexpr int kPairIndexBits = 16;
#elif SR_DTYPE == 0
typedef u64 pair_t;
constexpr int kPairIndexBits = 32;
#endif

#if SR_DTYPE != 3
__device__ __forceinline__ pair_t make_pair(elem_t value, int expert) {
  constexpr int bits = kPairIndexBits;  // the width of the logit, too
  constexpr pair_t sign = pair_t(1) << (bits - 1);
  constexpr pair_t all = (pair_t(1) << bits) - 1;
#if SR_DTYPE == 0
  pair_t b = __float_as_uint(value);
#else
  pair_t b = value;
#endif
  b = b == sign ? pair_t(0) : b;  // -0 is +0
  const pair_t ordered = (b & sign) ? (~b & all) : (b | sign);
  return (ordered << bits) | (all - static_cast<pair_t>(expert));
}
__device__ __forceinline__ pair_t empty_pair() { return 0; }  // below every pair of a real logit
__device__ __forceinline__ int pair_expert(pair_t p) {
  constexpr pair_t all = (pair_t(1) << kPairIndexBits) - 1;
  return static_cast<int>(all - (p & all));
}
__device__ __forceinline__ acc_t pair_logit(pair_t p) {
  constexpr int bits = kPairIndexBits;
  constexpr pair_t sign = pair_t(1) << (bits - 1);
  constexpr pair_t all = (pair_t(1) << bits) - 1;
  const pair_t ordered = p >> bits;
  const pair_t b = (ordered & sign) ? (ordered & ~sign) : (~ordered & all);
#if SR_DTYPE == 0
  return __uint_as_float(static_cast<unsigned>(b));
#else
  return to_acc(static_cast<elem_t>(b));
#endif
}
#else
struct pair_t {
  acc_t key;
  int expert;
};
__device__ __forceinline__ pair_t make_pair(elem_t value, int expert) { return pair_t{to_acc(value), expert}; }
__device__ __forceinline__ pair_t empty_pair() { return pair_t{neg_infinity<acc_t>(), -1}; }
__device__ __forceinline__ bool pair_first(pair_t a, pair_t b) {
  return pair_before(a.key, a.expert, b.key, b.expert);
}
__device__ __forceinline__ int pair_expert(pair_t p) { return p.expert; }
__device__ __forceinline__ acc_t pair_logit(pair_t p) { return p.key; }
__device__ __forceinline__ pair_t lanes_xor(pair_t p, int offset, unsigned team_mask) {
  return pair_t{__shfl_xor_sync(team_mask, p.key, offset), __shfl_xor_sync(team_mask, p.expert, offset)};
}
#endif
#if SR_DTYPE != 3
// Pairs as integers (pair_t, key_pair_t): the larger comes first.
template <class P>
__device__ __forceinline__ bool pair_first(P a, P b) {
  return a > b;
}
#endif

// Keys (acc_t: score plus bias) and their expert as pairs, for the keyed route: a float key
// and the complement of the expert in 64 bits, made as make_pair makes float32 logit pairs
// (so that -inf, too, comes before the empty pair 0); float64 keys as (key, expert).
#if SR_DTYPE == 3
typedef pair_t key_pair_t;
__device__ __forceinline__ key_pair_t make_key_pair(acc_t key, int expert) { return pair_t{key, expert}; }
__device__ __forceinline__ key_pair_t empty_key_pair() { return empty_pair(); }
__device__ __forceinline__ int key_pair_expert(key_pair_t p) { return p.expert; }
#else
typedef u64 key_pair_t;
__device__ __forceinline__ key_pair_t make_key_pair(float key, int expert) {
  constexpr u64 sign = 0x80000000ull;
  constexpr u64 all = 0xffffffffull;
  u64 b = __float_as_uint(key);
  b = b == sign ? u64(0) : b;  // -0 is +0
  const u64 ordered = (b & sign) ? (~b & all) : (b | sign);
  return (ordered << 32) | (all - static_cast<u64>(expert));
}
__device__ __forceinline__ key_pair_t empty_key_pair() { return 0; }
__device__ __forceinline__ int key_pair_expert(key_pair_t p) {
  return static_cast<int>(0xffffffffull - (p & 0xffffffffull));
}
#endif

// The value of the lane `offset` away (xor) within the team.
template <class T>
__device__ __forceinline__ T lanes_xor(T value, int offset, unsigned team_mask) {
  return __shfl_xor_sync(team_mask, value, offset);
}

// ---- sorting networks over pairs ------------------------------------------------------------
// Branch-free (selects only) and fully unrolled, so that the arrays stay in registers.

template <class P>
__device__ __forceinline__ void order_two(P& first, P& second) {
  const bool swap = pair_first(second, first);
  const P a = first;
  first = swap ? second : a;
  second = swap ? a : second;
}

// Sorts N pairs (a power of two) into selection order: a bitonic sorting network.
template <int N>
__device__ __forceinline__ void sort_pairs(pair_t* v) {
#pragma unroll
  for (int size = 2; size <= N; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int j = i ^ stride;
        if (j > i) {
          // Blocks of `size` alternate in direction until the last pass sorts them all.
          if ((i & size) == 0 || size == N) {
            order_two(v[i], v[j]);
          } else {
            order_two(v[j], v[i]);
          }
        }
      }
    }
  }
}

// best[0..M) sorted, fresh[0..N) sorted (N <= M): best becomes the M first pairs of both.
// Pairing best's tail with fresh's head keeps the M first pairs as a bitonic sequence, which
// log2(M) half-cleaner passes sort.
template <int M, int N>
__device__ __forceinline__ void merge_sorted_pairs(pair_t* best, const pair_t* fresh) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    best[M - 1 - i] = pair_first(fresh[i], best[M - 1 - i]) ? fresh[i] : best[M - 1 - i];
  }
#pragma unroll
  for (int stride = M >> 1; stride > 0; stride >>= 1) {
#pragma unroll
    for (int i = 0; i < M; ++i) {
      if ((i & stride) == 0) {
        order_two(best[i], best[i + stride]);
      }
    }
  }
}

// ---- what the lane lists share: offering a pair, merging the lanes' lists, the weights ----

// Offers pair p to a lane's sorted list best[0..M): it enters when it comes before the last
// kept pair, and sinks (at each place the earlier of the two stays, the other moves on).
template <int M, class P>
__device__ __forceinline__ void offer_pair(P* best, P p) {
  if (!pair_first(p, best[M - 1])) {
    return;
  }
#pragma unroll
  for (int j = 0; j < M; ++j) {
    order_two(best[j], p);
  }
}

// Merges a team's sorted lists: round r takes the first of the lanes' first pairs (a
// butterfly over the team) and the lane that held it pops it (a lane's list holds an expert
// once; `expert_of` reads a pair's expert). Afterwards every lane's best[0..k) holds the
// token's k best pairs in order.
template <int M, class P, class ExpertOf>
__device__ __forceinline__ void merge_team_lists(P* best, int k, int lanes, unsigned team_mask, P empty,
                                                 ExpertOf expert_of) {
  P chosen[M];
#pragma unroll
  for (int r = 0; r < M; ++r) {
    chosen[r] = empty;
    if (r < k) {
      P winner = best[0];
      for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
        const P other = lanes_xor(winner, offset, team_mask);
        winner = pair_first(other, winner) ? other : winner;
      }
      chosen[r] = winner;
      const bool pop = expert_of(best[0]) == expert_of(winner);
#pragma unroll
      for (int j = 0; j + 1 < M; ++j) {
        best[j] = pop ? best[j + 1] : best[j];
      }
      best[M - 1] = pop ? empty : best[M - 1];
    }
  }
#pragma unroll
  for (int j = 0; j < M; ++j) {
    best[j] = chosen[j];
  }
}

// The weights value[0..k) of the chosen logits logit[0..k) (slots past k are ignored), as
// route_token computes them: normalised softmax over the chosen (from their largest,
// chosen_max()); softmax over the row (its largest logit row_max, and row_sum(), the sum of
// its exponentials); sigmoid scores, normalised by their sum + 1e-20 or not. Then the scale.
// chosen_max and row_sum are called only where they are needed.
template <int M, class ChosenMax, class RowSum>
__device__ __forceinline__ void chosen_weights(const acc_t* logit, int k, int sigmoid, int normalize,
                                               acc_t scale, ChosenMax chosen_max_of, acc_t row_max,
                                               RowSum row_sum, acc_t* value) {
  if (!sigmoid && normalize) {
    const acc_t chosen_max = chosen_max_of();
    acc_t total = acc_t(0);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      value[j] = exp_acc(sub_rn(logit[j], chosen_max));
      total = j < k ? add_rn(total, value[j]) : total;
    }
#pragma unroll
    for (int j = 0; j < M; ++j) {
      value[j] = mul_rn(div_rn(value[j], total), scale);
    }
  } else if (!sigmoid) {
    const acc_t sum = row_sum();
#pragma unroll
    for (int j = 0; j < M; ++j) {
      value[j] = mul_rn(div_rn(exp_acc(sub_rn(logit[j], row_max)), sum), scale);
    }
  } else {
    acc_t total = acc_t(0);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      value[j] = div_rn(acc_t(1), add_rn(acc_t(1), exp_acc(-logit[j])));
      total = j < k ? add_rn(total, value[j]) : total;
    }
    total = add_rn(total, acc_t(1e-20));
#pragma unroll
    for (int j = 0; j < M; ++j) {
      value[j] = mul_rn(normalize ? div_rn(value[j], total) : value[j], scale);
    }
  }
}

// ---- a few lanes per token: selection by logit (no expert_bias, no group limit) ------------
// A team of `lanes` threads (1, 2, 4, 8, 16 or 32, aligned within the warp) routes one token.
// Lane l reads its share of the row in expert order (16-byte words l, l + lanes, ... when
// aligned, else experts l, l + lanes, ...) and keeps its M best pairs sorted in selection
// order in registers: a new pair enters only when it comes before the last kept one, and
// sinks into place. M >= k is a compile-time size (2, 4, 8 or 16), so the list never leaves
// registers; slots past k are ignored. The token's k best pairs are among the lanes' M best,
// so k merge rounds follow, each a butterfly over the lanes' first pairs: every lane learns
// the round's winner, and the lane that held it moves on to its next pair. One lane reads a
// whole row without a shuffle; more lanes per token keep more of the GPU busy when tokens are
// few, at the price of the merge (k rounds of log2(lanes) shuffles). The selection and the
// weights of the k chosen logits do not depend on the number of lanes; only the softmax
// denominator without normalisation is summed in a lane-dependent order (within an ulp).

// The softmax denominator of a team's row: exp(row[e] - row_max) summed by each lane over its
// experts e = lane, lane + lanes, ... in order, then over the lanes by a butterfly (the same
// bits in every lane).
__device__ __forceinline__ acc_t team_exp_sum(const elem_t* row, int num_experts, acc_t row_max, int lanes, int lane,
                                              unsigned team_mask) {
  acc_t sum = acc_t(0);
  for (int e = lane; e < num_experts; e += lanes) {
    sum = add_rn(sum, exp_acc(sub_rn(to_acc(row[e]), row_max)));
  }
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
    sum = add_rn(sum, lanes_xor(sum, offset, team_mask));
  }
  return sum;
}

template <int M>
__device__ __forceinline__ void route_token_team(const elem_t* row, int num_experts, int k, int sigmoid,
                                                 int normalize, acc_t scale, int vectorized, int lanes,
                                                 int lane, unsigned team_mask, acc_t* weights,
                                                 i64* experts, int* errors) {
  pair_t best[M];
#pragma unroll
  for (int j = 0; j < M; ++j) {
    best[j] = empty_pair();
  }
  int finite = 1;
  auto offer = [&](elem_t value, int e) {
    finite &= is_finite(to_acc(value)) ? 1 : 0;
    offer_pair<M>(best, make_pair(value, e));
  };
  constexpr int per_word = 16 / static_cast<int>(sizeof(elem_t));
  union Word {
    uint4 bits;
    elem_t values[per_word];
  };
  // A whole word: with room for it in the list (M >= per_word), its pairs are sorted by a
  // network and merged into the list, a fixed, branch-free sequence of min/max steps, unless
  // its first pair would not enter; else pair by pair.
  auto offer_word = [&](const Word& word, int base) {
    if constexpr (M >= per_word) {
      pair_t fresh[per_word];
      pair_t top = empty_pair();
#pragma unroll
      for (int i = 0; i < per_word; ++i) {
        finite &= is_finite(to_acc(word.values[i])) ? 1 : 0;
        fresh[i] = make_pair(word.values[i], base + i);
        top = pair_first(fresh[i], top) ? fresh[i] : top;
      }
      if (!pair_first(top, best[M - 1])) {
        return;
      }
      sort_pairs<per_word>(fresh);
      merge_sorted_pairs<M, per_word>(best, fresh);
    } else {
#pragma unroll
      for (int i = 0; i < per_word; ++i) {
        offer(word.values[i], base + i);
      }
    }
  };
  if (vectorized) {
    // Two words in flight per lane: the second load is issued before the first word's offers.
    const uint4* words = reinterpret_cast<const uint4*>(row);
    const int num_words = num_experts / per_word;
    for (int w = lane; w < num_words; w += 2 * lanes) {
      const int w2 = w + lanes;
      Word first;
      Word second;
      first.bits = words[w];
      if (w2 < num_words) {
        second.bits = words[w2];
      }
      offer_word(first, w * per_word);
      if (w2 < num_words) {
        offer_word(second, w2 * per_word);
      }
    }
  } else {
    for (int e = lane; e < num_experts; e += lanes) {
      offer(row[e], e);
    }
  }
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
    finite &= lanes_xor(finite, offset, team_mask);
  }
  if (!finite) {
    leave_unrouted(experts, weights, k, lane, lanes, errors);
    return;
  }
  if (lanes > 1) {
    merge_team_lists<M>(best, k, lanes, team_mask, empty_pair(), [](pair_t p) { return pair_expert(p); });
  }
  acc_t key[M];
#pragma unroll
  for (int j = 0; j < M; ++j) {
    key[j] = j < k ? pair_logit(best[j]) : acc_t(0);
  }
  // key[0] is the largest chosen logit, and the row's largest. The softmax over all experts
  // takes a second pass for its sum.
  auto row_sum = [&]() -> acc_t { return team_exp_sum(row, num_experts, key[0], lanes, lane, team_mask); };
  acc_t value[M];
  chosen_weights<M>(key, k, sigmoid, normalize, scale, [&] { return key[0]; }, key[0], row_sum, value);
  // Lane l writes slots l, l + lanes, ...
#pragma unroll
  for (int j = 0; j < M; ++j) {
    if (j < k && j % lanes == lane) {
      experts[j] = pair_expert(best[j]);
      weights[j] = value[j];
    }
  }
}

// ---- a few lanes per token, keyed: selection by score (plus a bias), no group limit --------
// route_token_team's scheme over keys instead of logits, for a selection bias without a group
// limit (or one group: the same selection). A first pass checks the row (and the bias) and,
// for softmax scores, finds the row's largest logit and sums its exponentials (each lane its
// experts in order, then a butterfly: the same bits in every lane); a second computes each key
// as route_token does and keeps the lane's M best (key, expert) pairs sorted in registers; k
// merge rounds follow. The weights come from the chosen experts' logits, as route_token's do:
// the keys only select.
template <int M>
__device__ __forceinline__ void route_token_team_keyed(const elem_t* row, const acc_t* bias, int num_experts,
                                                       int k, int sigmoid, int normalize, acc_t scale,
                                                       int lanes, int lane, unsigned team_mask,
                                                       acc_t* weights, i64* experts, int* errors) {
  int finite = 1;
  acc_t row_max = neg_infinity<acc_t>();
  for (int e = lane; e < num_experts; e += lanes) {
    const acc_t v = to_acc(row[e]);
    finite &= is_finite(v) && (bias == nullptr || is_finite(bias[e])) ? 1 : 0;
    row_max = v > row_max ? v : row_max;
  }
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
    finite &= lanes_xor(finite, offset, team_mask);
    const acc_t other = lanes_xor(row_max, offset, team_mask);
    row_max = other > row_max ? other : row_max;
  }
  if (!finite) {
    leave_unrouted(experts, weights, k, lane, lanes, errors);
    return;
  }
  const acc_t row_sum = sigmoid ? acc_t(1) : team_exp_sum(row, num_experts, row_max, lanes, lane, team_mask);

  key_pair_t best[M];
#pragma unroll
  for (int j = 0; j < M; ++j) {
    best[j] = empty_key_pair();
  }
  for (int e = lane; e < num_experts; e += lanes) {
    const acc_t v = to_acc(row[e]);
    const acc_t score = sigmoid ? div_rn(acc_t(1), add_rn(acc_t(1), exp_acc(-v)))
                                : div_rn(exp_acc(sub_rn(v, row_max)), row_sum);
    offer_pair<M>(best, make_key_pair(bias != nullptr ? add_rn(score, bias[e]) : score, e));
  }
  if (lanes > 1) {
    merge_team_lists<M>(best, k, lanes, team_mask, empty_key_pair(),
                        [](key_pair_t p) { return key_pair_expert(p); });
  }
  // The chosen experts' logits (every lane holds all k). The bias may have put a smaller one
  // first: their largest is searched.
  acc_t logit[M];
#pragma unroll
  for (int j = 0; j < M; ++j) {
    logit[j] = j < k ? to_acc(row[key_pair_expert(best[j])]) : acc_t(0);
  }
  auto chosen_max = [&]() -> acc_t {
    acc_t largest = logit[0];
#pragma unroll
    for (int j = 1; j < M; ++j) {
      largest = j < k && logit[j] > largest ? logit[j] : largest;
    }
    return largest;
  };
  acc_t value[M];
  chosen_weights<M>(logit, k, sigmoid, normalize, scale, chosen_max, row_max, [&] { return row_sum; }, value);
  // Lane l writes slots l, l + lanes, ...
#pragma unroll
  for (int j = 0; j < M; ++j) {
    if (j < k && j % lanes == lane) {
      experts[j] = key_pair_expert(best[j]);
      weights[j] = value[j];
    }
  }
}

// ---- the keyed route's selection from the warp's key cache --------------------------------
// route_token's k selection rounds, for a warp whose keys are cached and k <= M: each lane
// keeps its M best (key, expert) pairs of experts lane, lane + 32, ... sorted in registers (as
// the lane-team kernel does with logits), and k butterfly rounds over the lanes' first pairs
// take the token's k best in selection order; the winner's lane pops it. Slot r is written by
// lane r % 32 with the chosen expert's logit, as the rounds leave it.
template <int M>
__device__ void select_cached_keys(const acc_t* keys, const elem_t* row, int num_experts, int k, int lane,
                                   acc_t* weights, i64* experts) {
  key_pair_t best[M];
#pragma unroll
  for (int j = 0; j < M; ++j) {
    best[j] = empty_key_pair();
  }
  for (int e = lane; e < num_experts; e += 32) {
    offer_pair<M>(best, make_key_pair(keys[e], e));
  }
  for (int r = 0; r < k; ++r) {
    key_pair_t winner = best[0];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const key_pair_t other = lanes_xor(winner, offset, SR_FULL_MASK);
      winner = pair_first(other, winner) ? other : winner;
    }
    const int expert = key_pair_expert(winner);
    const bool pop = key_pair_expert(best[0]) == expert;
#pragma unroll
    for (int j = 0; j + 1 < M; ++j) {
      best[j] = pop ? best[j + 1] : best[j];
    }
    best[M - 1] = pop ? empty_key_pair() : best[M - 1];
    if (lane == r % 32) {
      // At least k keys are finite (route_token), so the winner is always a real expert.
      experts[r] = expert;
      weights[r] = to_acc(row[expert]);
    }
  }
}

}  // namespace

// ---- entry points: grids are (ceil(T / 4)) blocks of 128 threads (warp teams) or (T) blocks
// ---- of 256 threads (block teams).

#define SR_GATING_PARAMS                                                                        \
  const elem_t *logits, i64 num_tokens, int num_experts, int k, int sigmoid, int normalize,     \
      const acc_t *bias, int num_groups, int topk_groups, int group_score_k,                    \
      acc_t *group_scores, double scale, acc_t *weights, i64 *experts, int *errors
#define SR_GATING_ARGS                                                                          \
  GatingArgs{logits, num_tokens, num_experts, k, sigmoid, normalize, bias, num_groups,          \
             topk_groups, group_score_k, group_scores, static_cast<acc_t>(scale), weights,      \
             experts, errors}

extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_warp(SR_GATING_PARAMS) {
  __shared__ Scratch<32> scratch[4];
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + warp;
  __shared__ acc_t key_cache[4][kKeyCacheExperts];
  if (t >= num_tokens) {
    return;
  }
  // (E <= kKeyCacheExperts: the host sends larger rows to sr_topk_gating_block.)
  acc_t* keys = num_experts <= kKeyCacheExperts ? key_cache[warp] : nullptr;
  route_token<32>(SR_GATING_ARGS, t, static_cast<int>(threadIdx.x & 31), scratch[warp], keys);
}

extern "C" __global__ void __launch_bounds__(256) sr_topk_gating_block(SR_GATING_PARAMS) {
  __shared__ Scratch<256> scratch;
  const i64 t = static_cast<i64>(blockIdx.x);
  if (t >= num_tokens) {
    return;
  }
  route_token<256>(SR_GATING_ARGS, t, static_cast<int>(threadIdx.x), scratch, nullptr);
}

#define SR_BACKWARD_PARAMS                                                                     \
  const elem_t *logits, i64 num_tokens, int num_experts, int k, const i64 *experts,            \
      const acc_t *grad_weights, int sigmoid, int normalize, double scale, elem_t *grad_logits, \
      int *errors
#define SR_BACKWARD_ARGS                                                                       \
  BackwardArgs{logits, num_tokens, num_experts, k, experts, grad_weights, sigmoid, normalize,  \
               static_cast<acc_t>(scale), grad_logits, errors}

extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_backward_warp(SR_BACKWARD_PARAMS) {
  __shared__ Scratch<32> scratch[4];
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const i64 t = static_cast<i64>(blockIdx.x) * 4 + warp;
  if (t >= num_tokens) {
    return;
  }
  backward_token<32>(SR_BACKWARD_ARGS, t, static_cast<int>(threadIdx.x & 31), scratch[warp]);
}

extern "C" __global__ void __launch_bounds__(256) sr_topk_gating_backward_block(SR_BACKWARD_PARAMS) {
  __shared__ Scratch<256> scratch;
  const i64 t = static_cast<i64>(blockIdx.x);
  if (t >= num_tokens) {
    return;
  }
  backward_token<256>(SR_BACKWARD_ARGS, t, static_cast<int>(threadIdx.x), scratch);
}

// ---- entry points of the lane-team kernel: 128-thread blocks of 128 / lanes tokens; the
// ---- suffix is M (the smallest of 2, 4, 8, 16 that is at least k). `lanes` is a power of two
// ---- up to 32.

#define SR_TEAM_PARAMS                                                                       \
  const elem_t *logits, i64 num_tokens, int num_experts, int k, int sigmoid, int normalize,  \
      double scale, int vectorized, int lanes, acc_t *weights, i64 *experts, int *errors
// The team of this thread: its lane, its token t, and the mask of its lanes within the warp.
#define SR_TEAM_PROLOGUE                                                                     \
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);                              \
  const i64 t = static_cast<i64>(blockIdx.x) * (blockDim.x / lanes) + threadIdx.x / lanes;  \
  if (t >= num_tokens) {                                                                     \
    return; /* the whole team: its lanes share t */                                          \
  }                                                                                          \
  const unsigned team_mask =                                                                 \
      lanes == 32 ? SR_FULL_MASK : ((1u << lanes) - 1u) << ((threadIdx.x & 31) & ~(lanes - 1));
#define SR_TEAM_BODY(M)                                                                      \
  SR_TEAM_PROLOGUE                                                                           \
  route_token_team<M>(logits + t * num_experts, num_experts, k, sigmoid, normalize,          \
                      static_cast<acc_t>(scale), vectorized, lanes, lane, team_mask,         \
                      weights + t * k, experts + t * k, errors);

extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_team2(SR_TEAM_PARAMS) { SR_TEAM_BODY(2) }
extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_team4(SR_TEAM_PARAMS) { SR_TEAM_BODY(4) }
extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_team8(SR_TEAM_PARAMS) { SR_TEAM_BODY(8) }
extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_team16(SR_TEAM_PARAMS) { SR_TEAM_BODY(16) }

// The keyed lane teams (route_token_team_keyed): `bias` [E] or null (one group, no bias).
#define SR_KEYED_TEAM_PARAMS                                                                 \
  const elem_t *logits, i64 num_tokens, int num_experts, int k, int sigmoid, int normalize,  \
      const acc_t *bias, double scale, int lanes, acc_t *weights, i64 *experts, int *errors
#define SR_KEYED_TEAM_BODY(M)                                                                \
  SR_TEAM_PROLOGUE                                                                           \
  route_token_team_keyed<M>(logits + t * num_experts, bias, num_experts, k, sigmoid, normalize, \
                            static_cast<acc_t>(scale), lanes, lane, team_mask, weights + t * k, \
                            experts + t * k, errors);

extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_keyed_team2(SR_KEYED_TEAM_PARAMS) {
  SR_KEYED_TEAM_BODY(2)
}
extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_keyed_team4(SR_KEYED_TEAM_PARAMS) {
  SR_KEYED_TEAM_BODY(4)
}
extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_keyed_team8(SR_KEYED_TEAM_PARAMS) {
  SR_KEYED_TEAM_BODY(8)
}
extern "C" __global__ void __launch_bounds__(128) sr_topk_gating_keyed_team16(SR_KEYED_TEAM_PARAMS) {
  SR_KEYED_TEAM_BODY(16)
}
