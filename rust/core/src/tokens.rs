//! Token selection for conditional computation (Mixture-of-Depths, token pruning): choose
//! the positions of each sequence that a block processes, gather them into a compact
//! `[B, C, d]` tensor, and scatter the block's output back into the full `[B, S, d]`
//! sequence.
//!
//! Layout: `indices` `[B, C]` holds for each sequence the kept positions in ascending
//! order, then -1 padding when the sequence keeps fewer than `C`. Ascending order keeps
//! causal attention over the kept subset causal. The row kernels accept any indices whose
//! non-negative entries are distinct within their sequence (-1 entries are skipped
//! wherever they are), so that a kept position has exactly one row and scattering back is
//! a plain write, never a race or a sum.

use crate::dispatch::dot;
use crate::element::{Accumulator, Element};
use crate::error::{check_len, CoreError, Result};
use crate::threads::{for_each_block, for_each_block2};
use num_traits::{Float, ToPrimitive, Zero};

/// Elements copied per parallel task.
const ELEMENTS_PER_TASK: usize = 1 << 15;
/// Products within this relative distance of an integer count as that integer, so that a
/// fraction such as 0.1 of 30 positions keeps 3 (`0.1 * 30.0` is 3.0000000000000004).
const FRACTION_ROUNDING_SLACK: f64 = 1e-9;

fn rows_per_task(row_len: usize) -> usize {
    (ELEMENTS_PER_TASK / row_len.max(1)).max(1)
}

/// `ceil(fraction * length)`, except that a product within a relative 1e-9 of an integer
/// is that integer (binary floats cannot represent most decimal fractions exactly).
pub fn fraction_count(fraction: f64, length: usize) -> usize {
    let exact = fraction * length as f64;
    let nearest = exact.round();
    if (exact - nearest).abs() <= FRACTION_ROUNDING_SLACK * nearest.max(1.0) {
        nearest as usize
    } else {
        exact.ceil() as usize
    }
}

/// Which positions of a sequence are kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeepRule {
    /// The `C` highest-scoring valid positions (all of them when the sequence is shorter).
    Top,
    /// The `fraction_count(fraction, length)` highest-scoring valid positions, at most `C`.
    Fraction(f64),
    /// The valid positions whose score is greater than the threshold (compared exactly, in
    /// f64): the earliest `C` of them, so that the decision at a position depends on
    /// earlier positions only.
    Threshold(f64),
}

/// The shape of one selection: `batch` sequences of `seq_len` positions, `capacity` (C)
/// index entries per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenShape {
    pub batch: usize,
    pub seq_len: usize,
    pub capacity: usize,
}

/// The valid length of sequence `b`: `lengths[b]` (checked to lie in `[0, S]`), or `S`.
fn valid_length(lengths: Option<&[i64]>, b: usize, seq_len: usize) -> Result<usize> {
    let Some(lengths) = lengths else { return Ok(seq_len) };
    let length = lengths[b];
    if length < 0 || length as u64 > seq_len as u64 {
        return Err(CoreError::invalid(
            "lengths",
            format!("values in [0, {seq_len}] (the sequence length)"),
            format!("{length} for sequence {b}"),
        ));
    }
    Ok(length as usize)
}

