//! Dispatch: the dropless and capacity plans against the plan written out from
//! docs/semantics.md (each expert's slots in slot order, the kept ones by the drop policy,
//! rows in whole blocks or an `[E, C]` grid), then the row kernels on that plan against the
//! same sums in the same order, which must give the same bits.

use crate::input::{with_element_type, Input};
use crate::reference::{acc, f64_of};
use num_traits::Zero;
use sparseroute_core::dispatch::{
    build_capacity_plan, build_plan, combine_rows, gather_rows, slot_dots, Capacity, DropPolicy, PlanBuffers,
};
use sparseroute_core::{threads, Element};

pub fn dispatch(bytes: &[u8]) {
    let mut input = Input::new(bytes);
    let element_type = input.below(4);
    with_element_type!(element_type, check(&mut input));
}

#[derive(Debug, PartialEq)]
struct Plan {
    tokens_per_expert: Vec<i64>,
    offsets: Vec<i64>,
    row_to_slot: Vec<i64>,
    slot_to_row: Vec<i64>,
    dropped: Vec<i64>,
}

/// How slots are kept: all of them, or at most `capacity` per expert.
struct Limit {
    capacity: usize,
    weights: Option<Vec<f32>>,
    pad: bool,
}

/// The plan by definition, or `None` where the call must be refused.
fn reference_plan(
    experts: &[i64],
    num_experts: usize,
    block_size: usize,
    limit: Option<&Limit>,
    rows: usize,
) -> Option<Plan> {
    let mut kept: Vec<Vec<usize>> = vec![Vec::new(); num_experts];
    for (slot, &id) in experts.iter().enumerate() {
        match id {
            -1 => {}
            id if (0..num_experts as i64).contains(&id) => kept[id as usize].push(slot),
            _ => return None,
        }
    }
    let demand: Vec<usize> = kept.iter().map(Vec::len).collect();
    if let Some(limit) = limit {
        if limit.pad && !limit.capacity.is_multiple_of(block_size) {
            return None;
        }
        if let Some(weights) = &limit.weights {
            if weights.iter().any(|w| w.is_nan()) {
                return None;
            }
        }
        for slots in &mut kept {
            if let Some(weights) = &limit.weights {
                // Higher weight first, equal weights the lower slot (-0.0 ranks below 0.0: a
                // total order, the GPU's too); kept in slot order.
                slots.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
            }
            slots.truncate(limit.capacity);
            slots.sort_unstable();
        }
    }
    let pad = limit.is_some_and(|l| l.pad);
    let mut offsets = Vec::with_capacity(num_experts + 1);
    let mut next = 0;
    for (e, slots) in kept.iter().enumerate() {
        let first = if pad { e * limit.map_or(0, |l| l.capacity) } else { next };
        offsets.push(first as i64);
        next = first + slots.len().div_ceil(block_size) * block_size;
    }
    let total = if pad { num_experts * limit.map_or(0, |l| l.capacity) } else { next };
    offsets.push(total as i64);
    if rows < total {
        return None;
    }
    let mut row_to_slot = vec![-1; rows];
    let mut slot_to_row = vec![-1; experts.len()];
    for (e, slots) in kept.iter().enumerate() {
        for (i, &slot) in slots.iter().enumerate() {
            let row = offsets[e] as usize + i;
            row_to_slot[row] = slot as i64;
            slot_to_row[slot] = row as i64;
        }
    }
    Some(Plan {
        tokens_per_expert: kept.iter().map(|s| s.len() as i64).collect(),
        offsets,
        row_to_slot,
        slot_to_row,
        dropped: demand.iter().zip(&kept).map(|(&d, s)| (d - s.len()) as i64).collect(),
    })
}

fn check<X: Element>(input: &mut Input) {
    let num_experts = if input.bool() { input.between(1, 8) } else { input.between(1, 200) };
    let k = input.between(1, num_experts.min(9));
    let tokens = input.between(0, 40);
    let raw_ids = input.below(16) == 0;
    // One expert in four draws takes every slot that a skewed draw gives it.
    let favourite = input.below(num_experts) as i64;
    let experts: Vec<i64> = (0..tokens * k)
        .map(|_| match input.below(8) {
            0 => -1,
            1..=3 => favourite,
            7 if raw_ids => i64::from(input.u32() as i32),
            _ => input.below(num_experts) as i64,
        })
        .collect();
    let block_size = [1, 1, 2, 4, 8, 128][input.below(6)];
    let limit = input.bool().then(|| {
        let capacity = input.between(0, tokens * k + 1);
        let weights = input.bool().then(|| {
            let raw_bits = input.below(8) == 0;
            (0..tokens * k).map(|_| input.value(raw_bits)).collect()
        });
        Limit { capacity, weights, pad: input.bool() }
    });
    let threads = input.between(1, 3);

    // Room for the largest plan the options allow, give or take a few rows.
    let most_rows = match &limit {
        Some(l) if l.pad => num_experts * l.capacity,
        _ => tokens * k + num_experts * (block_size - 1),
    };
    let rows = match input.below(4) {
        0 => most_rows.saturating_sub(input.between(1, 3)),
        1 => most_rows + input.between(1, 3),
        _ => most_rows,
    };
    let expected = reference_plan(&experts, num_experts, block_size, limit.as_ref(), rows);
    let mut plan = Plan {
        tokens_per_expert: vec![i64::MIN; num_experts],
        offsets: vec![i64::MIN; num_experts + 1],
        row_to_slot: vec![i64::MIN; rows],
        slot_to_row: vec![i64::MIN; tokens * k],
        dropped: vec![0; num_experts],
    };
    let result = threads::run(threads, usize::MAX, || {
        let buffers = PlanBuffers {
            tokens_per_expert: &mut plan.tokens_per_expert,
            offsets: &mut plan.offsets,
            row_to_slot: &mut plan.row_to_slot,
            slot_to_row: &mut plan.slot_to_row,
        };
        match &limit {
            None => build_plan(&experts, k, num_experts, block_size, buffers),
            Some(l) => {
                let policy = l.weights.as_deref().map_or(DropPolicy::Position, DropPolicy::Weights);
                let capacity = Capacity { capacity: l.capacity, policy, pad: l.pad, block_size };
                build_capacity_plan(&experts, k, num_experts, capacity, buffers, &mut plan.dropped)
            }
        }
    });
    let Some(expected) = expected else {
        assert!(result.is_err(), "accepted an invalid plan call");
        return;
    };
    let total = result.expect("a valid plan call");
    assert_eq!(total as i64, expected.offsets[num_experts]);
    assert_eq!(plan, expected, "experts {experts:?}, k {k}, block {block_size}");
    check_rows::<X>(input, &plan, tokens, k, threads);
}

