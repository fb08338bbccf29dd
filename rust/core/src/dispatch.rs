//! Dropless token dispatch: the permutation plan, permute (gather rows into expert-major
//! order) and unpermute (combine rows back per token), with their gradients.
//!
//! Terms: a *slot* is one (token, choice) pair, flat index `s = t * k + j`; a *row* is one
//! row of the expert-major tensor. The plan holds both directions of the map:
//! `slot_to_row` `[T, k]` (-1 for an empty slot) and `row_to_slot` `[rows]` (-1 for padding rows
//! past the last routed slot). Rows are ordered expert-major, then by ascending slot index
//! (that is, by token, then by choice): a stable counting sort, so the plan is unique and
//! does not depend on the thread count.
//!
//! Kernels read plan entries they did not produce (a plan is an ordinary tensor a caller may
//! alter), so every index is bounds-checked: a corrupt plan gives an error, never a crash.

use crate::element::Element;
use crate::error::{check_len, CoreError, Result};
use crate::threads::{for_each_block, for_each_pair, map_collect};
use num_traits::Zero;

/// Slots per counting task: large enough that the per-chunk histograms stay cheap.
const SLOTS_PER_CHUNK: usize = 1 << 15;
/// Elements copied or reduced per parallel task.
const ELEMENTS_PER_TASK: usize = 1 << 15;

fn rows_per_task(row_len: usize) -> usize {
    (ELEMENTS_PER_TASK / row_len.max(1)).max(1)
}

/// The plan's output buffers, allocated by the caller.
pub struct PlanBuffers<'a> {
    /// `[E]`: how many slots chose each expert.
    pub tokens_per_expert: &'a mut [i64],
    /// `[E + 1]`: exclusive prefix sums of `tokens_per_expert`; `offsets[E]` = routed rows.
    pub offsets: &'a mut [i64],
    /// `[rows]`: the slot each row comes from; -1 past the routed rows. Its length is the row
    /// count of the permuted tensor and must be at least the number of routed slots.
    pub row_to_slot: &'a mut [i64],
    /// `[T * k]`: the row each slot goes to; -1 for an empty slot.
    pub slot_to_row: &'a mut [i64],
}

/// A raw view of a slice that tasks write at disjoint indices.
struct DisjointWrites<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: tasks only write through `write`, at indices that the counting sort hands out
// exactly once (see `build_plan`), so no two threads touch the same element.
unsafe impl<T: Send> Send for DisjointWrites<T> {}
unsafe impl<T: Send> Sync for DisjointWrites<T> {}

impl<T> DisjointWrites<T> {
    fn new(slice: &mut [T]) -> Self {
        DisjointWrites { ptr: slice.as_mut_ptr(), len: slice.len() }
    }

    /// # Safety
    /// No other thread may access index `i` while this runs.
    unsafe fn write(&self, i: usize, value: T) {
        assert!(i < self.len, "row index {i} out of bounds {}", self.len);
        // SAFETY: in bounds (checked above); exclusive per the caller's contract.
        unsafe { self.ptr.add(i).write(value) }
    }
}

fn expert_of(id: i64, num_experts: usize, slot: usize, k: usize) -> Result<Option<usize>> {
    if id == -1 {
        Ok(None)
    } else if id >= 0 && (id as u64) < num_experts as u64 {
        Ok(Some(id as usize))
    } else {
        Err(CoreError::invalid(
            "experts",
            format!("expert ids in [0, {num_experts}) or -1 for an empty slot"),
            format!("{id} at token {}, slot {}", slot / k, slot % k),
        ))
    }
}

/// `count` rows rounded up to whole blocks of `block_size` rows.
fn whole_blocks(count: i64, block_size: usize) -> i64 {
    let block = block_size as i64;
    (count + block - 1) / block * block
}

fn check_block_size(block_size: usize) -> Result<()> {
    if block_size == 0 {
        return Err(CoreError::invalid("block_size", "at least 1", "0"));
    }
    Ok(())
}

