//! Load-balancing statistics: per-group sums of normalised router scores (with their
//! gradient), per-group expert counts, and the router z-loss.
//!
//! Tokens are split into consecutive groups of `group_size` (one group for a batch-level
//! loss, one per sequence for a sequence-level loss); an optional mask excludes tokens
//! (padding). Sums are accumulated in f64 over fixed blocks of tokens and the blocks are
//! reduced in order, so results do not depend on the thread count.

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::element::{fma_exp_f32, Accumulator, Element};
use crate::error::{check_len, CoreError, Result};
use crate::gating::ScoreFunction;
use crate::lanes::LANES;
use crate::simd::multiversion;
use crate::threads::{for_each_block, for_each_block2_with, for_each_pair, map_collect};
use num_traits::{Float, One, ToPrimitive, Zero};

/// Tokens per reduction block.
const TOKENS_PER_BLOCK: usize = 1024;

/// The token layout shared by the kernels of this module.
#[derive(Clone, Copy, Debug)]
pub struct Groups<'a> {
    pub num_tokens: usize,
    /// Tokens per group (the last group may be shorter); at least 1.
    pub group_size: usize,
    /// `[T]`: 0 for tokens to ignore (padding), anything else for tokens that count.
    pub mask: Option<&'a [u8]>,
}

impl Groups<'_> {
    pub fn count(&self) -> usize {
        self.num_tokens.div_ceil(self.group_size.max(1))
    }

    fn validate(&self) -> Result<()> {
        if self.group_size == 0 {
            return Err(CoreError::invalid("seq_len", "at least 1", "0"));
        }
        if let Some(mask) = self.mask {
            check_len("attention_mask", mask, self.num_tokens)?;
        }
        Ok(())
    }

    fn valid(&self, token: usize) -> bool {
        self.mask.is_none_or(|m| m[token] != 0)
    }
}

fn check_logits<L: Element>(logits: &[L], num_experts: usize, num_tokens: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(CoreError::invalid("logits", "at least one expert (E >= 1)", "E = 0"));
    }
    check_len("logits", logits, num_tokens * num_experts)
}

fn load_row<L: Element>(row: &[L], token: usize, out: &mut Vec<L::Acc>) -> Result<()> {
    out.clear();
    out.extend(row.iter().map(|v| v.to_acc()));
    match out.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(e) => Err(CoreError::invalid(
            "logits",
            "finite values",
            format!("{:?} at token {token}, expert {e}", out[e]),
        )),
    }
}

/// Sum in eight interleaved lanes (element `i` into lane `i % 8`), then the lanes in order:
/// a fixed order that the compiler can vectorise, unlike one running sum.
fn lane_sum<A: Accumulator>(values: &[A]) -> A {
    let mut lanes = [A::zero(); LANES];
    let mut blocks = values.chunks_exact(LANES);
    for block in &mut blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            *lane = *lane + v;
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(blocks.remainder()) {
        *lane = *lane + v;
    }
    lanes.iter().copied().fold(A::zero(), |a, b| a + b)
}

/// The largest value, lane-wise like `lane_sum` (max is exact, so the order cannot matter).
fn lane_max<A: Accumulator>(values: &[A]) -> A {
    let mut lanes = [A::neg_infinity(); LANES];
    let mut blocks = values.chunks_exact(LANES);
    for block in &mut blocks {
        A::lane_max(&mut lanes, block.try_into().expect("chunks of LANES"));
    }
    for (lane, &v) in lanes.iter_mut().zip(blocks.remainder()) {
        if v > *lane {
            *lane = v;
        }
    }
    lanes.iter().copied().fold(A::neg_infinity(), A::max)
}

/// `exp(l - max(l))` of one token's logits into `out`; returns the max.
fn shifted_exp<A: Accumulator>(logits: &[A], out: &mut Vec<A>) -> A {
    let m = lane_max(logits);
    out.clear();
    out.extend(logits.iter().map(|&l| l - m));
    A::exp_in_place(out);
    m
}

/// The sigmoids of one token's logits into `out`.
fn sigmoids<A: Accumulator>(logits: &[A], out: &mut Vec<A>) {
    out.clear();
    out.extend(logits.iter().map(|&l| -l));
    A::exp_in_place(out);
    out.iter_mut().for_each(|e| *e = A::one() / (A::one() + *e));
}

/// The normalised scores of one token: softmax, or sigmoid divided by its sum (+ eps).
fn normalised_scores<A: Accumulator>(logits: &[A], score: ScoreFunction, out: &mut Vec<A>) {
    match score {
        ScoreFunction::Softmax => {
            shifted_exp(logits, out);
            normalise(out, A::zero());
        }
        ScoreFunction::Sigmoid => {
            sigmoids(logits, out);
            normalise(out, A::SIGMOID_NORM_EPS);
        }
    }
}

/// Divides `values` by their lane sum plus `eps`; returns that divisor.
fn normalise<A: Accumulator>(values: &mut [A], eps: A) -> A {
    let z = lane_sum(values) + eps;
    let inverse = A::one() / z;
    values.iter_mut().for_each(|v| *v = *v * inverse);
    z
}

