//! Top-k gating: from router logits to the k experts of each token and their weights.
//!
//! Semantics (one token, logits `l` over `E` experts, all math in the accumulator type):
//! - score: softmax `s_e = exp(l_e - max l) / sum_e' exp(l_e' - max l)` or sigmoid
//!   `s_e = 1 / (1 + exp(-l_e))`.
//! - selection key: `s_e + bias_e` when a bias or group limit is given; otherwise the logit
//!   itself. Both score functions are strictly increasing, so ordering by logits is the exact
//!   order of the scores, free of the false ties that rounding the scores can create.
//! - group limit: experts form `num_groups` equal consecutive groups; a group's score is the
//!   sum of its two best keys (its one key when a group has one expert); only the
//!   `topk_groups` best groups compete.
//! - the k best keys in descending order; equal keys: lower expert index first.
//! - weights are the unbiased scores at the chosen experts. Normalised softmax weights are
//!   `exp(l_j - m) / sum_i exp(l_i - m)` over the chosen experts (`m` their largest logit:
//!   the same value as `s_j / sum_i s_i`, one rounding fewer, and never 0/0); normalised
//!   sigmoid weights are `s_j / (sum_i s_i + 1e-20)`. Then multiplied by `scale`.

use crate::element::{Accumulator, Element};
use crate::error::{check_len, CoreError, Result};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;
use std::str::FromStr;

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFunction {
    Softmax,
    Sigmoid,
}

impl FromStr for ScoreFunction {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "softmax" => Ok(ScoreFunction::Softmax),
            "sigmoid" => Ok(ScoreFunction::Sigmoid),
            other => Err(CoreError::invalid("score", "'softmax' or 'sigmoid'", format!("{other:?}"))),
        }
    }
}

/// Group-limited routing (DeepSeek-V3): only the best `topk_groups` of `num_groups` groups compete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimit {
    pub num_groups: usize,
    pub topk_groups: usize,
}

/// Everything that defines a top-k gating call besides its tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GatingConfig {
    pub num_experts: usize,
    pub k: usize,
    pub score: ScoreFunction,
    pub normalize: bool,
    pub groups: Option<GroupLimit>,
    pub scale: f64,
}

impl GatingConfig {
    pub fn validate(&self) -> Result<()> {
        let e = self.num_experts;
        if e == 0 {
            return Err(CoreError::invalid("logits", "at least one expert (E >= 1)", "E = 0"));
        }
        if self.k == 0 || self.k > e {
            return Err(CoreError::invalid("k", format!("1 <= k <= E = {e}"), format!("k = {}", self.k)));
        }
        if !self.scale.is_finite() {
            return Err(CoreError::invalid("scale", "a finite number", format!("{}", self.scale)));
        }
        if let Some(GroupLimit { num_groups, topk_groups }) = self.groups {
            if num_groups == 0 || e % num_groups != 0 {
                return Err(CoreError::invalid(
                    "num_groups",
                    format!("a positive divisor of the number of experts E = {e}"),
                    format!("{num_groups}"),
                ));
            }
            if topk_groups == 0 || topk_groups > num_groups {
                return Err(CoreError::invalid(
                    "topk_groups",
                    format!("1 <= topk_groups <= num_groups = {num_groups}"),
                    format!("{topk_groups}"),
                ));
            }
            let reachable = topk_groups * (e / num_groups);
            if self.k > reachable {
                return Err(CoreError::invalid(
                    "k",
                    format!("at most topk_groups * E / num_groups = {reachable} experts"),
                    format!("k = {}", self.k),
                ));
            }
        }
        Ok(())
    }

    fn selects_on_logits(&self) -> bool {
        self.groups.is_none()
    }
}

/// Tokens per parallel task: enough work per task to amortise scheduling.
fn tokens_per_task(num_experts: usize) -> usize {
    (16_384 / num_experts.max(1)).max(1)
}

/// Per-thread working memory of the gating kernels.
struct Scratch<A> {
    logits: Vec<A>,
    keys: Vec<A>,
    top_keys: Vec<A>,
    top_index: Vec<usize>,
    group_keys: Vec<A>,
    group_top_keys: Vec<A>,
    group_top_index: Vec<usize>,
    group_allowed: Vec<bool>,
}

impl<A: Accumulator> Scratch<A> {
    fn new(cfg: &GatingConfig) -> Self {
        let groups = cfg.groups.map_or(0, |g| g.num_groups);
        Scratch {
            logits: Vec::with_capacity(cfg.num_experts),
            keys: Vec::with_capacity(cfg.num_experts),
            top_keys: Vec::with_capacity(cfg.k + 1),
            top_index: Vec::with_capacity(cfg.k + 1),
            group_keys: Vec::with_capacity(groups),
            group_top_keys: Vec::with_capacity(groups + 1),
            group_top_index: Vec::with_capacity(groups + 1),
            group_allowed: Vec::with_capacity(groups),
        }
    }
}