/// Builds the dropless permutation plan of `experts` ([T, k] row-major, `k` = `slot_to_row`
/// row length given by `k`). Each expert's rows start at a multiple of `block_size` and take
/// whole blocks of it (1: no padding between experts); the padding rows hold no slot (-1).
/// Returns the plan's row count, `offsets[E]`.
pub fn build_plan(
    experts: &[i64],
    k: usize,
    num_experts: usize,
    block_size: usize,
    out: PlanBuffers<'_>,
) -> Result<usize> {
    if k == 0 && !experts.is_empty() {
        return Err(CoreError::invalid("experts", "at least one slot per token (k >= 1)", "k = 0"));
    }
    if num_experts == 0 {
        return Err(CoreError::invalid("num_experts", "at least 1", "0"));
    }
    check_block_size(block_size)?;
    let slots = experts.len();
    check_len("slot_to_row", out.slot_to_row, slots)?;
    check_len("tokens_per_expert", out.tokens_per_expert, num_experts)?;
    check_len("offsets", out.offsets, num_experts + 1)?;

    // Pass 1: a histogram per chunk of slots.
    let chunks: Vec<&[i64]> = experts.chunks(SLOTS_PER_CHUNK).collect();
    let histograms = map_collect(&chunks, |c, chunk| {
        let mut counts = vec![0i64; num_experts];
        for (i, &id) in chunk.iter().enumerate() {
            if let Some(e) = expert_of(id, num_experts, c * SLOTS_PER_CHUNK + i, k)? {
                counts[e] += 1;
            }
        }
        Ok(counts)
    })?;

    // Pass 2: totals, offsets, and where each chunk starts writing within each expert.
    out.tokens_per_expert.fill(0);
    for counts in &histograms {
        for (total, &c) in out.tokens_per_expert.iter_mut().zip(counts) {
            *total += c;
        }
    }
    let mut running = 0i64;
    for (offset, &count) in out.offsets.iter_mut().zip(out.tokens_per_expert.iter()) {
        *offset = running;
        running += whole_blocks(count, block_size);
    }
    out.offsets[num_experts] = running;
    let routed = running as usize;
    if out.row_to_slot.len() < routed {
        let what = if block_size == 1 { "routed slots" } else { "rows of this plan, padding included" };
        return Err(CoreError::invalid(
            "num_rows",
            format!("at least the number of {what} ({routed})"),
            format!("{}", out.row_to_slot.len()),
        ));
    }
    let mut cursors = histograms;
    let mut next: Vec<i64> = out.offsets[..num_experts].to_vec();
    for counts in cursors.iter_mut() {
        for (cursor, n) in counts.iter_mut().zip(next.iter_mut()) {
            let count = *cursor;
            *cursor = *n;
            *n += count;
        }
    }

    // Pass 3: every chunk places its slots, in slot order, from its own cursors. The rows
    // that no slot takes (past the plan; with blocks, also each expert's padding) hold -1.
    if block_size == 1 {
        out.row_to_slot[routed..].fill(-1);
    } else {
        out.row_to_slot.fill(-1);
    }
    let rows = DisjointWrites::new(out.row_to_slot);
    let mut slot_chunks: Vec<&mut [i64]> = out.slot_to_row.chunks_mut(SLOTS_PER_CHUNK).collect();
    for_each_pair(&mut slot_chunks, &mut cursors, |c, slot_rows, cursor| {
        for (i, (&id, slot_row)) in chunks[c].iter().zip(slot_rows.iter_mut()).enumerate() {
            if id < 0 {
                *slot_row = -1;
                continue;
            }
            let row = cursor[id as usize];
            cursor[id as usize] += 1;
            *slot_row = row;
            // SAFETY: the cursors of chunk c for expert e cover rows
            // [offsets[e] + (slots of e in chunks before c), ... + slots of e in c),
            // ranges that are disjoint across (chunk, expert) pairs; each row is
            // therefore written by exactly one slot.
            unsafe { rows.write(row as usize, (c * SLOTS_PER_CHUNK + i) as i64) };
        }
        Ok(())
    })?;
    Ok(routed)
}

fn token_of_slot(slot: i64, k: usize, num_tokens: usize, row: usize) -> Result<Option<usize>> {
    if slot < 0 {
        return Ok(None);
    }
    let token = slot as u64 / k as u64;
    if token < num_tokens as u64 {
        Ok(Some(token as usize))
    } else {
        Err(CoreError::invalid(
            "plan.row_to_slot",
            format!("slot indices in [-1, {})", num_tokens * k),
            format!("{slot} at row {row}"),
        ))
    }
}

