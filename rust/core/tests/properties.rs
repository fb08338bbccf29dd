//! Property tests of the core kernels against naive implementations of the same rules.

use proptest::prelude::*;
use sparseroute_core::dispatch::{build_plan, combine_rows, gather_rows, PlanBuffers};
use sparseroute_core::gating::{topk_gating, GatingConfig, GroupLimit, ScoreFunction};
use sparseroute_core::threads;

/// The k best indices by (key descending, index ascending).
fn naive_top_k(keys: &[f32], k: usize) -> Vec<i64> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[b].partial_cmp(&keys[a]).unwrap().then(a.cmp(&b)));
    order[..k].iter().map(|&i| i as i64).collect()
}

fn gating_case() -> impl Strategy<Value = (usize, usize, usize, Vec<f32>)> {
    (1usize..300, 0usize..40).prop_flat_map(|(experts, tokens)| {
        let k = 1..=experts.min(16);
        // Small integers: many exact ties.
        let logits = proptest::collection::vec((-3i32..4).prop_map(|v| v as f32), tokens * experts);
        (Just(experts), k, Just(tokens), logits)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn gating_chooses_the_best_keys_with_lower_index_on_ties((experts, k, tokens, logits) in gating_case(), threads in 1usize..4) {
        let cfg = GatingConfig { num_experts: experts, k, score: ScoreFunction::Softmax, normalize: true, groups: None, scale: 1.0 };
        let mut weights = vec![0.0f32; tokens * k];
        let mut ids = vec![0i64; tokens * k];
        threads::run(threads, usize::MAX, || topk_gating(&logits, tokens, None, &cfg, &mut weights, &mut ids)).unwrap();
        for t in 0..tokens {
            let row = &logits[t * experts..(t + 1) * experts];
            prop_assert_eq!(&ids[t * k..(t + 1) * k], &naive_top_k(row, k)[..]);
            let total: f32 = weights[t * k..(t + 1) * k].iter().sum();
            prop_assert!((total - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn group_limited_choices_stay_in_the_best_groups((experts, k, tokens, logits) in gating_case()) {
        let num_groups = (1..=experts).rev().find(|g| experts % g == 0 && experts / g >= 2).unwrap_or(1);
        let group_size = experts / num_groups;
        let topk_groups = k.div_ceil(group_size).max(1).min(num_groups);
        let cfg = GatingConfig {
            num_experts: experts, k, score: ScoreFunction::Sigmoid, normalize: true,
            groups: Some(GroupLimit { num_groups, topk_groups, score_k: 1 + tokens % 3 }), scale: 1.0,
        };
        let mut weights = vec![0.0f32; tokens * k];
        let mut ids = vec![0i64; tokens * k];
        topk_gating(&logits, tokens, None, &cfg, &mut weights, &mut ids).unwrap();
        for t in 0..tokens {
            let groups: std::collections::BTreeSet<i64> = ids[t * k..(t + 1) * k].iter().map(|&e| e / group_size as i64).collect();
            prop_assert!(groups.len() <= topk_groups);
            let mut distinct = ids[t * k..(t + 1) * k].to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), k);
        }
    }

    #[test]
    fn plan_is_a_stable_sort_and_round_trips(
        (tokens, k, experts, ids) in (0usize..200, 1usize..6, 1usize..50).prop_flat_map(|(t, k, e)| {
            (Just(t), Just(k), Just(e), proptest::collection::vec(-1i64..e as i64, t * k))
        }),
        threads in 1usize..4,
        block_size in prop_oneof![Just(1usize), 2usize..9],
    ) {
        let mut tpe = vec![0; experts];
        let mut offsets = vec![0; experts + 1];
        // The most rows a plan can take: every expert's last block one row short of full.
        let mut row_to_slot = vec![0; tokens * k + experts * (block_size - 1)];
        let mut slot_to_row = vec![0; tokens * k];
        let rows = threads::run(threads, usize::MAX, || build_plan(&ids, k, experts, block_size, PlanBuffers {
            tokens_per_expert: &mut tpe, offsets: &mut offsets, row_to_slot: &mut row_to_slot, slot_to_row: &mut slot_to_row,
        })).unwrap();
        prop_assert_eq!(rows as i64, offsets[experts]);
        // Each expert: whole blocks from a block boundary, its slots in slot order first,
        // then padding; nothing past the plan.
        for e in 0..experts {
            let mine: Vec<i64> = (0..ids.len()).filter(|&s| ids[s] == e as i64).map(|s| s as i64).collect();
            let (start, end) = (offsets[e] as usize, offsets[e + 1] as usize);
            prop_assert_eq!(start % block_size, 0);
            prop_assert_eq!(end - start, mine.len().div_ceil(block_size) * block_size);
            prop_assert_eq!(tpe[e] as usize, mine.len());
            prop_assert_eq!(&row_to_slot[start..start + mine.len()], &mine[..]);
            prop_assert!(row_to_slot[start + mine.len()..end].iter().all(|&s| s == -1));
        }
        prop_assert!(row_to_slot[rows..].iter().all(|&s| s == -1));
        // Gather then combine (k = 1 per row, weight 1) gives each token times its slot count.
        let x: Vec<f32> = (0..tokens * 3).map(|v| v as f32).collect();
        let mut sorted = vec![0.0f32; row_to_slot.len() * 3];
        gather_rows(&x, 3, &row_to_slot, k, None, &mut sorted).unwrap();
        let mut back = vec![0.0f32; tokens * 3];
        combine_rows(&sorted, 3, &slot_to_row, k, None, &mut back).unwrap();
        for t in 0..tokens {
            let count = ids[t * k..(t + 1) * k].iter().filter(|&&e| e >= 0).count() as f32;
            for c in 0..3 {
                prop_assert_eq!(back[t * 3 + c], x[t * 3 + c] * count);
            }
        }
    }
}