/// Keeps the `k` largest of `keys` (those `allowed`) in descending order; equal keys keep
/// the lower index first. Candidates arrive in index order, so a later candidate must be
/// strictly greater to pass an earlier one. Keys are never NaN: inputs are checked finite.
fn select_top_k<A: Accumulator>(
    keys: &[A],
    allowed: impl Fn(usize) -> bool,
    k: usize,
    top_keys: &mut Vec<A>,
    top_index: &mut Vec<usize>,
) {
    top_keys.clear();
    top_index.clear();
    for (index, &key) in keys.iter().enumerate() {
        if top_keys.len() == k {
            if key <= top_keys[k - 1] || !allowed(index) {
                continue;
            }
            top_keys.pop();
            top_index.pop();
        } else if !allowed(index) {
            continue;
        }
        let at = top_keys.iter().position(|&t| key > t).unwrap_or(top_keys.len());
        top_keys.insert(at, key);
        top_index.insert(at, index);
    }
}

#[inline]
fn sigmoid<A: Accumulator>(x: A) -> A {
    A::one() / (A::one() + (-x).exp())
}

/// Loads one token's logits into the accumulator type, refusing NaN and infinities.
fn load_logits<L: Element>(row: &[L], token: usize, out: &mut Vec<L::Acc>) -> Result<()> {
    out.clear();
    out.extend(row.iter().map(|v| v.to_acc()));
    if let Some(expert) = out.iter().position(|v| !v.is_finite()) {
        return Err(CoreError::invalid(
            "logits",
            "finite values",
            format!("{:?} at token {token}, expert {expert}", out[expert]),
        ));
    }
    Ok(())
}

fn max_of<A: Accumulator>(values: impl Iterator<Item = A>) -> A {
    values.fold(A::neg_infinity(), |m, v| if v > m { v } else { m })
}

/// Softmax over all experts, in index order: `exp(l - max) / sum`.
fn softmax_into<A: Accumulator>(logits: &[A], out: &mut Vec<A>) {
    let m = max_of(logits.iter().copied());
    out.clear();
    out.extend(logits.iter().map(|&l| (l - m).exp()));
    let z: A = out.iter().copied().sum();
    for s in out.iter_mut() {
        *s = *s / z;
    }
}

/// The unbiased, unscaled-by-normalisation weights of the chosen experts (see module docs).
fn chosen_weights<A: Accumulator>(logits: &[A], chosen: &[usize], cfg: &GatingConfig, out: &mut [A]) {
    let scale = A::from_f64(cfg.scale);
    match (cfg.score, cfg.normalize) {
        (ScoreFunction::Softmax, true) => {
            let m = max_of(chosen.iter().map(|&e| logits[e]));
            for (w, &e) in out.iter_mut().zip(chosen) {
                *w = (logits[e] - m).exp();
            }
            let total: A = out.iter().copied().sum();
            for w in out.iter_mut() {
                *w = *w / total * scale;
            }
        }
        (ScoreFunction::Softmax, false) => {
            let m = max_of(logits.iter().copied());
            let z: A = logits.iter().map(|&l| (l - m).exp()).sum();
            for (w, &e) in out.iter_mut().zip(chosen) {
                *w = (logits[e] - m).exp() / z * scale;
            }
        }
        (ScoreFunction::Sigmoid, normalize) => {
            for (w, &e) in out.iter_mut().zip(chosen) {
                *w = sigmoid(logits[e]);
            }
            if normalize {
                let total: A = out.iter().copied().sum::<A>() + A::SIGMOID_NORM_EPS;
                for w in out.iter_mut() {
                    *w = *w / total;
                }
            }
            for w in out.iter_mut() {
                *w = *w * scale;
            }
        }
    }
}