/// Per-block partial sums `(group, values)` reduced in block order into `out [G, width]`.
fn reduce_blocks(partials: Vec<Vec<(usize, Vec<f64>)>>, width: usize, out: &mut [f64]) {
    out.fill(0.0);
    for block in partials {
        for (group, values) in block {
            for (o, v) in out[group * width..(group + 1) * width].iter_mut().zip(values) {
                *o += v;
            }
        }
    }
}

fn token_blocks(num_tokens: usize) -> Vec<(usize, usize)> {
    (0..num_tokens).step_by(TOKENS_PER_BLOCK).map(|s| (s, (s + TOKENS_PER_BLOCK).min(num_tokens))).collect()
}

/// `out[g, e]` = sum over the valid tokens `t` of group `g` of the normalised score `p[t, e]`.
pub fn score_sums<L: Element>(
    logits: &[L],
    num_experts: usize,
    score: ScoreFunction,
    groups: Groups<'_>,
    out: &mut [f64],
) -> Result<()> {
    groups.validate()?;
    check_logits(logits, num_experts, groups.num_tokens)?;
    check_len("out", out, groups.count() * num_experts)?;
    let partials = map_collect(&token_blocks(groups.num_tokens), |_, &(start, end)| {
        let mut sums: Vec<(usize, Vec<f64>)> = Vec::new();
        let (mut row, mut p) = (Vec::new(), Vec::new());
        for t in start..end {
            if !groups.valid(t) {
                continue;
            }
            let g = t / groups.group_size;
            if sums.last().is_none_or(|(last, _)| *last != g) {
                sums.push((g, vec![0.0; num_experts]));
            }
            load_row(&logits[t * num_experts..(t + 1) * num_experts], t, &mut row)?;
            normalised_scores(&row, score, &mut p);
            let acc = &mut sums.last_mut().expect("pushed above").1;
            for (a, &v) in acc.iter_mut().zip(&p) {
                *a += v.to_f64().unwrap_or(f64::NAN);
            }
        }
        Ok(sums)
    })?;
    reduce_blocks(partials, num_experts, out);
    Ok(())
}

/// The gradient of `score_sums`: `grad_logits[t] = J_t^T grad_sums[g(t)]` for valid tokens
/// (J_t the Jacobian of token t's normalised scores), zero for masked ones.
pub fn score_sums_backward<L: Element>(
    logits: &[L],
    num_experts: usize,
    score: ScoreFunction,
    groups: Groups<'_>,
    grad_sums: &[L::Acc],
    grad_logits: &mut [L],
) -> Result<()> {
    groups.validate()?;
    check_logits(logits, num_experts, groups.num_tokens)?;
    check_len("grad_sums", grad_sums, groups.count() * num_experts)?;
    check_len("grad_logits", grad_logits, logits.len())?;
    for_each_block(grad_logits, num_experts, TOKENS_PER_BLOCK, |first, block| {
        let (mut row, mut p, mut s, mut products) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, out) in block.chunks_exact_mut(num_experts).enumerate() {
            let t = first + i;
            if !groups.valid(t) {
                out.fill(L::from_acc(L::Acc::zero()));
                continue;
            }
            let a = &grad_sums[(t / groups.group_size) * num_experts..][..num_experts];
            load_row(&logits[t * num_experts..(t + 1) * num_experts], t, &mut row)?;
            // Sigmoid keeps the raw sigmoids `s` and their divisor for the chain rule.
            let z = match score {
                ScoreFunction::Softmax => {
                    normalised_scores(&row, score, &mut p);
                    L::Acc::one()
                }
                ScoreFunction::Sigmoid => {
                    sigmoids(&row, &mut s);
                    p.clone_from(&s);
                    normalise(&mut p, L::Acc::SIGMOID_NORM_EPS)
                }
            };
            products.clear();
            products.extend(p.iter().zip(a).map(|(&pe, &ae)| pe * ae));
            let dot = lane_sum(&products);
            match score {
                // d p_e / d l_j = p_e (delta_ej - p_j)
                ScoreFunction::Softmax => {
                    for ((o, &pj), &aj) in out.iter_mut().zip(&p).zip(a) {
                        *o = L::from_acc(pj * (aj - dot));
                    }
                }
                // p = s / (S + eps): dL/ds_j = (a_j - dot) / (S + eps), ds/dl = s (1 - s)
                ScoreFunction::Sigmoid => {
                    for ((o, &sj), &aj) in out.iter_mut().zip(&s).zip(a) {
                        *o = L::from_acc((aj - dot) / z * sj * (L::Acc::one() - sj));
                    }
                }
            }
        }
        Ok(())
    })
}

