//! The load-balancing kernels against float64 references of docs/semantics.md ("Load
//! balancing", Sinkhorn): score sums, expert counts, the z-loss and its gradient, and
//! Sinkhorn's iteration, each with padding tokens masked out and groups of tokens.

use crate::input::{with_element_type, Input};
use crate::reference::{acc, f64_of, scores, sum, Storage};
use num_traits::Float;
use sparseroute_core::balance::{
    expert_counts, score_sums, sinkhorn, z_loss, z_loss_backward, Groups, Z_LOSS_STATS,
};
use sparseroute_core::gating::ScoreFunction;
use sparseroute_core::threads;

pub fn balance(bytes: &[u8]) {
    let mut input = Input::new(bytes);
    match input.below(5) {
        4 => check_sinkhorn(&mut input),
        element_type => with_element_type!(element_type, check(&mut input)),
    }
}

fn check<L: Storage>(input: &mut Input) {
    let num_experts = if input.bool() { input.between(1, 20) } else { input.between(1, 300) };
    let num_tokens = input.between(0, 40);
    let group_size = input.between(1, num_tokens.max(1) + 1);
    let mask: Option<Vec<u8>> = input.bool().then(|| (0..num_tokens).map(|_| input.byte() % 3).collect());
    let raw_bits = input.below(8) == 0;
    let logits: Vec<L> = (0..num_tokens * num_experts).map(|_| input.element(raw_bits)).collect();
    let threads = input.between(1, 3);
    let groups = Groups { num_tokens, group_size, mask: mask.as_deref() };
    let valid = |t: usize| mask.as_ref().is_none_or(|m| m[t] != 0);
    let rows: Vec<Vec<f64>> =
        logits.chunks(num_experts).map(|row| row.iter().map(|&v| f64_of(v.to_acc())).collect()).collect();
    let eps = f64_of(L::Acc::epsilon());
    // About E / 8 roundings of the lane sums, a few of each exp, log and division.
    let rounding = (16.0 + num_experts as f64 / 8.0) * eps;

    // Score sums: every valid row must be finite.
    let score = if input.bool() { ScoreFunction::Softmax } else { ScoreFunction::Sigmoid };
    let mut sums = vec![f64::NAN; groups.count() * num_experts];
    let result =
        threads::run(threads, usize::MAX, || score_sums(&logits, num_experts, score, groups, &mut sums));
    let refused = (0..num_tokens).any(|t| valid(t) && rows[t].iter().any(|v| !v.is_finite()));
    assert_eq!(result.is_err(), refused, "score sums: {result:?}");
    if !refused {
        let tiny = f64_of(L::Acc::min_positive_value());
        for g in 0..groups.count() {
            let members: Vec<usize> =
                (g * group_size..((g + 1) * group_size).min(num_tokens)).filter(|&t| valid(t)).collect();
            // Each token's normalised scores, and the most their tiniest values may be off: a
            // float32 score below the smallest normal number is a subnormal or, for sigmoid
            // (1 / (1 + exp(-l)) with exp(-l) past float32's range), 0.
            let normalised: Vec<(Vec<f64>, f64)> = members
                .iter()
                .map(|&t| {
                    let s = scores(score, &rows[t]);
                    let eps = if score == ScoreFunction::Sigmoid { 1e-20 } else { 0.0 };
                    let total = sum(s.iter().copied()) + eps;
                    (s.iter().map(|v| v / total).collect(), tiny / total)
                })
                .collect();
            for e in 0..num_experts {
                let want = sum(normalised.iter().map(|(p, _)| p[e]));
                let tol = rounding * want + sum(normalised.iter().map(|&(_, off)| off));
                let got = sums[g * num_experts + e];
                assert!(
                    (got - want).abs() <= tol,
                    "score sum of group {g}, expert {e}: {got}, reference {want}"
                );
            }
        }
    }

    // Expert counts: integers, exactly.
    let k = input.between(1, num_experts.min(8));
    let raw_ids = input.below(16) == 0;
    let experts: Vec<i64> = (0..num_tokens * k)
        .map(|_| match input.below(8) {
            0 => -1,
            7 if raw_ids => i64::from(input.u32() as i32),
            _ => input.below(num_experts) as i64,
        })
        .collect();
    let mut counts = vec![i64::MIN; groups.count() * num_experts];
    let result = expert_counts(&experts, k, num_experts, groups, &mut counts);
    let bad_id = (0..num_tokens)
        .filter(|&t| valid(t))
        .any(|t| experts[t * k..(t + 1) * k].iter().any(|&id| id < -1 || id >= num_experts as i64));
    assert_eq!(result.is_err(), bad_id, "expert counts: {result:?}");
    if !bad_id {
        let mut want = vec![0i64; groups.count() * num_experts];
        for t in (0..num_tokens).filter(|&t| valid(t)) {
            for &id in experts[t * k..(t + 1) * k].iter().filter(|&&id| id >= 0) {
                want[t / group_size * num_experts + id as usize] += 1;
            }
        }
        assert_eq!(counts, want, "expert counts");
    }

    check_z_loss::<L>(input, &logits, &rows, groups, threads, rounding);
}