fn route_token<L: Element>(
    row: &[L],
    token: usize,
    bias: Option<&[L::Acc]>,
    cfg: &GatingConfig,
    scratch: &mut Scratch<L::Acc>,
    weights: &mut [L::Acc],
    experts: &mut [i64],
) -> Result<()> {
    let Scratch {
        logits,
        keys,
        top_keys,
        top_index,
        group_keys,
        group_top_keys,
        group_top_index,
        group_allowed,
    } = scratch;
    load_logits(row, token, logits)?;

    let selection_keys: &[L::Acc] = if bias.is_none() && cfg.selects_on_logits() {
        logits
    } else {
        match cfg.score {
            ScoreFunction::Softmax => softmax_into(logits, keys),
            ScoreFunction::Sigmoid => {
                keys.clear();
                keys.extend(logits.iter().map(|&l| sigmoid(l)));
            }
        }
        if let Some(bias) = bias {
            for (key, &b) in keys.iter_mut().zip(bias) {
                *key = *key + b;
            }
        }
        keys
    };

    match cfg.groups {
        None => select_top_k(selection_keys, |_| true, cfg.k, top_keys, top_index),
        Some(GroupLimit { num_groups, topk_groups }) => {
            let group_size = cfg.num_experts / num_groups;
            group_keys.clear();
            for group in selection_keys.chunks_exact(group_size) {
                select_top_k(group, |_| true, group_size.min(2), top_keys, top_index);
                group_keys.push(top_keys.iter().copied().sum());
            }
            select_top_k(group_keys, |_| true, topk_groups, group_top_keys, group_top_index);
            group_allowed.clear();
            group_allowed.resize(num_groups, false);
            for &g in group_top_index.iter() {
                group_allowed[g] = true;
            }
            select_top_k(selection_keys, |e| group_allowed[e / group_size], cfg.k, top_keys, top_index);
        }
    }

    for (slot, &e) in experts.iter_mut().zip(top_index.iter()) {
        *slot = e as i64;
    }
    chosen_weights(logits, top_index, cfg, weights);
    Ok(())
}

/// Top-k gating forward over `num_tokens` rows of `logits` ([T, E] row-major).
///
/// Writes `weights` [T, k] and `experts` [T, k]. `bias` [E] shifts selection only.
pub fn topk_gating<L: Element>(
    logits: &[L],
    num_tokens: usize,
    bias: Option<&[L::Acc]>,
    cfg: &GatingConfig,
    weights: &mut [L::Acc],
    experts: &mut [i64],
) -> Result<()> {
    cfg.validate()?;
    let (e, k) = (cfg.num_experts, cfg.k);
    check_len("logits", logits, num_tokens * e)?;
    check_len("weights", weights, num_tokens * k)?;
    check_len("experts", experts, num_tokens * k)?;
    if let Some(bias) = bias {
        check_len("expert_bias", bias, e)?;
        if let Some(i) = bias.iter().position(|b| !b.is_finite()) {
            return Err(CoreError::invalid(
                "expert_bias",
                "finite values",
                format!("{:?} at expert {i}", bias[i]),
            ));
        }
    }
    if num_tokens == 0 {
        return Ok(());
    }
    logits
        .par_chunks(e)
        .zip(weights.par_chunks_mut(k))
        .zip(experts.par_chunks_mut(k))
        .enumerate()
        .with_min_len(tokens_per_task(e))
        .try_for_each_init(
            || Scratch::new(cfg),
            |scratch, (token, ((row, w), ids))| route_token(row, token, bias, cfg, scratch, w, ids),
        )
}

fn check_expert_id(id: i64, num_experts: usize, token: usize) -> Result<Option<usize>> {
    if id < 0 {
        return Ok(None);
    }
    if (id as u64) < num_experts as u64 {
        Ok(Some(id as usize))
    } else {
        Err(CoreError::invalid(
            "experts",
            format!("expert ids in [-1, {num_experts})"),
            format!("{id} at token {token}"),
        ))
    }
}

