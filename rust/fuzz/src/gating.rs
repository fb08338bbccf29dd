//! Top-k gating, forward and backward, against a float64 reference of docs/semantics.md.
//!
//! Selection: without a bias or group limit the keys are the logits, which the reference
//! compares exactly, so the experts must be the reference's. With either, the keys are
//! float32 scores (plus bias), whose last bits the reference cannot reproduce; the experts
//! must then be a valid choice once keys (and group scores) within the kernel's rounding of
//! each other count as equal, and keys computed from identical (logit, bias) pairs must
//! still be ordered by expert index. Weights and gradients: the reference's within a
//! tolerance of the accumulator's and the storage type's rounding.

use crate::input::{with_element_type, Input};
use crate::reference::{acc, f64_of, scores, sum, Storage};
use num_traits::Float;
use sparseroute_core::gating::{topk_gating, topk_gating_backward, GatingConfig, GroupLimit, ScoreFunction};
use sparseroute_core::{threads, Element};

pub fn gating(bytes: &[u8]) {
    let mut input = Input::new(bytes);
    let element_type = input.below(4);
    with_element_type!(element_type, check(&mut input));
}

struct Case<L: Element> {
    cfg: GatingConfig,
    tokens: usize,
    logits: Vec<L>,
    bias: Option<Vec<L::Acc>>,
    threads: usize,
}

fn draw<L: Storage>(input: &mut Input) -> Case<L> {
    // Odd and prime expert counts as often as powers of two; up to 300 crosses the
    // kernels' switch to AVX-512 selection (128) and the block-wise softmax.
    let num_experts = match input.below(4) {
        0 => input.between(1, 9),
        1 => [16, 32, 60, 64, 128, 160, 256][input.below(7)],
        _ => input.between(1, 300),
    };
    let groups = if input.below(3) == 0 {
        let divisors: Vec<usize> = (1..=num_experts).filter(|g| num_experts.is_multiple_of(*g)).collect();
        let num_groups = divisors[input.below(divisors.len())];
        let topk_groups = input.between(1, num_groups);
        Some(GroupLimit { num_groups, topk_groups, score_k: input.between(1, 4) })
    } else {
        None
    };
    let reachable = groups.map_or(num_experts, |g| g.topk_groups * (num_experts / g.num_groups));
    let k = if input.bool() { input.between(1, reachable.min(17)) } else { input.between(1, reachable) };
    let score = if input.bool() { ScoreFunction::Softmax } else { ScoreFunction::Sigmoid };
    let normalize = input.bool();
    let scale = [1.0, 2.5, -1.0, 0.0, 1e-3, 16.0][input.below(6)];
    let tokens = input.between(0, 19);
    let raw_bits = input.below(8) == 0;
    let logits = (0..tokens * num_experts).map(|_| input.element(raw_bits)).collect();
    let bias =
        input.bool().then(|| (0..num_experts).map(|_| acc(f64::from(input.value(raw_bits) / 8.0))).collect());
    let cfg = GatingConfig { num_experts, k, score, normalize, groups, scale };
    Case { cfg, tokens, logits, bias, threads: input.between(1, 3) }
}

fn check<L: Storage>(input: &mut Input) {
    let case = draw::<L>(input);
    let (e, k, t) = (case.cfg.num_experts, case.cfg.k, case.tokens);
    let mut weights = vec![L::Acc::nan(); t * k];
    let mut experts = vec![i64::MIN; t * k];
    let result = threads::run(case.threads, usize::MAX, || {
        topk_gating(&case.logits, t, case.bias.as_deref(), &case.cfg, &mut weights, &mut experts)
    });
    let logits: Vec<f64> = case.logits.iter().map(|&v| f64_of(v.to_acc())).collect();
    let bias: Option<Vec<f64>> = case.bias.as_ref().map(|b| b.iter().map(|&v| f64_of(v)).collect());
    let refused = logits.iter().chain(bias.iter().flatten()).any(|v| !v.is_finite());
    match result {
        Err(error) => {
            assert!(refused, "refused finite input: {error}");
            return;
        }
        Ok(()) => assert!(!refused, "accepted NaN or infinite logits or bias"),
    }
    let acc_eps = f64_of(L::Acc::epsilon());
    let mut grad_weights = Vec::with_capacity(t * k);
    for token in 0..t {
        let row = &logits[token * e..(token + 1) * e];
        let chosen: Vec<usize> = experts[token * k..(token + 1) * k]
            .iter()
            .map(|&id| usize::try_from(id).ok().filter(|&id| id < e).expect("an expert id in [0, E)"))
            .collect();
        check_selection(&case.cfg, row, bias.as_deref(), &chosen, acc_eps);
        let expected = reference_weights(&case.cfg, row, &chosen);
        for (j, (&got, want)) in weights[token * k..(token + 1) * k].iter().zip(expected).enumerate() {
            let got = f64_of(got);
            let tol = 64.0 * acc_eps * want.abs() + 8.0 * acc_eps * case.cfg.scale.abs();
            assert!(
                (got - want).abs() <= tol,
                "token {token}, choice {j}: weight {got}, reference {want} (tolerance {tol})"
            );
        }
        grad_weights.extend((0..k).map(|_| f64::from(input.byte() as i8) / 16.0));
    }
    check_backward(&case, &logits, &experts, &grad_weights);
}