/// Selects the kept positions of every sequence of `scores` `[B, S]`.
///
/// Positions at or past `lengths[b]` are never kept and their scores are not read (they
/// may be NaN). Among the valid positions, a NaN score is an error. Ranking (`Top`,
/// `Fraction`) is by score in the accumulator type, ties to the lower position; -0.0 and
/// 0.0 are equal. Writes `indices` `[B, C]` (kept positions ascending, then -1) and `mask`
/// `[B, S]` (1 at kept positions).
pub fn select_tokens<X: Element>(
    scores: &[X],
    shape: TokenShape,
    lengths: Option<&[i64]>,
    rule: KeepRule,
    indices: &mut [i64],
    mask: &mut [u8],
) -> Result<()> {
    let TokenShape { batch, seq_len, capacity } = shape;
    check_len("scores", scores, batch * seq_len)?;
    check_len("indices", indices, batch * capacity)?;
    check_len("mask", mask, batch * seq_len)?;
    if let Some(lengths) = lengths {
        check_len("lengths", lengths, batch)?;
    }
    if capacity > seq_len {
        return Err(CoreError::invalid(
            "capacity",
            format!("at most the sequence length {seq_len}"),
            capacity.to_string(),
        ));
    }
    match rule {
        KeepRule::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
            return Err(CoreError::invalid("capacity", "a fraction in (0, 1]", f.to_string()));
        }
        KeepRule::Threshold(t) if t.is_nan() => {
            return Err(CoreError::invalid("threshold", "a number", "NaN"));
        }
        _ => {}
    }
    if seq_len == 0 {
        return Ok(());
    }
    if capacity == 0 {
        // No index rows to pair the mask rows with: nothing is kept anywhere, but the
        // lengths and scores are still checked.
        mask.fill(0);
        for b in 0..batch {
            let length = valid_length(lengths, b, seq_len)?;
            check_no_nan(&scores[b * seq_len..b * seq_len + length], b)?;
        }
        return Ok(());
    }
    let sequences_per_task = (ELEMENTS_PER_TASK / (8 * seq_len)).max(1);
    for_each_block2((mask, seq_len), (indices, capacity), sequences_per_task, |first, masks, rows| {
        let mut ranked: Vec<<X::Acc as Accumulator>::Packed> = Vec::new();
        for (i, (mask, row)) in masks.chunks_mut(seq_len).zip(rows.chunks_mut(capacity)).enumerate() {
            let b = first + i;
            let length = valid_length(lengths, b, seq_len)?;
            let scores = &scores[b * seq_len..b * seq_len + length];
            check_no_nan(scores, b)?;
            mask.fill(0);
            let kept = match rule {
                KeepRule::Top => top_positions(scores, capacity.min(length), &mut ranked, row),
                KeepRule::Fraction(f) => {
                    top_positions(scores, fraction_count(f, length).min(capacity), &mut ranked, row)
                }
                KeepRule::Threshold(t) => {
                    let mut kept = 0;
                    for (p, s) in scores.iter().enumerate() {
                        if kept == capacity {
                            break;
                        }
                        // In float64, where every score and the threshold are exact.
                        if s.to_acc().to_f64().is_some_and(|s| s > t) {
                            row[kept] = p as i64;
                            kept += 1;
                        }
                    }
                    kept
                }
            };
            row[kept..].fill(-1);
            for &p in &row[..kept] {
                mask[p as usize] = 1;
            }
        }
        Ok(())
    })
}

fn check_no_nan<X: Element>(scores: &[X], b: usize) -> Result<()> {
    match scores.iter().position(|s| s.to_acc().is_nan()) {
        None => Ok(()),
        Some(p) => Err(CoreError::invalid(
            "scores",
            "no NaN among the valid positions",
            format!("NaN at sequence {b}, position {p}"),
        )),
    }
}

/// Writes the `count` best positions of `scores` (higher score, then lower position) in
/// ascending order to the front of `row`; returns `count`.
fn top_positions<X: Element>(
    scores: &[X],
    count: usize,
    ranked: &mut Vec<<X::Acc as Accumulator>::Packed>,
    row: &mut [i64],
) -> usize {
    if count == scores.len() {
        for (p, slot) in row[..count].iter_mut().enumerate() {
            *slot = p as i64;
        }
        return count;
    }
    if count == 0 {
        return 0;
    }
    ranked.clear();
    ranked.extend(scores.iter().enumerate().map(|(p, s)| s.to_acc().pack(p)));
    // Packed keys are unique (they contain the position), so the partition is exact.
    ranked.select_nth_unstable_by(count - 1, |a, b| b.cmp(a));
    for (slot, &packed) in row[..count].iter_mut().zip(&ranked[..count]) {
        *slot = <X::Acc as Accumulator>::unpack_index(packed) as i64;
    }
    row[..count].sort_unstable();
    count
}