#[allow(clippy::too_many_arguments)] // one token's inputs, outputs and scratch buffers
fn backward_token<L: Element>(
    row: &[L],
    token: usize,
    chosen: &[i64],
    grad_weights: &[L::Acc],
    cfg: &GatingConfig,
    logits: &mut Vec<L::Acc>,
    scores: &mut Vec<L::Acc>,
    grad_row: &mut [L],
) -> Result<()> {
    type A<L> = <L as Element>::Acc;
    load_logits(row, token, logits)?;
    let scale = A::<L>::from_f64(cfg.scale);
    let mut chosen_ids = Vec::with_capacity(chosen.len());
    for &id in chosen {
        chosen_ids.push(check_expert_id(id, cfg.num_experts, token)?);
    }
    // Accumulate d(loss)/d(logit) for every expert, then round once into the output dtype.
    scores.clear();
    scores.resize(cfg.num_experts, A::<L>::zero());
    let grad = scores;
    match (cfg.score, cfg.normalize) {
        (ScoreFunction::Softmax, true) => {
            // w_j = scale * p_j with p the softmax over the chosen logits:
            // dL/dl_j = scale * p_j * (g_j - sum_i p_i g_i); unchosen logits get exactly 0.
            let live = chosen_ids.iter().zip(grad_weights).filter_map(|(e, g)| e.map(|e| (e, *g)));
            let m = max_of(live.clone().map(|(e, _)| logits[e]));
            let total: A<L> = live.clone().map(|(e, _)| (logits[e] - m).exp()).sum();
            let mean_g: A<L> = live.clone().map(|(e, g)| (logits[e] - m).exp() / total * g).sum();
            for (e, g) in live {
                let p = (logits[e] - m).exp() / total;
                grad[e] = scale * p * (g - mean_g);
            }
        }
        (ScoreFunction::Softmax, false) => {
            // w_j = scale * s_j with s the softmax over all experts:
            // dL/dl_n = s_n * (a_n - sum_j a_j s_j), a_n = scale * g_j where n is chosen slot j.
            let m = max_of(logits.iter().copied());
            let z: A<L> = logits.iter().map(|&l| (l - m).exp()).sum();
            let mut c = A::<L>::zero();
            for (e, &g) in chosen_ids.iter().zip(grad_weights) {
                if let Some(e) = *e {
                    let a = scale * g;
                    grad[e] = a;
                    c = c + a * ((logits[e] - m).exp() / z);
                }
            }
            for (n, gn) in grad.iter_mut().enumerate() {
                let s = (logits[n] - m).exp() / z;
                *gn = s * (*gn - c);
            }
        }
        (ScoreFunction::Sigmoid, normalize) => {
            let live = chosen_ids.iter().zip(grad_weights).filter_map(|(e, g)| e.map(|e| (e, *g)));
            let (total, weighted) = if normalize {
                let total =
                    live.clone().map(|(e, _)| sigmoid(logits[e])).sum::<A<L>>() + A::<L>::SIGMOID_NORM_EPS;
                let weighted: A<L> = live.clone().map(|(e, g)| g * sigmoid(logits[e])).sum();
                (total, weighted)
            } else {
                (A::<L>::one(), A::<L>::zero())
            };
            for (e, g) in live {
                let s = sigmoid(logits[e]);
                let d_score =
                    if normalize { scale * (g / total - weighted / (total * total)) } else { scale * g };
                grad[e] = d_score * s * (A::<L>::one() - s);
            }
        }
    }
    for (out, &g) in grad_row.iter_mut().zip(grad.iter()) {
        *out = L::from_acc(g);
    }
    Ok(())
}