fn check_selection(cfg: &GatingConfig, row: &[f64], bias: Option<&[f64]>, chosen: &[usize], acc_eps: f64) {
    let e = cfg.num_experts;
    let mut distinct = chosen.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), chosen.len(), "an expert chosen twice: {chosen:?}");
    if bias.is_none() && cfg.groups.is_none() {
        // The logits are the keys: exact comparisons, equal logits to the lower index.
        let mut order: Vec<usize> = (0..e).collect();
        // (-0.0 and 0.0 are equal logits.)
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).expect("finite").then(a.cmp(&b)));
        assert_eq!(chosen, &order[..cfg.k], "experts of logits {row:?}");
        return;
    }
    let scores = scores(cfg.score, row);
    let bias_of = |i: usize| bias.map_or(0.0, |b| b[i]);
    let keys: Vec<f64> = (0..e).map(|i| scores[i] + bias_of(i)).collect();
    let largest_bias = bias.map_or(0.0, |b| b.iter().fold(0.0, |m: f64, v| m.max(v.abs())));
    // The kernel's keys: a float32 score (a few dozen roundings at most, from the softmax
    // sum) plus the bias, rounded once more.
    let key_tol = 64.0 * acc_eps * (1.0 + largest_bias);
    for pair in chosen.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(keys[a] >= keys[b] - key_tol, "experts {a} then {b}, keys {} < {}", keys[a], keys[b]);
        if row[a] == row[b] && bias_of(a) == bias_of(b) {
            assert!(a < b, "equal keys must go to the lower expert first: {a} before {b}");
        }
    }
    let lowest_chosen = chosen.iter().map(|&i| keys[i]).fold(f64::INFINITY, f64::min);
    let Some(groups) = cfg.groups else {
        for i in (0..e).filter(|i| !chosen.contains(i)) {
            assert!(keys[i] <= lowest_chosen + key_tol, "expert {i} left out with a better key");
        }
        return;
    };
    let size = e / groups.num_groups;
    let group_scores: Vec<f64> = keys
        .chunks(size)
        .map(|group| {
            let mut sorted = group.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sum(sorted.iter().take(groups.score_k).copied())
        })
        .collect();
    let largest_key = keys.iter().fold(0.0, |m: f64, v| m.max(v.abs()));
    let group_tol = groups.score_k as f64 * (key_tol + 4.0 * acc_eps * largest_key);
    let mut ranked = group_scores.clone();
    ranked.sort_by(|a, b| b.total_cmp(a));
    let cutoff = ranked[groups.topk_groups - 1];
    let mut used: Vec<usize> = chosen.iter().map(|&i| i / size).collect();
    used.sort_unstable();
    used.dedup();
    assert!(
        used.len() <= groups.topk_groups,
        "experts from {} groups, at most {}",
        used.len(),
        groups.topk_groups
    );
    for &g in &used {
        assert!(
            group_scores[g] >= cutoff - group_tol,
            "group {g} chosen below the cut ({} < {cutoff})",
            group_scores[g]
        );
    }
    for i in (0..e).filter(|i| !chosen.contains(i)) {
        if keys[i] > lowest_chosen + key_tol {
            // Only an excluded group may hold a better key than a chosen one.
            let g = i / size;
            assert!(
                !used.contains(&g) && group_scores[g] <= cutoff + group_tol,
                "expert {i} (group {g}) left out with a better key"
            );
        }
    }
}

