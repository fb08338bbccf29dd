//! What the checks share: the limits of each storage type, conversions between the
//! accumulator and float64, and the float64 reference's sums and scores.

use half::{bf16, f16};
use sparseroute_core::gating::ScoreFunction;
use sparseroute_core::{Accumulator, Element};

/// Relative rounding step of a storage type, its smallest subnormal and its largest finite
/// value.
pub(crate) trait Storage: Element {
    const EPS: f64;
    const TINY: f64;
    const MAX: f64;
}

impl Storage for f64 {
    const EPS: f64 = f64::EPSILON;
    const TINY: f64 = 5e-324;
    const MAX: f64 = f64::MAX;
}

impl Storage for f32 {
    const EPS: f64 = f32::EPSILON as f64;
    const TINY: f64 = 1.5e-45;
    const MAX: f64 = f32::MAX as f64;
}

impl Storage for bf16 {
    const EPS: f64 = 1.0 / 128.0;
    const TINY: f64 = 9.2e-41;
    const MAX: f64 = 3.3895313892515355e38;
}

impl Storage for f16 {
    const EPS: f64 = 1.0 / 1024.0;
    const TINY: f64 = 6e-8;
    const MAX: f64 = 65504.0;
}

pub(crate) fn acc<A: Accumulator>(v: f64) -> A {
    <A as num_traits::NumCast>::from(v).expect("an accumulator holds any float64")
}

pub(crate) fn f64_of<A: Accumulator>(v: A) -> f64 {
    num_traits::ToPrimitive::to_f64(&v).expect("an accumulator converts to float64")
}

/// A sum of float64 terms with Neumaier's compensation: the reference must be more accurate
/// than the kernels, whose float64 sums round at every addition too.
pub(crate) fn sum(terms: impl IntoIterator<Item = f64>) -> f64 {
    let (mut total, mut carry) = (0.0f64, 0.0f64);
    for x in terms {
        let t = total + x;
        carry += if total.abs() >= x.abs() { (total - t) + x } else { (x - t) + total };
        total = t;
    }
    total + carry
}

/// The scores of docs/semantics.md step 1, in float64.
pub(crate) fn scores(score: ScoreFunction, row: &[f64]) -> Vec<f64> {
    match score {
        ScoreFunction::Softmax => {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = row.iter().map(|&l| (l - max).exp()).collect();
            let total = sum(exps.iter().copied());
            exps.iter().map(|&x| x / total).collect()
        }
        ScoreFunction::Sigmoid => row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
    }
}