fn check_z_loss<L: Storage>(
    input: &mut Input,
    logits: &[L],
    rows: &[Vec<f64>],
    groups: Groups<'_>,
    threads: usize,
    rounding: f64,
) {
    let num_tokens = groups.num_tokens;
    let num_experts = logits.len() / num_tokens.max(1);
    let valid = |t: usize| groups.mask.is_none_or(|m| m[t] != 0);
    let scale = [1.0, 0.5, 1e-3, 3.0][input.below(4)];
    let mut stats = vec![L::Acc::nan(); num_tokens * Z_LOSS_STATS];
    let result = threads::run(threads, usize::MAX, || {
        z_loss(logits, num_experts.max(1), groups, acc(scale), &mut stats)
    });
    // -inf is probability 0; NaN, +inf or a row of nothing but -inf has no finite z.
    let refused = num_experts > 0
        && (0..num_tokens).any(|t| {
            valid(t)
                && (rows[t].iter().any(|v| v.is_nan() || *v == f64::INFINITY)
                    || rows[t].iter().all(|v| *v == f64::NEG_INFINITY))
        });
    assert_eq!(result.is_err(), refused, "z-loss: {result:?}");
    if refused || num_experts == 0 {
        return;
    }
    let total = result.expect("accepted");
    let (mut want_total, mut total_tol) = (Vec::new(), 0.0);
    let grad = [1.0, -2.0, 0.125][input.below(3)];
    let exp_step = f64_of(L::Acc::min_positive_value()) * f64_of(L::Acc::epsilon());
    let mut gradient = vec![L::from_acc(L::Acc::nan()); logits.len()];
    z_loss_backward(logits, num_experts, &stats, grad, &mut gradient).expect("the forward's own stats");
    for t in 0..num_tokens {
        let (m, factor) = (f64_of(stats[t * Z_LOSS_STATS]), f64_of(stats[t * Z_LOSS_STATS + 1]));
        let out = &gradient[t * num_experts..(t + 1) * num_experts];
        if !valid(t) {
            assert_eq!((m, factor), (0.0, 0.0), "masked token {t}: stats");
            assert!(out.iter().all(|&g| f64_of(g.to_acc()) == 0.0), "masked token {t}: gradient");
            continue;
        }
        let row = &rows[t];
        let row_max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(m, row_max, "token {t}: the row's maximum");
        let exps: Vec<f64> = row.iter().map(|&l| (l - row_max).exp()).collect();
        let total_exp = sum(exps.iter().copied());
        let z = row_max + total_exp.ln();
        // The kernel's z: m rounded into the sum, and the log's and the sum's roundings.
        let z_tol = 4.0 * rounding * (row_max.abs() + 1.0);
        want_total.push(z * z);
        total_tol += 2.0 * z.abs() * z_tol + z_tol * z_tol;
        let want_factor = 2.0 * scale * z / total_exp;
        if (2.0 * scale * z).abs() > f64_of(L::Acc::max_value()) {
            // Past the accumulator's range (a z near float32's largest logits): the factor,
            // (2 * scale * z) / sum on CPU and GPU alike, overflows before its division, and
            // the gradient with it.
            assert_eq!(factor, want_factor.signum() * f64::INFINITY, "token {t}: factor");
            continue;
        }
        let factor_tol = rounding * want_factor.abs() + 2.0 * scale.abs() * z_tol / total_exp;
        assert!(
            (factor - want_factor).abs() <= factor_tol,
            "token {t}: factor {factor}, reference {want_factor}"
        );
        for (e, (&got, &x)) in out.iter().zip(&exps).enumerate() {
            let got = f64_of(got.to_acc());
            let want = x * want_factor * grad;
            // Where exp(l - m) is subnormal it is within one step of the accumulator's
            // smallest subnormal, which the factor scales.
            let tol = L::EPS * want.abs()
                + (x * (factor_tol + rounding * want_factor.abs()) + exp_step * want_factor.abs())
                    * grad.abs()
                + L::TINY;
            if want.abs() > L::MAX {
                // Rounds to the largest finite value or overflows, as the exact value would.
                assert!(got.abs() >= L::MAX && got.signum() == want.signum(), "token {t}, expert {e}: {got}");
                continue;
            }
            assert!((got - want).abs() <= tol, "token {t}, expert {e}: gradient {got}, reference {want}");
        }
    }
    let want = sum(want_total);
    assert!((total - want).abs() <= total_tol, "z-loss sum {total}, reference {want}");
}