/// `out[g, e]` = slots of the valid tokens of group `g` routed to expert `e` (`experts` is
/// `[T, k]`; -1 slots are skipped, other ids must be in `[0, E)`).
pub fn expert_counts(
    experts: &[i64],
    k: usize,
    num_experts: usize,
    groups: Groups<'_>,
    out: &mut [i64],
) -> Result<()> {
    groups.validate()?;
    check_len("experts", experts, groups.num_tokens * k)?;
    check_len("out", out, groups.count() * num_experts)?;
    out.fill(0);
    for t in 0..groups.num_tokens {
        if !groups.valid(t) {
            continue;
        }
        let g = t / groups.group_size;
        for (j, &id) in experts[t * k..(t + 1) * k].iter().enumerate() {
            if id == -1 {
                continue;
            }
            if id < 0 || id as u64 >= num_experts as u64 {
                return Err(CoreError::invalid(
                    "experts",
                    format!("expert ids in [0, {num_experts}) or -1 for an empty slot"),
                    format!("{id} at token {t}, slot {j}"),
                ));
            }
            out[g * num_experts + id as usize] += 1;
        }
    }
    Ok(())
}

/// The error for a row whose log-sum-exp is not finite: names its first NaN or `+inf`.
fn non_finite_row_error<L: Element>(row: &[L], token: usize) -> CoreError {
    let e = row.iter().position(|v| v.to_acc().is_nan() || v.to_acc() == L::Acc::infinity()).unwrap_or(0);
    CoreError::invalid(
        "logits",
        "finite values",
        format!("{:?} at token {token}, expert {e}", row[e].to_acc()),
    )
}

/// Values the z-loss forward keeps per token for its backward: the row's maximum and the
/// gradient factor `scale * 2 z / sum` (see [`z_loss`]).
pub const Z_LOSS_STATS: usize = 2;

/// The z-loss in one pass over the logits: returns the sum over valid tokens of `z_t^2`,
/// `z_t = logsumexp(logits[t])` (accumulated in f64, in token order), and writes to
/// `stats[t]` (`[T, Z_LOSS_STATS]`) the row's maximum `m_t` and the factor
/// `f_t = scale * 2 z_t / sum_t`, `sum_t = sum_e exp(l_e - m_t)`, from which
/// [`z_loss_backward`] recomputes the gradient `scale * 2 z_t softmax(logits[t])` (masked
/// tokens: `(0, 0)`). Keeping two values per token instead of the `[T, E]` gradient is what
/// lets the backward read the logits again rather than a saved float32 copy of the gradient.
/// `exp` and `ln` are [`crate::Accumulator::loss_exp`] and `loss_ln`, in fused multiply-adds
/// for `f32`: every SIMD level computes the same bits, and the GPU's z-loss agrees within
/// float tolerance. A `-inf` logit counts as probability 0; NaN and `+inf` are errors.
pub fn z_loss<L: Element>(
    logits: &[L],
    num_experts: usize,
    groups: Groups<'_>,
    scale: L::Acc,
    stats: &mut [L::Acc],
) -> Result<f64> {
    let (avx2, avx512) = (crate::simd::avx2_enabled(), crate::simd::avx512_enabled());
    z_loss_on(logits, avx2, avx512, num_experts, groups, scale, stats)
}