/// For every position of every sequence, the index entry that keeps it (or -1): the
/// inverse of `indices`, checking that entries lie in `[-1, S)` and that no position is
/// kept twice in one sequence.
fn inverse_indices(indices: &[i64], shape: TokenShape) -> Result<Vec<i32>> {
    let TokenShape { batch, seq_len, capacity } = shape;
    check_len("indices", indices, batch * capacity)?;
    let mut inverse = vec![-1i32; batch * seq_len];
    for (b, row) in indices.chunks(capacity.max(1)).enumerate().take(batch) {
        for (c, &p) in row.iter().enumerate() {
            if p == -1 {
                continue;
            }
            if p < -1 || p as u64 >= seq_len as u64 {
                return Err(CoreError::invalid(
                    "indices",
                    format!("positions in [-1, {seq_len})"),
                    format!("{p} at sequence {b}, entry {c}"),
                ));
            }
            let slot = &mut inverse[b * seq_len + p as usize];
            if *slot >= 0 {
                return Err(CoreError::invalid(
                    "indices",
                    "distinct positions within each sequence",
                    format!("position {p} twice in sequence {b} (entries {} and {c})", *slot),
                ));
            }
            *slot = c as i32;
        }
    }
    Ok(inverse)
}

/// Gathers the kept rows: `out[b, c] = scale[b, p] * x[b, p]` for `p = indices[b, c]`
/// (without `scale`: a copy), zeros where `p = -1`. `x` is `[B, S, d]`, `scale` `[B, S]`,
/// `out` `[B, C, d]`.
///
/// This is gather_tokens, and the gradient of scatter_tokens with respect to its rows.
pub fn gather_tokens<X: Element>(
    x: &[X],
    shape: TokenShape,
    row_len: usize,
    indices: &[i64],
    scale: Option<&[X::Acc]>,
    out: &mut [X],
) -> Result<()> {
    let TokenShape { batch, seq_len, capacity } = shape;
    check_len("x", x, batch * seq_len * row_len)?;
    check_len("out", out, batch * capacity * row_len)?;
    if let Some(scale) = scale {
        check_len("gate", scale, batch * seq_len)?;
    }
    inverse_indices(indices, shape)?;
    if row_len == 0 {
        return Ok(());
    }
    for_each_block(out, row_len, rows_per_task(row_len), |first, block| {
        for (i, dst) in block.chunks_mut(row_len).enumerate() {
            let r = first + i;
            let p = indices[r];
            if p < 0 {
                dst.fill(X::default());
                continue;
            }
            let source = (r / capacity) * seq_len + p as usize;
            let src = &x[source * row_len..(source + 1) * row_len];
            match scale {
                None => crate::simd::copy_row(dst, src),
                Some(scale) => {
                    let w = scale[source];
                    for (o, &v) in dst.iter_mut().zip(src) {
                        *o = X::from_acc(w * v.to_acc());
                    }
                }
            }
        }
        Ok(())
    })
}

/// What a kept position of the scatter output holds.
#[derive(Clone, Copy)]
pub enum KeptRows<'a, X: Element> {
    /// The row of the kept entry (`[B, C, d]`), or zeros.
    Replace(Option<&'a [X]>),
    /// `base + gate[b, p] * rows[b, c]` computed in the accumulator type (a product, then
    /// a sum: no fused multiply-add). `gate` is `[B, S]`.
    AddGated { rows: &'a [X], gate: &'a [X::Acc] },
}