/// Gathers rows into expert-major order: `out[r] = scale[s] * x[s / k]` for
/// `s = row_to_slot[r]`, zero where `s = -1`.
///
/// This is permute (no scale) and the gradient of unpermute with respect to its rows
/// (scaled by the combine weights).
pub fn gather_rows<X: Element>(
    x: &[X],
    row_len: usize,
    row_to_slot: &[i64],
    k: usize,
    slot_scale: Option<&[X::Acc]>,
    out: &mut [X],
) -> Result<()> {
    if row_len == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(CoreError::invalid("k", "at least 1", "0"));
    }
    let num_tokens = x.len() / row_len;
    check_len("x", x, num_tokens * row_len)?;
    check_len("out", out, row_to_slot.len() * row_len)?;
    if let Some(scale) = slot_scale {
        check_len("weights", scale, num_tokens * k)?;
    }
    for_each_block(out, row_len, rows_per_task(row_len), |first, block| {
        for (i, dst) in block.chunks_mut(row_len).enumerate() {
            let r = first + i;
            let slot = row_to_slot[r];
            match token_of_slot(slot, k, num_tokens, r)? {
                None => dst.fill(X::default()),
                Some(t) => {
                    let src = &x[t * row_len..(t + 1) * row_len];
                    match slot_scale {
                        None => crate::simd::copy_row(dst, src),
                        Some(scale) => {
                            let w = scale[slot as usize];
                            for (o, &v) in dst.iter_mut().zip(src) {
                                *o = X::from_acc(w * v.to_acc());
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    })
}

fn row_of_slot(row: i64, rows: usize, slot: usize, k: usize) -> Result<Option<usize>> {
    if row < 0 {
        Ok(None)
    } else if (row as u64) < rows as u64 {
        Ok(Some(row as usize))
    } else {
        Err(CoreError::invalid(
            "plan.slot_to_row",
            format!("row indices in [-1, {rows})"),
            format!("{row} at token {}, slot {}", slot / k, slot % k),
        ))
    }
}

/// Combines rows back per token: `out[t] = sum_j weight[t, j] * rows[slot_to_row[t, j]]`
/// over the token's non-empty slots, accumulated in the accumulator type in slot order
/// (`((w0 y0) + w1 y1) + ...`, no fused multiply-add), zero for a token with no slot.
///
/// This is unpermute, and (without weights) the gradient of permute.
pub fn combine_rows<X: Element>(
    rows: &[X],
    row_len: usize,
    slot_to_row: &[i64],
    k: usize,
    weights: Option<&[X::Acc]>,
    out: &mut [X],
) -> Result<()> {
    if row_len == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(CoreError::invalid("k", "at least 1", "0"));
    }
    let num_rows = rows.len() / row_len;
    check_len("y_sorted", rows, num_rows * row_len)?;
    let num_tokens = slot_to_row.len() / k;
    check_len("plan.slot_to_row", slot_to_row, num_tokens * k)?;
    check_len("out", out, num_tokens * row_len)?;
    if let Some(w) = weights {
        check_len("weights", w, num_tokens * k)?;
    }
    for_each_block(out, row_len, rows_per_task(row_len * k), |first, block| {
        let mut acc: Vec<X::Acc> = Vec::with_capacity(row_len);
        for (i, dst) in block.chunks_mut(row_len).enumerate() {
            let t = first + i;
            acc.clear();
            for (j, &row) in slot_to_row[t * k..(t + 1) * k].iter().enumerate() {
                let Some(row) = row_of_slot(row, num_rows, t * k + j, k)? else {
                    continue;
                };
                let src = &rows[row * row_len..(row + 1) * row_len];
                let w = weights.map(|w| w[t * k + j]);
                match (acc.is_empty(), w) {
                    (true, None) => acc.extend(src.iter().map(|v| v.to_acc())),
                    (true, Some(w)) => acc.extend(src.iter().map(|v| w * v.to_acc())),
                    (false, None) => {
                        for (a, v) in acc.iter_mut().zip(src) {
                            *a = *a + v.to_acc();
                        }
                    }
                    (false, Some(w)) => {
                        for (a, v) in acc.iter_mut().zip(src) {
                            *a = *a + w * v.to_acc();
                        }
                    }
                }
            }
            if acc.is_empty() {
                dst.fill(X::default());
            } else {
                for (o, &a) in dst.iter_mut().zip(acc.iter()) {
                    *o = X::from_acc(a);
                }
            }
        }
        Ok(())
    })
}

/// Lanes of the dot product: fixed, so results do not depend on the machine or threads.
const DOT_LANES: usize = 8;

/// `sum_i a[i] * b[i]` in the accumulator type: lane `i % 8` accumulates in index order,
/// then the eight lanes are added in lane order.
pub(crate) fn dot<X: Element>(a: &[X], b: &[X]) -> X::Acc {
    let mut lanes = [X::Acc::zero(); DOT_LANES];
    let (a_main, a_tail) = a.split_at(a.len() - a.len() % DOT_LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(DOT_LANES).zip(b_main.chunks_exact(DOT_LANES)) {
        for lane in 0..DOT_LANES {
            lanes[lane] = lanes[lane] + ca[lane].to_acc() * cb[lane].to_acc();
        }
    }
    for (lane, (x, y)) in a_tail.iter().zip(b_tail).enumerate() {
        lanes[lane] = lanes[lane] + x.to_acc() * y.to_acc();
    }
    lanes.iter().fold(X::Acc::zero(), |s, &l| s + l)
}

/// The gradient of unpermute with respect to its weights:
/// `out[t, j] = dot(grad_y[t], rows[slot_to_row[t, j]])`, 0 for an empty slot.
pub fn slot_dots<X: Element>(
    grad_y: &[X],
    rows: &[X],
    row_len: usize,
    slot_to_row: &[i64],
    k: usize,
    out: &mut [X::Acc],
) -> Result<()> {
    if k == 0 {
        return Err(CoreError::invalid("k", "at least 1", "0"));
    }
    let num_tokens = slot_to_row.len() / k;
    check_len("plan.slot_to_row", slot_to_row, num_tokens * k)?;
    check_len("out", out, num_tokens * k)?;
    if row_len == 0 {
        out.fill(X::Acc::zero());
        return Ok(());
    }
    check_len("grad_y", grad_y, num_tokens * row_len)?;
    let num_rows = rows.len() / row_len;
    check_len("y_sorted", rows, num_rows * row_len)?;
    for_each_block(out, k, rows_per_task(row_len * k), |first, block| {
        for (i, dots) in block.chunks_mut(k).enumerate() {
            let t = first + i;
            let g = &grad_y[t * row_len..(t + 1) * row_len];
            for (j, d) in dots.iter_mut().enumerate() {
                *d = match row_of_slot(slot_to_row[t * k + j], num_rows, t * k + j, k)? {
                    None => X::Acc::zero(),
                    Some(row) => dot(g, &rows[row * row_len..(row + 1) * row_len]),
                };
            }
        }
        Ok(())
    })
}

/// Which slots an expert keeps when more than its capacity chose it.
#[derive(Clone, Copy, Debug)]
pub enum DropPolicy<'a> {
    /// The first `capacity` slots in slot order (token, then choice).
    Position,
    /// The `capacity` slots with the highest weight (`[T * k]`, float32); equal weights keep
    /// the lower slot index. Kept slots stay in slot order.
    Weights(&'a [f32]),
}

/// Capacity-constrained dispatch settings.
#[derive(Clone, Copy, Debug)]
pub struct Capacity<'a> {
    /// Rows each expert may receive.
    pub capacity: usize,
    pub policy: DropPolicy<'a>,
    /// Lay the rows out as `[E, capacity]`: expert `e` owns rows `e * capacity ..`, unused rows
    /// are padding (-1 in `row_to_slot`), `offsets[e] = e * capacity`.
    pub pad: bool,
    /// Without `pad`: each expert's kept rows start at a multiple of `block_size` and take
    /// whole blocks of it (1: none). With `pad`, `capacity` must be a multiple of it.
    pub block_size: usize,
}

/// Builds a capacity-constrained plan: the dropless plan, then each expert keeps at most
/// `capacity.capacity` of its slots (see `DropPolicy`). Dropped slots get row -1 in
/// `slot_to_row`; `tokens_per_expert` counts kept slots and `dropped` (`[E]`) the rest.
/// Returns the plan's row count, `offsets[E]`.
pub fn build_capacity_plan(
    experts: &[i64],
    k: usize,
    num_experts: usize,
    capacity: Capacity<'_>,
    out: PlanBuffers<'_>,
    dropped: &mut [i64],
) -> Result<usize> {
    check_len("dropped", dropped, num_experts)?;
    check_block_size(capacity.block_size)?;
    if capacity.pad && !capacity.capacity.is_multiple_of(capacity.block_size) {
        return Err(CoreError::invalid(
            "capacity",
            format!("a multiple of block_size = {} with pad_to_capacity", capacity.block_size),
            capacity.capacity.to_string(),
        ));
    }
    if let DropPolicy::Weights(weights) = capacity.policy {
        check_len("weights", weights, experts.len())?;
        if let Some(i) = weights.iter().position(|w| w.is_nan()) {
            return Err(CoreError::invalid(
                "weights",
                "no NaN (drop_policy=\"probs\" ranks slots by weight)",
                format!("NaN at token {}, slot {}", i / k.max(1), i % k.max(1)),
            ));
        }
    }
    // The dropless plan, in scratch buffers.
    let mut routed_counts = vec![0i64; num_experts];
    let mut routed_offsets = vec![0i64; num_experts + 1];
    let mut dropless_rows = vec![0i64; experts.len()];
    let routed = build_plan(
        experts,
        k,
        num_experts,
        1,
        PlanBuffers {
            tokens_per_expert: &mut routed_counts,
            offsets: &mut routed_offsets,
            row_to_slot: &mut dropless_rows,
            slot_to_row: out.slot_to_row,
        },
    )?;

    // Each expert's kept slots, in slot order.
    let limit = capacity.capacity;
    let experts_list: Vec<usize> = (0..num_experts).collect();
    let kept: Vec<Vec<i64>> = map_collect(&experts_list, |_, &e| {
        let rows = &dropless_rows[routed_offsets[e] as usize..routed_offsets[e + 1] as usize];
        if rows.len() <= limit {
            return Ok(rows.to_vec());
        }
        Ok(match capacity.policy {
            DropPolicy::Position => rows[..limit].to_vec(),
            DropPolicy::Weights(weights) => {
                let mut ranked = rows.to_vec();
                // Higher weight first; equal weights: lower slot first (rows are in slot order).
                let order =
                    |a: &i64, b: &i64| weights[*b as usize].total_cmp(&weights[*a as usize]).then(a.cmp(b));
                if limit > 0 {
                    ranked.select_nth_unstable_by(limit - 1, order);
                }
                ranked.truncate(limit);
                ranked.sort_unstable();
                ranked
            }
        })
    })?;

    let mut next = 0i64;
    for (e, slots) in kept.iter().enumerate() {
        out.tokens_per_expert[e] = slots.len() as i64;
        dropped[e] = routed_counts[e] - slots.len() as i64;
        out.offsets[e] = if capacity.pad { (e * limit) as i64 } else { next };
        next = out.offsets[e] + whole_blocks(slots.len() as i64, capacity.block_size);
    }
    let total_rows = if capacity.pad { num_experts * limit } else { next as usize };
    out.offsets[num_experts] = total_rows as i64;
    let kept_rows: usize = kept.iter().map(Vec::len).sum();
    if out.row_to_slot.len() < total_rows {
        return Err(CoreError::invalid(
            "num_rows",
            format!("at least the number of rows of this plan ({total_rows})"),
            format!("{}", out.row_to_slot.len()),
        ));
    }
    out.row_to_slot.fill(-1);
    out.slot_to_row.fill(-1);
    for (e, slots) in kept.iter().enumerate() {
        let first = out.offsets[e] as usize;
        for (i, &slot) in slots.iter().enumerate() {
            out.row_to_slot[first + i] = slot;
            out.slot_to_row[slot as usize] = (first + i) as i64;
        }
    }
    debug_assert!(routed >= kept_rows);
    Ok(total_rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plan {
        tokens_per_expert: Vec<i64>,
        offsets: Vec<i64>,
        row_to_slot: Vec<i64>,
        slot_to_row: Vec<i64>,
        routed: usize,
    }

    fn plan(experts: &[i64], k: usize, e: usize) -> Plan {
        blocked_plan(experts, k, e, 1)
    }

    /// The plan with each expert's rows in whole blocks, in the most rows it can need.
    fn blocked_plan(experts: &[i64], k: usize, e: usize, block_size: usize) -> Plan {
        let mut p = Plan {
            tokens_per_expert: vec![0; e],
            offsets: vec![0; e + 1],
            row_to_slot: vec![0; experts.len() + e * (block_size - 1)],
            slot_to_row: vec![0; experts.len()],
            routed: 0,
        };
        p.routed = build_plan(
            experts,
            k,
            e,
            block_size,
            PlanBuffers {
                tokens_per_expert: &mut p.tokens_per_expert,
                offsets: &mut p.offsets,
                row_to_slot: &mut p.row_to_slot,
                slot_to_row: &mut p.slot_to_row,
            },
        )
        .unwrap();
        p
    }

    #[test]
    fn plan_is_expert_major_then_slot_order() {
        // 3 tokens, k = 2, 3 experts, one empty slot.
        let p = plan(&[2, 0, 0, -1, 2, 1], 2, 3);
        assert_eq!(p.tokens_per_expert, vec![2, 1, 2]);
        assert_eq!(p.offsets, vec![0, 2, 3, 5]);
        assert_eq!(p.routed, 5);
        assert_eq!(p.row_to_slot, vec![1, 2, 5, 0, 4, -1]);
        assert_eq!(p.slot_to_row, vec![3, 0, 1, -1, 4, 2]);
    }

    #[test]
    fn blocks_pad_each_expert_to_whole_blocks_of_rows() {
        // Expert 0: 3 slots (one block of 4), expert 1: none, expert 2: 5 slots (two blocks).
        let experts = [2, 0, 2, 0, 2, 2, 0, 2];
        let p = blocked_plan(&experts, 1, 3, 4);
        assert_eq!(p.tokens_per_expert, vec![3, 0, 5]);
        assert_eq!(p.offsets, vec![0, 4, 4, 12]);
        assert_eq!(p.routed, 12);
        assert_eq!(p.row_to_slot[..12], [1, 3, 6, -1, 0, 2, 4, 5, 7, -1, -1, -1]);
        assert!(p.row_to_slot[12..].iter().all(|&s| s == -1));
        assert_eq!(p.slot_to_row, vec![4, 0, 5, 1, 6, 7, 2, 8]);
        // Within the blocks, the plan without them, shifted.
        let flat = plan(&experts, 1, 3);
        for (s, &row) in flat.slot_to_row.iter().enumerate() {
            let e = experts[s] as usize;
            assert_eq!(p.slot_to_row[s] - p.offsets[e], row - flat.offsets[e]);
        }
    }

    #[test]
    fn blocks_need_room_and_a_positive_size() {
        let mut buffers = (vec![0; 2], vec![0; 3], vec![0; 3], vec![0; 2]);
        let mut run = |block_size| {
            build_plan(
                &[0, 1],
                1,
                2,
                block_size,
                PlanBuffers {
                    tokens_per_expert: &mut buffers.0,
                    offsets: &mut buffers.1,
                    row_to_slot: &mut buffers.2,
                    slot_to_row: &mut buffers.3,
                },
            )
            .unwrap_err()
            .to_string()
        };
        assert!(run(0).starts_with("block_size"), "{}", run(0));
        let err = run(2);
        assert!(err.contains("at least the number of rows of this plan, padding included (4)"), "{err}");
    }

    #[test]
    fn capacity_plans_take_blocks_too() {
        // Expert 0 keeps 2 of its 4 slots (one block of 4), expert 1 its 1 slot, expert 2 its 2.
        let experts = [0, 1, 0, 2, 0, 2, 0];
        let cap = Capacity { capacity: 2, policy: DropPolicy::Position, pad: false, block_size: 4 };
        let (p, dropped) = capacity_plan(&experts, 1, 3, cap);
        assert_eq!(p.offsets, vec![0, 4, 8, 12]);
        assert_eq!(p.routed, 12);
        assert_eq!(p.row_to_slot[..12], [0, 2, -1, -1, 1, -1, -1, -1, 3, 5, -1, -1]);
        assert_eq!(dropped, vec![2, 0, 0]);
        // The padded layout needs a capacity of whole blocks.
        let cap = Capacity { capacity: 3, policy: DropPolicy::Position, pad: true, block_size: 2 };
        let err = one_expert_capacity_error(&[0], cap);
        assert!(err.contains("a multiple of block_size = 2"), "{err}");
    }

    #[test]
    fn out_of_range_ids_are_refused() {
        let mut buffers = (vec![0; 2], vec![0; 3], vec![0; 2], vec![0; 2]);
        let err = build_plan(
            &[0, 2],
            1,
            2,
            1,
            PlanBuffers {
                tokens_per_expert: &mut buffers.0,
                offsets: &mut buffers.1,
                row_to_slot: &mut buffers.2,
                slot_to_row: &mut buffers.3,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("2 at token 1, slot 0"), "{err}");
    }

    #[test]
    fn permute_then_combine_round_trips() {
        let experts = [1i64, 0, 1, 2];
        let p = plan(&experts, 1, 3);
        let x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let mut sorted = vec![0.0; 8];
        gather_rows(&x, 2, &p.row_to_slot, 1, None, &mut sorted).unwrap();
        assert_eq!(sorted, vec![2.0, 3.0, 0.0, 1.0, 4.0, 5.0, 6.0, 7.0]);
        let mut back = vec![0.0; 8];
        combine_rows(&sorted, 2, &p.slot_to_row, 1, None, &mut back).unwrap();
        assert_eq!(back, x);
    }

    #[test]
    fn combine_weights_in_slot_order() {
        let experts = [0i64, 1];
        let p = plan(&experts, 2, 2);
        let rows = [1.0f32, 10.0];
        let mut y = [0.0f32];
        combine_rows(&rows, 1, &p.slot_to_row, 2, Some(&[0.5, 0.25]), &mut y).unwrap();
        assert_eq!(y, [3.0]);
        let mut dots = [0.0f32; 2];
        slot_dots(&[2.0f32], &rows, 1, &p.slot_to_row, 2, &mut dots).unwrap();
        assert_eq!(dots, [2.0, 20.0]);
    }

    #[test]
    fn corrupt_plans_error_instead_of_crashing() {
        let mut out = vec![0.0f32; 2];
        let err = gather_rows(&[1.0f32, 2.0], 1, &[0, 7], 1, None, &mut out).unwrap_err();
        assert!(err.to_string().starts_with("plan.row_to_slot"), "{err}");
        let err = combine_rows(&[1.0f32], 1, &[3], 1, None, &mut out[..1]).unwrap_err();
        assert!(err.to_string().starts_with("plan.slot_to_row"), "{err}");
    }

    #[test]
    fn parallel_plan_equals_sequential_plan() {
        // Several counting chunks, so the per-chunk cursors matter.
        let (tokens, k, e) = (3 * SLOTS_PER_CHUNK / 2 + 17, 2, 13);
        let mut rng = crate::test_rng::TestRng::new(7);
        let experts: Vec<i64> = (0..tokens * k).map(|_| rng.below(e + 1) as i64 - 1).collect();
        let sequential = plan(&experts, k, e);
        let parallel = crate::threads::run(3, usize::MAX, || plan(&experts, k, e));
        assert_eq!(sequential.slot_to_row, parallel.slot_to_row);
        assert_eq!(sequential.row_to_slot, parallel.row_to_slot);
        assert_eq!(sequential.offsets, parallel.offsets);
        // Stable: within an expert, rows hold increasing slots.
        for w in sequential.row_to_slot[..sequential.routed].windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            assert!(experts[a] < experts[b] || (experts[a] == experts[b] && a < b));
        }
    }

    #[test]
    fn dot_uses_fixed_lanes() {
        let a: Vec<f32> = (0..19).map(|v| v as f32).collect();
        let exact: f32 = a.iter().map(|v| v * v).sum();
        assert_eq!(dot(&a, &a), exact);
    }

    fn capacity_plan(experts: &[i64], k: usize, e: usize, capacity: Capacity<'_>) -> (Plan, Vec<i64>) {
        let rows =
            if capacity.pad { e * capacity.capacity } else { experts.len() + e * (capacity.block_size - 1) };
        let mut p = Plan {
            tokens_per_expert: vec![0; e],
            offsets: vec![0; e + 1],
            row_to_slot: vec![0; rows],
            slot_to_row: vec![0; experts.len()],
            routed: 0,
        };
        let mut dropped = vec![0; e];
        p.routed = build_capacity_plan(
            experts,
            k,
            e,
            capacity,
            PlanBuffers {
                tokens_per_expert: &mut p.tokens_per_expert,
                offsets: &mut p.offsets,
                row_to_slot: &mut p.row_to_slot,
                slot_to_row: &mut p.slot_to_row,
            },
            &mut dropped,
        )
        .unwrap();
        (p, dropped)
    }

    /// The error of a capacity plan of `experts` (k = 1) over one expert.
    fn one_expert_capacity_error(experts: &[i64], capacity: Capacity<'_>) -> String {
        let slots = experts.len();
        let mut buffers = (vec![0; 1], vec![0; 2], vec![0; slots + 4], vec![0; slots], vec![0; 1]);
        build_capacity_plan(
            experts,
            1,
            1,
            capacity,
            PlanBuffers {
                tokens_per_expert: &mut buffers.0,
                offsets: &mut buffers.1,
                row_to_slot: &mut buffers.2,
                slot_to_row: &mut buffers.3,
            },
            &mut buffers.4,
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn position_policy_keeps_the_first_slots_of_each_expert() {
        // Tokens 0..4 with k = 2; expert 0 is chosen by slots 0, 2, 4, 6.
        let experts = [0, 1, 0, 2, 0, 1, 0, 2];
        let cap = Capacity { capacity: 2, policy: DropPolicy::Position, pad: false, block_size: 1 };
        let (p, dropped) = capacity_plan(&experts, 2, 3, cap);
        assert_eq!(p.tokens_per_expert, vec![2, 2, 2]);
        assert_eq!(dropped, vec![2, 0, 0]);
        assert_eq!(p.offsets, vec![0, 2, 4, 6]);
        assert_eq!(&p.row_to_slot[..6], &[0, 2, 1, 5, 3, 7]);
        assert_eq!(p.slot_to_row, vec![0, 2, 1, 4, -1, 3, -1, 5]);
        assert_eq!(p.routed, 6);
    }

    #[test]
    fn weights_policy_keeps_the_heaviest_slots_ties_to_lower_slot_in_slot_order() {
        let experts = [0, 0, 0, 0, 1];
        let weights = [0.5, 0.9, 0.5, 0.9, 0.1];
        let cap = Capacity { capacity: 3, policy: DropPolicy::Weights(&weights), pad: false, block_size: 1 };
        let (p, dropped) = capacity_plan(&experts, 1, 2, cap);
        // 0.9 (slot 1), 0.9 (slot 3), then the tie at 0.5 goes to slot 0.
        assert_eq!(&p.row_to_slot[..4], &[0, 1, 3, 4]);
        assert_eq!(dropped, vec![1, 0]);
        assert_eq!(p.slot_to_row, vec![0, 1, -1, 2, 3]);
    }

    #[test]
    fn padded_layout_gives_every_expert_capacity_rows() {
        let experts = [1, 1, 1, 0];
        let cap = Capacity { capacity: 2, policy: DropPolicy::Position, pad: true, block_size: 1 };
        let (p, dropped) = capacity_plan(&experts, 1, 3, cap);
        assert_eq!(p.offsets, vec![0, 2, 4, 6]);
        assert_eq!(p.row_to_slot, vec![3, -1, 0, 1, -1, -1]);
        assert_eq!(p.tokens_per_expert, vec![1, 2, 0]);
        assert_eq!(dropped, vec![0, 1, 0]);
        assert_eq!(p.slot_to_row, vec![2, 3, -1, 0]);
    }

    #[test]
    fn zero_capacity_drops_everything_and_nan_weights_are_rejected() {
        let cap = Capacity { capacity: 0, policy: DropPolicy::Position, pad: false, block_size: 1 };
        let (p, dropped) = capacity_plan(&[0, 1, 1], 1, 2, cap);
        assert_eq!((p.routed, dropped), (0, vec![1, 2]));
        assert!(p.slot_to_row.iter().all(|&r| r == -1));
        let weights = [0.1, f32::NAN];
        let cap = Capacity { capacity: 1, policy: DropPolicy::Weights(&weights), pad: false, block_size: 1 };
        assert!(one_expert_capacity_error(&[0, 0], cap).contains("weights"));
    }
}