/// [`z_loss`] with the choice of kernels given (`avx2`: where the storage allows; `avx512`:
/// with AVX-512 exponentials, where a row fills a sixteen-lane block; the caller checked the
/// CPU has what it asks for), so that tests can run every path in one process.
fn z_loss_on<L: Element>(
    logits: &[L],
    avx2: bool,
    avx512: bool,
    num_experts: usize,
    groups: Groups<'_>,
    scale: L::Acc,
    stats: &mut [L::Acc],
) -> Result<f64> {
    groups.validate()?;
    check_logits(logits, num_experts, groups.num_tokens)?;
    check_len("stats", stats, groups.num_tokens * Z_LOSS_STATS)?;
    let mut squares = vec![0.0f64; groups.num_tokens];
    #[cfg(target_arch = "x86_64")]
    let simd = L::storage(logits).filter(|_| avx2);
    // AVX-512 exponentials where the CPU has them and a row fills a sixteen-lane block.
    #[cfg(target_arch = "x86_64")]
    let wide = avx2 && avx512 && num_experts >= 16;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (avx2, avx512);
    let row_of = |t: usize| &logits[t * num_experts..(t + 1) * num_experts];
    // A valid row's z, its stats and its square, from its maximum, sum and log of the sum.
    let finish =
        |t: usize, (m, sum, ln): (L::Acc, L::Acc, L::Acc), stats: &mut [L::Acc], square: &mut f64| {
            let z = m + ln;
            if !z.is_finite() {
                return Err(non_finite_row_error(row_of(t), t));
            }
            stats[0] = m;
            stats[1] = (L::Acc::one() + L::Acc::one()) * scale * z / sum;
            let z = z.to_f64().unwrap_or(f64::NAN);
            *square = z * z;
            Ok(())
        };
    for_each_block2_with(
        (stats, Z_LOSS_STATS),
        (&mut squares, 1),
        TOKENS_PER_BLOCK,
        // A single row's exponentials go to this scratch, not to memory (the backward
        // recomputes them); groups of rows only sum theirs.
        Vec::new,
        |scratch: &mut Vec<L::Acc>, first, block, block_squares| {
            let tokens = block_squares.len();
            // Whole groups of unmasked rows go through the multi-row kernel where it applies;
            // the others row by row.
            #[cfg(target_arch = "x86_64")]
            let group = if wide { crate::simd::avx512::ROWS } else { 1 };
            #[cfg(not(target_arch = "x86_64"))]
            let group = 1;
            scratch.resize(num_experts, L::Acc::zero());
            #[cfg(target_arch = "x86_64")]
            if let (Some(rows), Some(scratch)) = (simd, L::Acc::as_f32_mut(scratch)) {
                // (The accumulator is f32 here.)
                let acc = |(m, sum, ln): (f32, f32, f32)| {
                    let acc = |v: f32| L::Acc::from_f64(f64::from(v));
                    (acc(m), acc(sum), acc(ln))
                };
                let mut r = 0;
                while r < tokens {
                    let t0 = first + r;
                    if group > 1 && r + group <= tokens && (t0..t0 + group).all(|t| groups.valid(t)) {
                        // SAFETY: `avx512_enabled` checked the CPU features; the rows t0 .. t0 +
                        // ROWS lie inside the logits (checked above); num_experts >= 16.
                        let (maxima, sums, logs) =
                            unsafe { avx2::z_loss_rows_avx512(rows, t0 * num_experts, num_experts) };
                        for i in 0..group {
                            let out = &mut block[(r + i) * Z_LOSS_STATS..][..Z_LOSS_STATS];
                            finish(
                                t0 + i,
                                acc((maxima[i], sums[i], logs[i])),
                                out,
                                &mut block_squares[r + i],
                            )?;
                        }
                        r += group;
                        continue;
                    }
                    let out = &mut block[r * Z_LOSS_STATS..][..Z_LOSS_STATS];
                    if groups.valid(t0) {
                        let row = &mut scratch[..num_experts];
                        // SAFETY: `avx2_enabled` (and with `wide`, `avx512_enabled`) checked the
                        // CPU features; the row lies inside the logits (checked above).
                        let parts = unsafe {
                            if wide {
                                avx2::z_loss_row_avx512(rows, t0 * num_experts, row)
                            } else {
                                avx2::z_loss_row(rows, t0 * num_experts, row)
                            }
                        };
                        finish(t0, acc(parts), out, &mut block_squares[r])?;
                    } else {
                        out.fill(L::Acc::zero());
                    }
                    r += 1;
                }
                return Ok(());
            }
            let scratch = &mut scratch[..num_experts];
            for (i, (out, square)) in
                block.chunks_exact_mut(Z_LOSS_STATS).zip(block_squares.iter_mut()).enumerate()
            {
                let t = first + i;
                if !groups.valid(t) {
                    out.fill(L::Acc::zero());
                    continue;
                }
                for (o, v) in scratch.iter_mut().zip(row_of(t)) {
                    *o = v.to_acc();
                }
                let m = lane_max(scratch);
                scratch.iter_mut().for_each(|v| *v = (*v - m).loss_exp());
                let sum = lane_sum(scratch);
                finish(t, (m, sum, sum.loss_ln()), out, square)?;
            }
            Ok(())
        },
    )?;
    Ok(squares.iter().sum())
}

/// The z-loss gradient from the logits and the forward's `stats` ([`z_loss`]):
/// `out[t, e] = (exp(l - m_t) * f_t) * grad`, rounded to the logits' type (the bits the
/// forward's `exp` gives, and the product in that order). Rows whose factor is 0 get zeros
/// without reading their logits: masked tokens (which may hold anything, NaN included), and
/// rows whose z is exactly 0, whose gradient is 0.
pub fn z_loss_backward<L: Element>(
    logits: &[L],
    num_experts: usize,
    stats: &[L::Acc],
    grad: f64,
    out: &mut [L],
) -> Result<()> {
    let (avx2, avx512) = (crate::simd::avx2_enabled(), crate::simd::avx512_enabled());
    z_loss_backward_on(logits, avx2, avx512, num_experts, stats, grad, out)
}