/// gather_rows, combine_rows and slot_dots on a valid plan, bit for bit against loops that
/// round the same products and sums in the same order.
fn check_rows<X: Element>(input: &mut Input, plan: &Plan, tokens: usize, k: usize, threads: usize) {
    let row_len = input.between(0, 33);
    let x: Vec<X> = (0..tokens * row_len).map(|_| input.element::<X>(false)).collect();
    let weights: Option<Vec<X::Acc>> =
        input.bool().then(|| (0..tokens * k).map(|_| acc(f64::from(input.value(false)))).collect());
    let rows = plan.row_to_slot.len();

    let mut gathered = vec![input.element::<X>(false); rows * row_len];
    threads::run(threads, usize::MAX, || {
        gather_rows(&x, row_len, &plan.row_to_slot, k, weights.as_deref(), &mut gathered)
    })
    .expect("gather_rows on a valid plan");
    for (r, &slot) in plan.row_to_slot.iter().enumerate() {
        for c in 0..row_len {
            let want = match slot {
                -1 => X::default(),
                s => {
                    let v = x[s as usize / k * row_len + c];
                    weights.as_ref().map_or(v, |w| X::from_acc(w[s as usize] * v.to_acc()))
                }
            };
            assert_eq!(bits(gathered[r * row_len + c]), bits(want), "gathered row {r}, column {c}");
        }
    }

    let y: Vec<X> = (0..rows * row_len).map(|_| input.element::<X>(false)).collect();
    let mut combined = vec![input.element::<X>(false); tokens * row_len];
    threads::run(threads, usize::MAX, || {
        combine_rows(&y, row_len, &plan.slot_to_row, k, weights.as_deref(), &mut combined)
    })
    .expect("combine_rows on a valid plan");
    let mut dots = vec![X::Acc::zero(); tokens * k];
    threads::run(threads, usize::MAX, || slot_dots(&x, &y, row_len, &plan.slot_to_row, k, &mut dots))
        .expect("slot_dots on a valid plan");
    for t in 0..tokens {
        let slots = &plan.slot_to_row[t * k..(t + 1) * k];
        for c in 0..row_len {
            let mut sum: Option<X::Acc> = None;
            for (j, &row) in slots.iter().enumerate().filter(|(_, &row)| row >= 0) {
                let v = y[row as usize * row_len + c].to_acc();
                let term = weights.as_ref().map_or(v, |w| w[t * k + j] * v);
                sum = Some(sum.map_or(term, |s| s + term));
            }
            let want = sum.map_or(X::default(), X::from_acc);
            assert_eq!(bits(combined[t * row_len + c]), bits(want), "combined token {t}, column {c}");
        }
        for (j, &row) in slots.iter().enumerate() {
            // Eight lanes, lane c % 8 adding its columns in order, then the lanes in order.
            let mut lanes = [X::Acc::zero(); 8];
            if row >= 0 {
                for c in 0..row_len {
                    lanes[c % 8] =
                        lanes[c % 8] + x[t * row_len + c].to_acc() * y[row as usize * row_len + c].to_acc();
                }
            }
            let want = lanes.iter().fold(X::Acc::zero(), |s, &l| s + l);
            let got = dots[t * k + j];
            assert!(
                f64_of(got).to_bits() == f64_of(want).to_bits()
                    || (f64_of(got).is_nan() && f64_of(want).is_nan()),
                "slot dot of token {t}, choice {j}: {got:?}, reference {want:?}"
            );
        }
    }
}

/// The bits of an element, NaNs of any payload as one.
fn bits<X: Element>(v: X) -> u64 {
    let v = f64_of(v.to_acc());
    if v.is_nan() {
        u64::MAX
    } else {
        v.to_bits()
    }
}