/// The full sequence after a block ran on its kept positions: `out[b, p]` is `base[b, p]`
/// (zeros without a base) at positions no entry keeps, and what `kept` says at kept ones.
/// One pass over `out` in position order. `base` and `out` are `[B, S, d]`.
///
/// This is scatter_tokens; with `base = None, Replace(Some(grad))` the gradient of
/// gather_tokens; with `Replace(None)` the gradient of a replacing scatter_tokens with
/// respect to its base.
pub fn scatter_tokens<X: Element>(
    base: Option<&[X]>,
    shape: TokenShape,
    row_len: usize,
    indices: &[i64],
    kept: KeptRows<'_, X>,
    out: &mut [X],
) -> Result<()> {
    let TokenShape { batch, seq_len, capacity } = shape;
    if let Some(base) = base {
        check_len("x", base, batch * seq_len * row_len)?;
    }
    check_len("out", out, batch * seq_len * row_len)?;
    match kept {
        KeptRows::Replace(None) => {}
        KeptRows::Replace(Some(rows)) => check_len("y", rows, batch * capacity * row_len)?,
        KeptRows::AddGated { rows, gate } => {
            check_len("y", rows, batch * capacity * row_len)?;
            check_len("gate", gate, batch * seq_len)?;
        }
    }
    let inverse = inverse_indices(indices, shape)?;
    if row_len == 0 {
        return Ok(());
    }
    for_each_block(out, row_len, rows_per_task(row_len), |first, block| {
        for (i, dst) in block.chunks_mut(row_len).enumerate() {
            let r = first + i;
            let base_row = base.map(|base| &base[r * row_len..(r + 1) * row_len]);
            let entry = inverse[r];
            if entry < 0 {
                match base_row {
                    Some(src) => crate::simd::copy_row(dst, src),
                    None => dst.fill(X::default()),
                }
                continue;
            }
            let row = (r / seq_len) * capacity + entry as usize;
            let row = row * row_len..(row + 1) * row_len;
            match kept {
                KeptRows::Replace(None) => dst.fill(X::default()),
                KeptRows::Replace(Some(rows)) => crate::simd::copy_row(dst, &rows[row]),
                KeptRows::AddGated { rows, gate } => {
                    let g = gate[r];
                    match base_row {
                        Some(src) => {
                            for ((o, &x), &y) in dst.iter_mut().zip(src).zip(&rows[row]) {
                                *o = X::from_acc(x.to_acc() + g * y.to_acc());
                            }
                        }
                        None => {
                            for (o, &y) in dst.iter_mut().zip(&rows[row]) {
                                *o = X::from_acc(g * y.to_acc());
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    })
}

/// The gradient of a gated scatter_tokens with respect to its gate:
/// `out[b, p] = dot(grad[b, p], rows[b, c])` at kept positions (`p = indices[b, c]`), 0
/// elsewhere. `grad` is `[B, S, d]`, `rows` `[B, C, d]`, `out` `[B, S]`. The dot product
/// runs in the accumulator type over fixed lanes, so it does not depend on threads.
pub fn token_dots<X: Element>(
    grad: &[X],
    rows: &[X],
    shape: TokenShape,
    row_len: usize,
    indices: &[i64],
    out: &mut [X::Acc],
) -> Result<()> {
    let TokenShape { batch, seq_len, capacity } = shape;
    check_len("grad", grad, batch * seq_len * row_len)?;
    check_len("y", rows, batch * capacity * row_len)?;
    check_len("out", out, batch * seq_len)?;
    let inverse = inverse_indices(indices, shape)?;
    for_each_block(out, 1, rows_per_task(row_len), |first, block| {
        for (i, o) in block.iter_mut().enumerate() {
            let r = first + i;
            let entry = inverse[r];
            *o = if entry < 0 {
                X::Acc::zero()
            } else {
                let row = (r / seq_len) * capacity + entry as usize;
                dot(&grad[r * row_len..(r + 1) * row_len], &rows[row * row_len..(row + 1) * row_len])
            };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threads::run;

    fn select(
        scores: &[f32],
        shape: TokenShape,
        lengths: Option<&[i64]>,
        rule: KeepRule,
    ) -> (Vec<i64>, Vec<u8>) {
        let mut indices = vec![7; shape.batch * shape.capacity];
        let mut mask = vec![7; shape.batch * shape.seq_len];
        select_tokens(scores, shape, lengths, rule, &mut indices, &mut mask).unwrap();
        (indices, mask)
    }

    #[test]
    fn fraction_counts_round_like_decimals() {
        assert_eq!(fraction_count(0.1, 30), 3);
        assert_eq!(fraction_count(0.125, 2048), 256);
        assert_eq!(fraction_count(0.3, 10), 3);
        assert_eq!(fraction_count(0.31, 10), 4);
        assert_eq!(fraction_count(1.0, 7), 7);
        assert_eq!(fraction_count(0.5, 0), 0);
        assert_eq!(fraction_count(1e-6, 5), 1);
    }

    #[test]
    fn top_positions_come_back_in_ascending_order_with_ties_to_the_lower_position() {
        let scores = [0.5, 2.0, 0.5, 3.0, 0.5, -1.0];
        let shape = TokenShape { batch: 1, seq_len: 6, capacity: 3 };
        let (indices, mask) = select(&scores, shape, None, KeepRule::Top);
        assert_eq!(indices, [0, 1, 3]);
        assert_eq!(mask, [1, 1, 0, 1, 0, 0]);
    }

    #[test]
    fn lengths_exclude_padding_and_shorten_the_selection() {
        let scores = [1.0, 2.0, f32::NAN, 9.0, 4.0, 3.0, 2.0, 1.0];
        let shape = TokenShape { batch: 2, seq_len: 4, capacity: 3 };
        let (indices, mask) = select(&scores, shape, Some(&[2, 4]), KeepRule::Top);
        assert_eq!(indices, [0, 1, -1, 0, 1, 2]);
        assert_eq!(mask, [1, 1, 0, 0, 1, 1, 1, 0]);
        let (indices, _) = select(&scores, shape, Some(&[2, 4]), KeepRule::Fraction(0.5));
        assert_eq!(indices, [1, -1, -1, 0, 1, -1]);
        let bad = select_tokens(&scores, shape, Some(&[5, 4]), KeepRule::Top, &mut [0; 6], &mut [0; 8]);
        assert!(bad.unwrap_err().to_string().starts_with("lengths: expected values in [0, 4]"));
        let nan = select_tokens(&scores, shape, Some(&[3, 4]), KeepRule::Top, &mut [0; 6], &mut [0; 8]);
        assert!(nan.unwrap_err().to_string().contains("NaN at sequence 0, position 2"));
    }

    #[test]
    fn threshold_keeps_the_earliest_positions_above_it() {
        let scores = [0.9, 0.1, 0.7, 0.8, 0.95, 0.2];
        let shape = TokenShape { batch: 1, seq_len: 6, capacity: 3 };
        let (indices, mask) = select(&scores, shape, None, KeepRule::Threshold(0.5));
        assert_eq!(indices, [0, 2, 3]);
        assert_eq!(mask, [1, 0, 1, 1, 0, 0]);
        let (indices, _) = select(&scores, shape, None, KeepRule::Threshold(0.92));
        assert_eq!(indices, [4, -1, -1]);
    }

    #[test]
    fn capacity_zero_and_empty_sequences() {
        let shape = TokenShape { batch: 2, seq_len: 3, capacity: 0 };
        let (indices, mask) = select(&[1.0; 6], shape, None, KeepRule::Top);
        assert!(indices.is_empty());
        assert_eq!(mask, [0; 6]);
        let shape = TokenShape { batch: 2, seq_len: 0, capacity: 0 };
        assert_eq!(select(&[], shape, None, KeepRule::Top), (vec![], vec![]));
        let too_many = TokenShape { batch: 1, seq_len: 2, capacity: 3 };
        assert!(select_tokens(&[0.0f32; 2], too_many, None, KeepRule::Top, &mut [0; 3], &mut [0; 2]).is_err());
    }

    #[test]
    fn gather_then_scatter_round_trips_and_gates_add() {
        let shape = TokenShape { batch: 2, seq_len: 3, capacity: 2 };
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect(); // [2, 3, 2]
        let indices = [0, 2, 1, -1];
        let mut rows = vec![0.0f32; 8];
        gather_tokens(&x, shape, 2, &indices, None, &mut rows).unwrap();
        assert_eq!(rows, [0.0, 1.0, 4.0, 5.0, 8.0, 9.0, 0.0, 0.0]);
        let mut out = vec![0.0f32; 12];
        scatter_tokens(Some(&x), shape, 2, &indices, KeptRows::Replace(Some(&rows)), &mut out).unwrap();
        assert_eq!(out, x);
        let gate = [2.0, 0.0, -1.0, 0.0, 0.5, 0.0];
        scatter_tokens(
            Some(&x),
            shape,
            2,
            &indices,
            KeptRows::AddGated { rows: &rows, gate: &gate },
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [0.0, 3.0, 2.0, 3.0, 0.0, 0.0, 6.0, 7.0, 12.0, 13.5, 10.0, 11.0]);
        scatter_tokens(None, shape, 2, &indices, KeptRows::Replace(None), &mut out).unwrap();
        assert_eq!(out, [0.0; 12]);
        let mut dots = vec![9.0f32; 6];
        token_dots(&x, &rows, shape, 2, &indices, &mut dots).unwrap();
        assert_eq!(dots, [1.0, 0.0, 41.0, 0.0, 145.0, 0.0]);
    }

    #[test]
    fn bad_indices_are_errors() {
        let shape = TokenShape { batch: 1, seq_len: 3, capacity: 2 };
        let x = [0.0f32; 3];
        let mut out = [0.0f32; 2];
        let mut err = |indices: [i64; 2]| {
            gather_tokens(&x, shape, 1, &indices, None, &mut out).unwrap_err().to_string()
        };
        assert_eq!(err([0, 3]), "indices: expected positions in [-1, 3), got 3 at sequence 0, entry 1");
        assert_eq!(err([-2, 0]), "indices: expected positions in [-1, 3), got -2 at sequence 0, entry 0");
        assert!(err([1, 1]).contains("position 1 twice in sequence 0"));
        assert!(gather_tokens(&x, shape, 1, &[-1, -1], None, &mut out).is_ok());
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        let shape = TokenShape { batch: 8, seq_len: 512, capacity: 64 };
        let d = 96;
        let scores: Vec<f32> = (0..8 * 512).map(|i| ((i * 7919 % 1009) as f32).sin()).collect();
        let x: Vec<f32> = (0..8 * 512 * d).map(|i| ((i % 977) as f32) * 0.01).collect();
        let gate: Vec<f32> = scores.iter().map(|s| s * 0.5).collect();
        let outputs = |threads: usize| {
            run(threads, usize::MAX, || {
                let (mut indices, mut mask) = (vec![0; 8 * 64], vec![0; 8 * 512]);
                select_tokens(&scores, shape, None, KeepRule::Top, &mut indices, &mut mask)?;
                let mut rows = vec![0.0f32; 8 * 64 * d];
                gather_tokens(&x, shape, d, &indices, Some(&gate), &mut rows)?;
                let mut out = vec![0.0f32; x.len()];
                scatter_tokens(
                    Some(&x),
                    shape,
                    d,
                    &indices,
                    KeptRows::AddGated { rows: &rows, gate: &gate },
                    &mut out,
                )?;
                let mut dots = vec![0.0f32; 8 * 512];
                token_dots(&out, &rows, shape, d, &indices, &mut dots)?;
                Ok::<_, CoreError>((indices, mask, rows, out, dots))
            })
            .unwrap()
        };
        let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let single = outputs(1);
        assert_eq!(single.1.iter().map(|&m| m as usize).sum::<usize>(), 8 * 64);
        for threads in [2, 3] {
            let multi = outputs(threads);
            assert_eq!(single.0, multi.0);
            assert_eq!(single.1, multi.1);
            assert_eq!(bits(&single.2), bits(&multi.2));
            assert_eq!(bits(&single.3), bits(&multi.3));
            assert_eq!(bits(&single.4), bits(&multi.4));
        }
    }
}