/// [`z_loss_backward`] with the choice of kernels given (as [`z_loss_on`]).
fn z_loss_backward_on<L: Element>(
    logits: &[L],
    avx2: bool,
    avx512: bool,
    num_experts: usize,
    stats: &[L::Acc],
    grad: f64,
    out: &mut [L],
) -> Result<()> {
    let num_tokens = logits.len().checked_div(num_experts).unwrap_or(0);
    check_logits(logits, num_experts, num_tokens)?;
    check_len("stats", stats, num_tokens * Z_LOSS_STATS)?;
    check_len("out", out, logits.len())?;
    let grad = L::Acc::from_f64(grad);
    #[cfg(target_arch = "x86_64")]
    let simd = L::storage(logits).filter(|_| avx2);
    #[cfg(target_arch = "x86_64")]
    let wide = avx2 && avx512 && num_experts >= 16;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (avx2, avx512);
    for_each_block(out, num_experts, TOKENS_PER_BLOCK, |first, block| {
        // One row's values before their rounding to the logits' type.
        let mut row = vec![L::Acc::zero(); num_experts];
        for (i, out) in block.chunks_exact_mut(num_experts).enumerate() {
            let t = first + i;
            let (m, factor) = (stats[t * Z_LOSS_STATS], stats[t * Z_LOSS_STATS + 1]);
            if factor == L::Acc::zero() {
                out.fill(L::from_acc(L::Acc::zero()));
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if let (Some(rows), Some(scratch)) = (simd, L::Acc::as_f32_mut(&mut row)) {
                let to_f32 = |v: L::Acc| v.to_f32().unwrap_or(f32::NAN);
                let (m, factor, grad) = (to_f32(m), to_f32(factor), to_f32(grad));
                // A float32 gradient is written in place; the others go through the scratch
                // row and are rounded from it.
                let direct = L::as_f32_mut(out);
                let in_place = direct.is_some();
                let target = direct.unwrap_or(scratch);
                // SAFETY: `avx2_enabled` (with `wide`, `avx512_enabled`) checked the CPU
                // features; the row lies inside the logits (checked above).
                unsafe {
                    if wide {
                        avx2::z_loss_gradient_row_avx512(rows, t * num_experts, m, factor, grad, target)
                    } else {
                        avx2::z_loss_gradient_row(rows, t * num_experts, m, factor, grad, target)
                    }
                };
                if !in_place {
                    for (o, &v) in out.iter_mut().zip(&row) {
                        *o = L::from_acc(v);
                    }
                }
                continue;
            }
            for (o, v) in out.iter_mut().zip(&logits[t * num_experts..(t + 1) * num_experts]) {
                *o = L::from_acc(((v.to_acc() - m).loss_exp() * factor) * grad);
            }
        }
        Ok(())
    })
}

/// Tokens per block of the Sinkhorn iteration (its column sums add blocks in order).
pub const SINKHORN_BLOCK: usize = 512;
const SINKHORN_EPS: f32 = 1e-8;

/// `cost = fma_exp(logits)`; false when a logit is NaN, `-inf` or above 88 (then `cost` is
/// partly written). One pass: the check is folded into the same loop. It takes the fused
/// `exp` (13 operations against `fast_exp`'s 21; the GPU's `sr_fma_exp` computes the same
/// bits) because it is compute-bound: with `fast_exp` it took 40% of the whole at 16384 x 64.
#[inline(always)]
fn sinkhorn_cost(logits: &[f32], cost: &mut [f32]) -> bool {
    let mut ok = true;
    for (c, &l) in cost.iter_mut().zip(logits) {
        ok &= (l <= 88.0) & (l > f32::NEG_INFINITY);
        *c = fma_exp_f32(l);
    }
    ok
}

/// The scores of a block of rows: `cost[t, e] = d1[e] * cost[t, e] * d0[t]`, in that order.
#[inline(always)]
fn sinkhorn_scores(block: &mut [f32], d0: &[f32], d1: &[f32]) {
    for (row, &d) in block.chunks_exact_mut(d1.len()).zip(d0) {
        for (v, &w) in row.iter_mut().zip(d1) {
            *v = w * *v * d;
        }
    }
}

/// One block of a Sinkhorn iteration: for each row, `d0 = t_inv / (sum_e d1[e] row[e] +
/// eps)` (the sum in eight lanes, as [`lane_sum`]), and `columns = sum of d0 * row` in row
/// order. With AVX2, eight rows at a time ([`avx2::sinkhorn_rows8`], the same bits).
fn sinkhorn_block(avx2: bool, rows: &[f32], d1: &[f32], t_inv: f32, d0: &mut [f32], columns: &mut [f32]) {
    columns.fill(0.0);
    // Rows done eight at a time; the rest go row by row.
    #[cfg(target_arch = "x86_64")]
    let done = if avx2 && !d1.is_empty() {
        let groups = rows.chunks_exact(8 * d1.len()).zip(d0.chunks_exact_mut(8));
        let count = groups.len();
        for (group, d) in groups {
            let d: &mut [f32; 8] = d.try_into().expect("chunks of eight");
            // SAFETY: `avx2` says the features are available; eight rows of `d1.len()`.
            unsafe { avx2::sinkhorn_rows8(group, d1, t_inv, SINKHORN_EPS, d, columns) };
        }
        8 * count
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    multiversion!(avx2, sinkhorn_rows(&rows[done * d1.len()..], d1, t_inv, &mut d0[done..], columns));
}

/// [`sinkhorn_block`] row by row, adding into `columns`.
#[inline(always)]
fn sinkhorn_rows(rows: &[f32], d1: &[f32], t_inv: f32, d0: &mut [f32], columns: &mut [f32]) {
    let e = d1.len();
    let whole = e / LANES * LANES;
    for (row, d) in rows.chunks_exact(e).zip(d0.iter_mut()) {
        let mut lanes = [0.0f32; LANES];
        for (r, w) in row.chunks_exact(LANES).zip(d1.chunks_exact(LANES)) {
            for l in 0..LANES {
                lanes[l] += w[l] * r[l];
            }
        }
        for (lane, (r, w)) in lanes.iter_mut().zip(row[whole..].iter().zip(&d1[whole..])) {
            *lane += w * r;
        }
        let sum = lanes.iter().fold(0.0f32, |a, &b| a + b);
        *d = t_inv / (sum + SINKHORN_EPS);
        let d = *d;
        for (c, r) in columns.chunks_exact_mut(LANES).zip(row.chunks_exact(LANES)) {
            for l in 0..LANES {
                c[l] += d * r[l];
            }
        }
        for (c, r) in columns[whole..].iter_mut().zip(&row[whole..]) {
            *c += d * r;
        }
    }
}

/// Sinkhorn balancing as Megatron-Core's `sinkhorn` computes it: `cost = exp(logits)`, then
/// alternately `d0[t] = (1/T) / (sum_e d1[e] cost[t, e] + eps)` and
/// `d1[e] = (1/E) / (sum_t d0[t] cost[t, e] + eps)` (eps = 1e-8, d0 = d1 = 1 at the start)
/// until the mean absolute change of `d1` is at most `tol` (or after `max_iters`
/// iterations); `out[t, e] = d1[e] * cost[t, e] * d0[t]`. Sums run in f32: over experts in
/// eight lanes in index order; over tokens per block of [`SINKHORN_BLOCK`] tokens in order,
/// then the blocks in order (so the result does not depend on the thread count). Returns
/// the number of iterations.
pub fn sinkhorn(
    logits: &[f32],
    num_tokens: usize,
    num_experts: usize,
    tol: f32,
    max_iters: Option<usize>,
    out: &mut [f32],
) -> Result<usize> {
    check_logits(logits, num_experts, num_tokens)?;
    check_len("out", out, logits.len())?;
    if tol.is_nan() || tol < 0.0 {
        return Err(CoreError::invalid("tol", "a value >= 0", format!("{tol}")));
    }
    if num_tokens == 0 {
        return Ok(0);
    }
    let (avx2, avx512) = (crate::simd::avx2_enabled(), crate::simd::avx512_enabled());
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx512;
    let (t_inv, e_inv) = (1.0 / num_tokens as f32, 1.0 / num_experts as f32);
    let mut d0 = vec![1.0f32; num_tokens];
    let mut d1 = vec![1.0f32; num_experts];
    let mut partials = vec![0.0f32; num_tokens.div_ceil(SINKHORN_BLOCK) * num_experts];
    // cost = exp(logits), into `out`, in one pass that also checks every logit keeps it
    // finite; each block then runs the first iteration's pass (d1 = 1) while its rows are
    // still in cache: the same function as every later iteration, so the same bits.
    let first_pass_done = max_iters != Some(0);
    {
        let mut cost_blocks: Vec<(&mut [f32], &mut [f32])> =
            out.chunks_mut(SINKHORN_BLOCK * num_experts).zip(d0.chunks_mut(SINKHORN_BLOCK)).collect();
        let mut column_blocks: Vec<&mut [f32]> = partials.chunks_mut(num_experts).collect();
        let d1 = &d1;
        for_each_pair(&mut cost_blocks, &mut column_blocks, |b, (block, d0_block), columns| {
            let start = b * SINKHORN_BLOCK * num_experts;
            let logits = &logits[start..start + block.len()];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `avx512_enabled` checked the CPU features; `block` is as long as `logits`.
            let finite = if avx512 {
                unsafe { crate::simd::avx512::exp_checked(logits, block) }
            } else {
                multiversion!(avx2, sinkhorn_cost(logits, block))
            };
            #[cfg(not(target_arch = "x86_64"))]
            let finite = multiversion!(avx2, sinkhorn_cost(logits, block));
            if !finite {
                // NaN fails `<=` too.
                let i =
                    start + logits.iter().position(|l| !(*l <= 88.0 && *l > f32::NEG_INFINITY)).unwrap_or(0);
                return Err(CoreError::invalid(
                    "logits",
                    "finite values <= 88 (exp(logits) must not overflow float32)",
                    format!("{} at token {}, expert {}", logits[i - start], i / num_experts, i % num_experts),
                ));
            }
            if first_pass_done {
                sinkhorn_block(avx2, block, d1, t_inv, d0_block, columns);
            }
            Ok(())
        })?;
    }
    let cost: &[f32] = out;
    let mut iterations = 0;
    loop {
        if max_iters.is_some_and(|limit| iterations >= limit) {
            break;
        }
        iterations += 1;
        // One pass per iteration (the first one ran with the cost pass): each block of tokens
        // sets its d0 from d1 and adds its d0-weighted rows into its own partial column sums.
        if iterations > 1 || !first_pass_done {
            let mut d0_blocks: Vec<&mut [f32]> = d0.chunks_mut(SINKHORN_BLOCK).collect();
            let mut column_blocks: Vec<&mut [f32]> = partials.chunks_mut(num_experts).collect();
            for_each_pair(&mut d0_blocks, &mut column_blocks, |b, d0_block, columns| {
                let rows = &cost[b * SINKHORN_BLOCK * num_experts..][..d0_block.len() * num_experts];
                sinkhorn_block(avx2, rows, &d1, t_inv, d0_block, columns);
                Ok(())
            })?;
        }
        let mut change = 0.0f32;
        for (e, w) in d1.iter_mut().enumerate() {
            let sum = partials.chunks_exact(num_experts).fold(0.0f32, |acc, block| acc + block[e]);
            let next = e_inv / (sum + SINKHORN_EPS);
            change += (next - *w).abs();
            *w = next;
        }
        if change / num_experts as f32 <= tol {
            break;
        }
    }
    for_each_block(out, num_experts, SINKHORN_BLOCK, |first, block| {
        multiversion!(avx2, sinkhorn_scores(block, &d0[first..], &d1));
        Ok(())
    })?;
    Ok(iterations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(num_tokens: usize, group_size: usize) -> Groups<'static> {
        Groups { num_tokens, group_size, mask: None }
    }

    #[test]
    fn softmax_sums_per_group_and_mask() {
        let logits = [0.0f64, 0.0, 1.0, 0.0, 0.0, 1.0];
        let mut out = vec![0.0; 4];
        score_sums(&logits, 2, ScoreFunction::Softmax, all(3, 2), &mut out).unwrap();
        let e = 1.0f64.exp();
        let p = e / (1.0 + e);
        assert!((out[0] - (0.5 + p)).abs() < 1e-12);
        assert!((out[2] - (1.0 - p)).abs() < 1e-12);
        let mask = [1u8, 0, 1];
        score_sums(
            &logits,
            2,
            ScoreFunction::Softmax,
            Groups { num_tokens: 3, group_size: 3, mask: Some(&mask) },
            &mut out[..2],
        )
        .unwrap();
        assert!((out[0] + out[1] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn counts_skip_empty_slots_and_reject_bad_ids() {
        let mut out = vec![0; 4];
        expert_counts(&[0, 1, 1, -1], 2, 2, all(2, 1), &mut out).unwrap();
        assert_eq!(out, vec![1, 1, 0, 1]);
        assert!(expert_counts(&[0, 2], 1, 2, all(2, 2), &mut out[..2]).is_err());
    }

    #[test]
    fn z_loss_of_uniform_logits() {
        let mut stats = vec![0.0f64; 2 * Z_LOSS_STATS];
        let sum = z_loss(&[0.0f64; 8], 4, all(2, 2), 1.0, &mut stats).unwrap();
        let z = 4.0f64.ln();
        assert!((sum - 2.0 * z * z).abs() < 1e-12);
        let mut grad = vec![0.0f64; 8];
        z_loss_backward(&[0.0f64; 8], 4, &stats, 1.0, &mut grad).unwrap();
        assert!(grad.iter().all(|g| (g - 2.0 * z / 4.0).abs() < 1e-12));
        z_loss_backward(&[0.0f64; 8], 4, &stats, -0.5, &mut grad).unwrap();
        assert!(grad.iter().all(|g| (g + z / 4.0).abs() < 1e-12));
        assert!(z_loss(&[0.0f64, f64::NAN], 2, all(1, 1), 1.0, &mut stats[..2]).is_err());
        // A masked token keeps factor 0, and its gradient is 0 whatever its logits hold.
        let mask = [1u8, 0];
        let masked = Groups { num_tokens: 2, group_size: 2, mask: Some(&mask) };
        let logits = [0.0f64, 1.0, f64::NAN, f64::INFINITY];
        let sum = z_loss(&logits, 2, masked, 1.0, &mut stats[..4]).unwrap();
        assert!(sum.is_finite() && stats[2..] == [0.0, 0.0]);
        z_loss_backward(&logits, 2, &stats[..4], 1.0, &mut grad[..4]).unwrap();
        assert!(grad[0] > 0.0 && grad[1] > grad[0] && grad[2..4] == [0.0, 0.0], "{grad:?}");
    }

    #[test]
    fn sinkhorn_balances_columns() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let mut out = vec![0.0; 64];
        let iterations = sinkhorn(&logits, 16, 4, 1e-6, None, &mut out).unwrap();
        assert!(iterations > 1);
        for e in 0..4 {
            let column: f32 = (0..16).map(|t| out[t * 4 + e]).sum();
            assert!((column - 0.25).abs() < 1e-4, "column {e} sums to {column}");
        }
        assert_eq!(sinkhorn(&logits, 16, 4, 0.0, Some(3), &mut out).unwrap(), 3);
        assert!(sinkhorn(&[100.0], 1, 1, 1e-4, None, &mut out[..1]).is_err());
    }

    #[test]
    fn sinkhorn_row_pass_is_the_same_eight_rows_at_a_time() {
        if !crate::simd::avx2_enabled() {
            return;
        }
        let mut rng = crate::test_rng::TestRng::new(11);
        // Rows in groups of eight and a rest; E below, at and above multiples of eight.
        for (tokens, experts) in [(8, 1), (9, 3), (16, 8), (23, 13), (8, 61), (17, 64), (5, 64), (24, 160)] {
            let cost: Vec<f32> = (0..tokens * experts).map(|_| (rng.unit_f32() * 12.0 - 6.0).exp()).collect();
            let d1: Vec<f32> = (0..experts).map(|_| rng.unit_f32() + 0.5).collect();
            let t_inv = 1.0 / tokens as f32;
            let (mut d0, mut columns) = (vec![0.0f32; tokens], vec![0.0f32; experts]);
            sinkhorn_block(true, &cost, &d1, t_inv, &mut d0, &mut columns);
            let (mut d0_rows, mut columns_rows) = (vec![0.0f32; tokens], vec![0.0f32; experts]);
            sinkhorn_rows(&cost, &d1, t_inv, &mut d0_rows, &mut columns_rows);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&d0), bits(&d0_rows), "d0, {tokens} x {experts}");
            assert_eq!(bits(&columns), bits(&columns_rows), "columns, {tokens} x {experts}");
        }
    }

    #[test]
    fn z_loss_kernels_agree_bit_for_bit() {
        if !crate::simd::avx2_enabled() {
            return;
        }
        let mut rng = crate::test_rng::TestRng::new(5);
        // Without a mask, eight consecutive rows of at least sixteen experts go through the
        // multi-row AVX-512 kernel (17 x 64: two groups and a row; 40 x 32: five), with a
        // masked last block where E is not a multiple of sixteen (61, 24, 17, 60).
        let shapes = [
            (3, 1),
            (5, 7),
            (9, 8),
            (4, 16),
            (3, 24),
            (17, 64),
            (4, 61),
            (6, 160),
            (40, 32),
            (16, 160),
            (17, 61),
            (16, 24),
            (8, 17),
            (9, 60),
        ];
        for (tokens, experts) in shapes {
            let logits: Vec<f32> = (0..tokens * experts)
                .map(|i| {
                    let r = rng.unit_f32();
                    match i % 5 {
                        0 => -0.0,
                        1 => (r * 8.0).floor(),
                        _ => r * 40.0 - 20.0,
                    }
                })
                .collect();
            let mask: Vec<u8> = (0..tokens).map(|t| u8::from(t % 3 != 1)).collect();
            let masked = Groups { num_tokens: tokens, group_size: tokens, mask: Some(&mask) };
            let layouts = [masked, Groups { mask: None, ..masked }];
            let half: Vec<half::bf16> = logits.iter().map(|&v| half::bf16::from_f32(v)).collect();
            assert_levels_agree(&logits, experts, layouts, "f32");
            assert_levels_agree(&half, experts, layouts, "bf16");
        }
    }

    /// The z-loss bits of every SIMD level the CPU has equal the portable kernel's.
    fn assert_levels_agree<L: Element<Acc = f32>>(
        logits: &[L],
        experts: usize,
        layouts: [Groups<'_>; 2],
        name: &str,
    ) {
        let portable = z_loss_bits(logits, experts, layouts, false, false);
        let tokens = logits.len() / experts;
        assert_eq!(
            portable,
            z_loss_bits(logits, experts, layouts, true, false),
            "AVX2 {name}, T = {tokens}, E = {experts}"
        );
        if crate::simd::avx512_enabled() {
            assert_eq!(
                portable,
                z_loss_bits(logits, experts, layouts, true, true),
                "AVX-512 {name}, T = {tokens}, E = {experts}"
            );
        }
    }

    /// The bits of the z-loss, its statistics and its gradient (for a negative upstream
    /// gradient) with each token layout, from the kernels `avx2` / `avx512` choose.
    fn z_loss_bits<L: Element<Acc = f32>>(
        logits: &[L],
        experts: usize,
        layouts: [Groups<'_>; 2],
        avx2: bool,
        avx512: bool,
    ) -> [(u64, Vec<u32>, Vec<f64>); 2] {
        layouts.map(|groups| {
            let mut stats = vec![0f32; groups.num_tokens * Z_LOSS_STATS];
            let total = z_loss_on(logits, avx2, avx512, experts, groups, 0.37, &mut stats).unwrap();
            let mut grad = vec![L::default(); logits.len()];
            z_loss_backward_on(logits, avx2, avx512, experts, &stats, -1.3, &mut grad).unwrap();
            let grad = grad.iter().map(|g| g.to_acc().to_f64().unwrap_or(f64::NAN)).collect();
            (total.to_bits(), stats.iter().map(|v| v.to_bits()).collect(), grad)
        })
    }
}
