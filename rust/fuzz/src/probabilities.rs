//! The softmax probabilities and the routing decided on them: top-k gating's unnormalised
//! weights (k = E), expert choice and top-p. The probabilities must be within the kernels'
//! rounding of a float64 softmax, and the same bits in all three ops ("the same softmax
//! serves topp_gating and expert_choice", docs/semantics.md). Given those bits, expert
//! choice's and top-p's decisions are exact rules, which the reference replays in the
//! accumulator type: their outputs must be the reference's bit for bit.

use crate::input::{with_element_type, Input};
use crate::reference::{f64_of, Storage};
use num_traits::{Float, Zero};
use sparseroute_core::gating::{
    expert_choice, topk_gating, topp_gating, GatingConfig, ScoreFunction, TopPConfig,
};
use sparseroute_core::{threads, Accumulator};

pub fn probabilities(bytes: &[u8]) {
    let mut input = Input::new(bytes);
    let element_type = input.below(4);
    with_element_type!(element_type, check(&mut input));
}

fn check<L: Storage>(input: &mut Input) {
    let num_experts = match input.below(3) {
        0 => input.between(1, 9),
        1 => [16, 17, 60, 64, 65, 128, 160, 256][input.below(8)],
        _ => input.between(1, 300),
    };
    let tokens = input.between(0, 40);
    let raw_bits = input.below(8) == 0;
    let logits: Vec<L> = (0..tokens * num_experts).map(|_| input.element(raw_bits)).collect();
    let threads = input.between(1, 3);
    let refused = logits.iter().any(|v| !v.to_acc().is_finite());

    // The probabilities, as top-k gating's unnormalised weights of every expert.
    let cfg = GatingConfig {
        num_experts,
        k: num_experts,
        score: ScoreFunction::Softmax,
        normalize: false,
        groups: None,
        scale: 1.0,
    };
    let mut ranked = vec![L::Acc::nan(); tokens * num_experts];
    let mut order = vec![-1i64; tokens * num_experts];
    let result = threads::run(threads, usize::MAX, || {
        topk_gating(&logits, tokens, None, &cfg, &mut ranked, &mut order)
    });
    assert_eq!(result.is_err(), refused, "top-k gating: {result:?}");
    let mut probs = vec![L::Acc::nan(); tokens * num_experts];
    if !refused {
        for (slot, &e) in order.iter().enumerate() {
            probs[slot / num_experts * num_experts + e as usize] = ranked[slot];
        }
        check_accuracy::<L>(&logits, num_experts, &probs);
    }
    let case = Case { logits: &logits, tokens, num_experts, probs: &probs, refused, threads };
    check_expert_choice(input, &case);
    check_topp(input, &case);
}

/// The call both decisions are checked on: `[T, E]` logits and their probabilities (NaN
/// where `refused`: the logits hold NaN or an infinity).
#[derive(Clone, Copy)]
struct Case<'a, L: Storage> {
    logits: &'a [L],
    tokens: usize,
    num_experts: usize,
    probs: &'a [L::Acc],
    refused: bool,
    threads: usize,
}

fn check_accuracy<L: Storage>(logits: &[L], num_experts: usize, probs: &[L::Acc]) {
    let eps = f64_of(L::Acc::epsilon());
    for (row, got) in logits.chunks(num_experts).zip(probs.chunks(num_experts)) {
        let row: Vec<f64> = row.iter().map(|&v| f64_of(v.to_acc())).collect();
        let expected = crate::reference::scores(ScoreFunction::Softmax, &row);
        for (e, (&got, want)) in got.iter().zip(expected).enumerate() {
            let got = f64_of(got);
            // A few roundings of exp, about E / 8 of the lane sums, and the division; and
            // the subnormal steps of float32 below 2^-126.
            let tol = (16.0 + num_experts as f64 / 8.0) * eps * want + 4.0 * f64::from(f32::from_bits(1));
            assert!((got - want).abs() <= tol, "expert {e}: probability {got}, reference {want}");
        }
    }
}

