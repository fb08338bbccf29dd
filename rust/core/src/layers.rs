//! Depth routing: per request and layer, skip the layer, execute it, or execute it twice
//! (Dr.LLM / FiRST-style layer routers), and grouping requests with identical plans so
//! that each group runs as one batch.

use crate::element::Element;
use crate::error::{check_len, CoreError, Result};
use num_traits::Float;
use std::collections::HashMap;

/// A layer decision, as stored in a plan.
pub const SKIP: i64 = 0;
pub const EXECUTE: i64 = 1;
pub const REPEAT: i64 = 2;
/// Decisions per layer in a router's logits: skip, execute, repeat.
pub const DECISIONS: usize = 3;

/// The decision of every (request, layer) row of `logits` `[N, 3]` (skip, execute,
/// repeat): the argmax; a tie that involves execute is execute, a tie between skip and
/// repeat is skip (the lower index). NaN logits are an error.
pub fn layer_plan<X: Element>(logits: &[X], out: &mut [i64]) -> Result<()> {
    check_len("logits", logits, out.len() * DECISIONS)?;
    for (row, (decision, values)) in out.iter_mut().zip(logits.chunks_exact(DECISIONS)).enumerate() {
        let [skip, execute, repeat] = [values[0].to_acc(), values[1].to_acc(), values[2].to_acc()];
        if skip.is_nan() || execute.is_nan() || repeat.is_nan() {
            return Err(CoreError::invalid("logits", "no NaN", format!("NaN in row {row} (request-major)")));
        }
        *decision = if execute >= skip && execute >= repeat {
            EXECUTE
        } else if skip >= repeat {
            SKIP
        } else {
            REPEAT
        };
    }
    Ok(())
}

/// Requests grouped by identical plans, split into batches of at most `max_batch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanBatches {
    /// Request ids, batch by batch (ascending within a batch).
    pub order: Vec<i64>,
    /// `[batches + 1]`: batch `i` is `order[offsets[i]..offsets[i + 1]]`.
    pub offsets: Vec<i64>,
    /// `[batches]`: the plan group of each batch (groups are numbered by first appearance).
    pub group: Vec<i64>,
}

/// Groups the requests of `plans` `[B, L]` (values skip/execute/repeat) by identical
/// plan. Groups come in order of their first request, requests in ascending order within a
/// group; a group larger than `max_batch` is cut into consecutive batches of `max_batch`
/// (the last one shorter).
pub fn bucket_by_plan(
    plans: &[i64],
    num_requests: usize,
    num_layers: usize,
    max_batch: Option<usize>,
) -> Result<PlanBatches> {
    if max_batch == Some(0) {
        return Err(CoreError::invalid("max_batch", "at least 1", "0"));
    }
    check_len("plans", plans, num_requests * num_layers)?;
    if let Some(i) = plans.iter().position(|v| !(SKIP..=REPEAT).contains(v)) {
        return Err(CoreError::invalid(
            "plans",
            "values 0 (skip), 1 (execute) or 2 (repeat)",
            format!("{} at request {}, layer {}", plans[i], i / num_layers, i % num_layers),
        ));
    }
    let mut group_of: HashMap<&[i64], usize> = HashMap::new();
    let mut members: Vec<Vec<i64>> = Vec::new();
    for request in 0..num_requests {
        let plan = &plans[request * num_layers..(request + 1) * num_layers];
        let next = members.len();
        let group = *group_of.entry(plan).or_insert(next);
        if group == next {
            members.push(Vec::new());
        }
        members[group].push(request as i64);
    }
    let mut batches =
        PlanBatches { order: Vec::with_capacity(num_requests), offsets: vec![0], group: Vec::new() };
    for (group, requests) in members.iter().enumerate() {
        for batch in requests.chunks(max_batch.unwrap_or(usize::MAX)) {
            batches.order.extend_from_slice(batch);
            batches.offsets.push(batches.order.len() as i64);
            batches.group.push(group as i64);
        }
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_prefer_execute_then_skip() {
        let logits: [f32; 18] = [
            1.0, 1.0, 1.0, // all equal: execute
            2.0, 1.0, 2.0, // skip = repeat > execute: skip
            0.0, 1.0, 1.0, // execute = repeat: execute
            3.0, 1.0, 0.0, // skip
            0.0, 1.0, 5.0, // repeat
            2.0, 2.0, 0.0, // skip = execute: execute
        ];
        let mut out = [9; 6];
        layer_plan(&logits, &mut out).unwrap();
        assert_eq!(out, [EXECUTE, SKIP, EXECUTE, SKIP, REPEAT, EXECUTE]);
        let err = layer_plan(&[0.0, f32::NAN, 1.0], &mut out[..1]).unwrap_err();
        assert_eq!(err.to_string(), "logits: expected no NaN, got NaN in row 0 (request-major)");
    }

    #[test]
    fn buckets_follow_first_appearance_and_split_at_max_batch() {
        // Four requests of two layers: plans A, B, A, A.
        let plans = [1, 1, 0, 2, 1, 1, 1, 1];
        let all = bucket_by_plan(&plans, 4, 2, None).unwrap();
        assert_eq!(all, PlanBatches { order: vec![0, 2, 3, 1], offsets: vec![0, 3, 4], group: vec![0, 1] });
        let split = bucket_by_plan(&plans, 4, 2, Some(2)).unwrap();
        assert_eq!(
            split,
            PlanBatches { order: vec![0, 2, 3, 1], offsets: vec![0, 2, 3, 4], group: vec![0, 0, 1] }
        );
        assert!(bucket_by_plan(&[3, 1], 1, 2, None)
            .unwrap_err()
            .to_string()
            .contains("3 at request 0, layer 0"));
        assert!(bucket_by_plan(&plans, 4, 2, Some(0)).is_err());
        let empty = bucket_by_plan(&[], 0, 4, None).unwrap();
        assert_eq!(empty, PlanBatches { order: vec![], offsets: vec![0], group: vec![] });
        // Without layers every plan is the same (empty) plan.
        let layerless = bucket_by_plan(&[], 3, 0, None).unwrap();
        assert_eq!(layerless, PlanBatches { order: vec![0, 1, 2], offsets: vec![0, 3], group: vec![0] });
    }
}