/// Gradient of [`topk_gating`]'s weights with respect to the logits.
///
/// `experts` and the config are those of the forward call; `grad_weights` is [T, k];
/// writes `grad_logits` [T, E] in the logits' dtype.
pub fn topk_gating_backward<L: Element>(
    logits: &[L],
    num_tokens: usize,
    experts: &[i64],
    grad_weights: &[L::Acc],
    cfg: &GatingConfig,
    grad_logits: &mut [L],
) -> Result<()> {
    cfg.validate()?;
    let (e, k) = (cfg.num_experts, cfg.k);
    check_len("logits", logits, num_tokens * e)?;
    check_len("experts", experts, num_tokens * k)?;
    check_len("grad_weights", grad_weights, num_tokens * k)?;
    check_len("grad_logits", grad_logits, num_tokens * e)?;
    if num_tokens == 0 {
        return Ok(());
    }
    logits
        .par_chunks(e)
        .zip(experts.par_chunks(k))
        .zip(grad_weights.par_chunks(k))
        .zip(grad_logits.par_chunks_mut(e))
        .enumerate()
        .with_min_len(tokens_per_task(e))
        .try_for_each_init(
            || (Vec::with_capacity(e), Vec::with_capacity(e)),
            |(logits_buf, grad_buf), (token, (((row, ids), g), out))| {
                backward_token(row, token, ids, g, cfg, logits_buf, grad_buf, out)
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(e: usize, k: usize, score: ScoreFunction, normalize: bool) -> GatingConfig {
        GatingConfig { num_experts: e, k, score, normalize, groups: None, scale: 1.0 }
    }

    fn run(logits: &[f32], bias: Option<&[f32]>, c: &GatingConfig) -> (Vec<f32>, Vec<i64>) {
        let t = logits.len() / c.num_experts;
        let mut w = vec![0.0; t * c.k];
        let mut ids = vec![0; t * c.k];
        topk_gating(logits, t, bias, c, &mut w, &mut ids).unwrap();
        (w, ids)
    }

    #[test]
    fn ties_go_to_the_lower_expert() {
        let (_, ids) = run(&[1.0, 3.0, 3.0, 1.0, 3.0], None, &cfg(5, 3, ScoreFunction::Softmax, true));
        assert_eq!(ids, vec![1, 2, 4]);
        let (_, ids) = run(&[0.0; 6], None, &cfg(6, 4, ScoreFunction::Sigmoid, false));
        assert_eq!(ids, vec![0, 1, 2, 3]);
    }

    #[test]
    fn normalised_softmax_weights_sum_to_scale() {
        let mut c = cfg(4, 2, ScoreFunction::Softmax, true);
        c.scale = 2.5;
        let (w, ids) = run(&[0.5, -1.0, 2.0, 0.25], None, &c);
        assert_eq!(ids, vec![2, 0]);
        assert!((w[0] + w[1] - 2.5).abs() < 1e-6);
        let expected = 2.5 / (1.0 + (-1.5f32).exp());
        assert!((w[0] - expected).abs() < 1e-6);
    }

    #[test]
    fn unnormalised_softmax_weights_are_the_full_softmax() {
        let logits = [0.5f32, -1.0, 2.0, 0.25];
        let (w, _) = run(&logits, None, &cfg(4, 2, ScoreFunction::Softmax, false));
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((w[0] - 2f32.exp() / z).abs() < 1e-6);
        assert!((w[1] - 0.5f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn bias_changes_selection_but_not_weights() {
        let c = cfg(3, 1, ScoreFunction::Sigmoid, false);
        let (w, ids) = run(&[1.0, 0.0, -1.0], Some(&[0.0, 0.0, 1.0]), &c);
        assert_eq!(ids, vec![2]);
        assert!((w[0] - 1.0 / (1.0 + 1f32.exp())).abs() < 1e-7);
    }

    #[test]
    fn group_limit_masks_losing_groups() {
        // Groups {0,1}: top-2 sum 0.9+0.8; {2,3}: 0.99+0.01. The best single expert (2) is in
        // the losing group when only one group is kept.
        let mut c = cfg(4, 2, ScoreFunction::Sigmoid, true);
        c.groups = Some(GroupLimit { num_groups: 2, topk_groups: 1 });
        let logits: Vec<f32> = [0.9f32, 0.8, 0.99, 0.01].iter().map(|p| (p / (1.0 - p)).ln()).collect();
        let (_, ids) = run(&logits, None, &c);
        assert_eq!(ids, vec![0, 1]);
    }

    #[test]
    fn invalid_configs_name_the_argument() {
        let err = cfg(4, 5, ScoreFunction::Softmax, true).validate().unwrap_err();
        assert!(err.to_string().starts_with("k:"), "{err}");
        let mut c = cfg(6, 2, ScoreFunction::Softmax, true);
        c.groups = Some(GroupLimit { num_groups: 4, topk_groups: 1 });
        assert!(c.validate().unwrap_err().to_string().starts_with("num_groups:"));
        let err = "relu".parse::<ScoreFunction>().unwrap_err();
        assert!(err.to_string().starts_with("score:"));
    }

    #[test]
    fn non_finite_logits_are_refused() {
        let c = cfg(2, 1, ScoreFunction::Softmax, true);
        let mut w = vec![0.0; 2];
        let mut ids = vec![0; 2];
        let err = topk_gating(&[0.0f32, 1.0, f32::NAN, 0.0], 2, None, &c, &mut w, &mut ids).unwrap_err();
        assert!(err.to_string().contains("token 1, expert 0"), "{err}");
    }

    /// Central differences of sum(w * g) against the analytic backward, in f64.
    #[test]
    fn backward_matches_finite_differences() {
        let logits = [0.3f64, -0.7, 1.1, 0.2, -0.4, 0.9];
        let g = [0.7f64, -1.3, 0.4];
        for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
            for normalize in [true, false] {
                let mut c = cfg(6, 3, score, normalize);
                c.scale = 1.7;
                let forward = |l: &[f64]| {
                    let mut w = vec![0.0; 3];
                    let mut ids = vec![0; 3];
                    topk_gating(l, 1, None, &c, &mut w, &mut ids).unwrap();
                    (w.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>(), ids)
                };
                let (_, ids) = forward(&logits);
                let mut grad = vec![0.0; 6];
                topk_gating_backward(&logits, 1, &ids, &g, &c, &mut grad).unwrap();
                for n in 0..6 {
                    let h = 1e-6;
                    let mut plus = logits;
                    plus[n] += h;
                    let mut minus = logits;
                    minus[n] -= h;
                    let numeric = (forward(&plus).0 - forward(&minus).0) / (2.0 * h);
                    assert!(
                        (numeric - grad[n]).abs() < 1e-7,
                        "{score:?} {normalize} expert {n}: {numeric} vs {}",
                        grad[n]
                    );
                }
            }
        }
    }
}