fn check_expert_choice<L: Storage>(input: &mut Input, case: &Case<'_, L>) {
    let Case { logits, tokens, num_experts, probs, refused, threads } = *case;
    let capacity = input.between(0, tokens + 1);
    let mut indices = vec![i64::MIN; num_experts * capacity];
    let mut gates = vec![L::Acc::nan(); num_experts * capacity];
    let mut scores = vec![L::Acc::nan(); tokens * num_experts];
    let result = threads::run(threads, usize::MAX, || {
        expert_choice(logits, tokens, num_experts, capacity, &mut indices, &mut gates, &mut scores)
    });
    // No capacity: nothing is chosen and the logits are not read.
    let refused = capacity > tokens || (refused && capacity > 0);
    assert_eq!(result.is_err(), refused, "expert choice: {result:?}");
    if refused || capacity == 0 {
        return;
    }
    for e in 0..num_experts {
        let column: Vec<L::Acc> = (0..tokens).map(|t| probs[t * num_experts + e]).collect();
        for (t, (&got, &want)) in scores[e * tokens..(e + 1) * tokens].iter().zip(&column).enumerate() {
            assert_eq!(f64_of(got).to_bits(), f64_of(want).to_bits(), "expert {e}, token {t}: score");
        }
        // The `capacity` largest, equal ones to the lower token, listed in token order.
        let mut best: Vec<usize> = (0..tokens).collect();
        best.sort_by(|&a, &b| column[b].partial_cmp(&column[a]).expect("finite").then(a.cmp(&b)));
        best.truncate(capacity);
        best.sort_unstable();
        let chosen: Vec<usize> =
            indices[e * capacity..(e + 1) * capacity].iter().map(|&t| t as usize).collect();
        assert_eq!(chosen, best, "expert {e}: tokens");
        for (c, &t) in best.iter().enumerate() {
            assert_eq!(
                f64_of(gates[e * capacity + c]).to_bits(),
                f64_of(column[t]).to_bits(),
                "expert {e}: gate"
            );
        }
    }
}

fn check_topp<L: Storage>(input: &mut Input, case: &Case<'_, L>) {
    let Case { logits, tokens, num_experts, probs, refused, threads } = *case;
    // Probabilities that land on the cumulative sums' knife edges as well as plain ones.
    let p = [1.0, 0.5, 0.9, 0.25, 0.999, 1e-6, 0.75][input.below(7)];
    let max_k = input.between(1, num_experts);
    let min_k = input.between(0, max_k);
    let cfg = TopPConfig { num_experts, p, min_k, max_k, inclusive: input.bool(), normalize: input.bool() };
    let mut weights = vec![L::Acc::nan(); tokens * max_k];
    let mut experts = vec![i64::MIN; tokens * max_k];
    let result =
        threads::run(threads, usize::MAX, || topp_gating(logits, tokens, &cfg, &mut weights, &mut experts));
    assert_eq!(result.is_err(), refused, "top-p: {result:?}");
    if refused {
        return;
    }
    let p = L::Acc::from_f64(p);
    for t in 0..tokens {
        let row = &logits[t * num_experts..(t + 1) * num_experts];
        let row_probs = &probs[t * num_experts..(t + 1) * num_experts];
        // Ranks by logit, equal logits (0.0 and -0.0 among them) to the lower expert.
        let mut ranks: Vec<usize> = (0..num_experts).collect();
        ranks
            .sort_by(|&a, &b| row[b].to_acc().partial_cmp(&row[a].to_acc()).expect("finite").then(a.cmp(&b)));
        // Kept while (inclusive) the sum before it is below p, or (exclusive) the sum with
        // it is at most p, added one rank at a time in the accumulator type.
        let mut cumulative = L::Acc::zero();
        let mut kept = 0;
        for (r, &e) in ranks.iter().take(max_k).enumerate() {
            let prob = row_probs[e];
            let keep = r < min_k || if cfg.inclusive { cumulative < p } else { cumulative + prob <= p };
            if !keep {
                break;
            }
            cumulative = cumulative + prob;
            kept += 1;
        }
        for slot in 0..max_k {
            let (want_expert, want_weight) = if slot < kept {
                let e = ranks[slot];
                (e as i64, if cfg.normalize { row_probs[e] / cumulative } else { row_probs[e] })
            } else {
                (-1, L::Acc::zero())
            };
            let (got_expert, got_weight) = (experts[t * max_k + slot], weights[t * max_k + slot]);
            assert_eq!(got_expert, want_expert, "token {t}, slot {slot}: expert ({cfg:?})");
            assert_eq!(
                f64_of(got_weight).to_bits(),
                f64_of(want_weight).to_bits(),
                "token {t}, slot {slot}: weight ({cfg:?})"
            );
        }
    }
}