/// The weights of docs/semantics.md step 5 for the kernel's choice, in float64.
fn reference_weights(cfg: &GatingConfig, row: &[f64], chosen: &[usize]) -> Vec<f64> {
    let normalised: Vec<f64> = match (cfg.score, cfg.normalize) {
        (ScoreFunction::Softmax, true) => {
            let max = chosen.iter().map(|&i| row[i]).fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = chosen.iter().map(|&i| (row[i] - max).exp()).collect();
            let total = sum(exps.iter().copied());
            exps.iter().map(|x| x / total).collect()
        }
        (ScoreFunction::Sigmoid, true) => {
            let s = scores(cfg.score, row);
            let total = sum(chosen.iter().map(|&i| s[i]));
            chosen.iter().map(|&i| s[i] / (total + 1e-20)).collect()
        }
        (_, false) => {
            let s = scores(cfg.score, row);
            chosen.iter().map(|&i| s[i]).collect()
        }
    };
    normalised.iter().map(|w| w * cfg.scale).collect()
}

/// The gradient of docs/semantics.md step 6 with respect to one token's logits, in float64.
fn reference_gradient(cfg: &GatingConfig, row: &[f64], chosen: &[usize], grad: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; row.len()];
    match (cfg.score, cfg.normalize) {
        (ScoreFunction::Softmax, true) => {
            let max = chosen.iter().map(|&i| row[i]).fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = chosen.iter().map(|&i| (row[i] - max).exp()).collect();
            let total = sum(exps.iter().copied());
            let u: Vec<f64> = exps.iter().map(|x| x / total).collect();
            let mean = sum(grad.iter().zip(&u).map(|(g, u)| g * u));
            for (j, &i) in chosen.iter().enumerate() {
                out[i] = u[j] * (grad[j] - mean);
            }
        }
        (ScoreFunction::Softmax, false) => {
            let s = scores(cfg.score, row);
            let mean = sum(chosen.iter().zip(grad).map(|(&i, g)| g * s[i]));
            for (i, out) in out.iter_mut().enumerate() {
                *out = -s[i] * mean;
            }
            for (j, &i) in chosen.iter().enumerate() {
                out[i] += s[i] * grad[j];
            }
        }
        (ScoreFunction::Sigmoid, normalize) => {
            let s = scores(cfg.score, row);
            let denominator = if normalize { sum(chosen.iter().map(|&i| s[i])) + 1e-20 } else { 1.0 };
            let mean = if normalize {
                sum(chosen.iter().zip(grad).map(|(&i, g)| g * s[i] / denominator))
            } else {
                0.0
            };
            for (j, &i) in chosen.iter().enumerate() {
                out[i] = s[i] * (1.0 - s[i]) * (grad[j] - mean) / denominator;
            }
        }
    }
    out.iter().map(|g| g * cfg.scale).collect()
}

fn check_backward<L: Storage>(case: &Case<L>, logits: &[f64], experts: &[i64], grad_weights: &[f64]) {
    let (e, k, t) = (case.cfg.num_experts, case.cfg.k, case.tokens);
    let grad: Vec<L::Acc> = grad_weights.iter().map(|&g| acc(g)).collect();
    let mut grad_logits = vec![L::from_acc(L::Acc::nan()); t * e];
    threads::run(case.threads, usize::MAX, || {
        topk_gating_backward(&case.logits, t, experts, &grad, &case.cfg, &mut grad_logits)
    })
    .expect("the backward of a forward's own experts");
    let acc_eps = f64_of(L::Acc::epsilon());
    for token in 0..t {
        let row = &logits[token * e..(token + 1) * e];
        let chosen: Vec<usize> = experts[token * k..(token + 1) * k].iter().map(|&i| i as usize).collect();
        let g = &grad_weights[token * k..(token + 1) * k];
        let largest = g.iter().fold(0.0, |m: f64, v| m.max(v.abs())) * case.cfg.scale.abs();
        let expected = reference_gradient(&case.cfg, row, &chosen, g);
        for (i, want) in expected.into_iter().enumerate() {
            let got = f64_of(grad_logits[token * e + i].to_acc());
            let tol = L::EPS * want.abs() + 64.0 * acc_eps * largest + L::TINY;
            assert!((got - want).abs() <= tol, "token {token}, expert {i}: gradient {got}, reference {want}");
        }
    }
}