/// Sinkhorn (float32), a fixed number of iterations against the same iteration in float64.
fn check_sinkhorn(input: &mut Input) {
    let num_experts = input.between(1, 70);
    let num_tokens = input.between(0, 600);
    let raw_bits = input.below(8) == 0;
    let logits: Vec<f32> = (0..num_tokens * num_experts).map(|_| input.value(raw_bits)).collect();
    let iterations = input.between(0, 5);
    let mut out = vec![f32::NAN; logits.len()];
    let result = sinkhorn(&logits, num_tokens, num_experts, 0.0, Some(iterations), &mut out);
    // exp(logit) must stay finite in float32.
    let refused = num_tokens > 0 && logits.iter().any(|l| l.is_nan() || *l > 88.0);
    assert_eq!(result.is_err(), refused, "sinkhorn: {result:?}");
    if refused || num_tokens == 0 {
        return;
    }
    let done = result.expect("accepted");
    assert!(done <= iterations, "{done} iterations, at most {iterations}");
    // Megatron-Core's iteration is itself fragile where costs span float32's range (sums
    // overflow, products underflow): compare only moderate logits.
    if logits.iter().any(|l| !(-60.0..=30.0).contains(l)) {
        return;
    }
    let cost: Vec<f64> = logits.iter().map(|&l| f64::from(l).exp()).collect();
    let (t_inv, e_inv) = (1.0 / num_tokens as f64, 1.0 / num_experts as f64);
    let (mut d0, mut d1) = (vec![1.0; num_tokens], vec![1.0; num_experts]);
    for _ in 0..done {
        for t in 0..num_tokens {
            let row = &cost[t * num_experts..(t + 1) * num_experts];
            d0[t] = t_inv / (sum(row.iter().zip(&d1).map(|(c, d)| c * d)) + 1e-8);
        }
        for e in 0..num_experts {
            d1[e] = e_inv / (sum((0..num_tokens).map(|t| d0[t] * cost[t * num_experts + e])) + 1e-8);
        }
    }
    let eps = f64::from(f32::EPSILON);
    let tol = 8.0 * (done as f64 + 1.0) * (num_experts as f64 / 8.0 + num_tokens as f64 / 4.0 + 16.0) * eps;
    for (i, &got) in out.iter().enumerate() {
        let want = d1[i % num_experts] * cost[i] * d0[i / num_experts];
        let got = f64::from(got);
        assert!(
            (got - want).abs() <= tol * want + 1e-37,
            "score of token {}, expert {}: {got}, reference {want} after {done} iterations",
            i / num_experts,
            i % num_experts
        );
    }
}
