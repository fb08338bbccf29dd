//! Single-thread timing of the kernels whose cost is a softmax over each row (z-loss, top-p,
//! expert choice), for work on the exponential row kernels:
//! `cargo run --release -p sparseroute-core --example softmax_timing [E]`. Compare SIMD
//! levels in one run with `SPARSEROUTE_SIMD=avx2` (or `=baseline`) on a second run.

use sparseroute_core::balance::{z_loss, Groups};
use sparseroute_core::gating::{expert_choice, topp_gating, TopPConfig};
use std::time::Instant;

mod support;
use support::logits;

/// The best of `repeats` runs of `f`, in microseconds.
fn best_us(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let tokens = 16_384;
    let e: usize = std::env::args().nth(1).map_or(64, |a| a.parse().expect("usage: softmax_timing [E]"));
    let x = logits(tokens * e);
    let mut direction = vec![0f32; tokens * e];
    let groups = Groups { num_tokens: tokens, group_size: tokens, mask: None };
    let z = best_us(50, || {
        z_loss(&x, e, groups, 1.0 / tokens as f32, &mut direction).unwrap();
    });
    let cfg = TopPConfig { num_experts: e, p: 0.6, min_k: 1, max_k: e, inclusive: true, normalize: false };
    let (mut w, mut ids) = (vec![0f32; tokens * e], vec![0i64; tokens * e]);
    let topp = best_us(20, || topp_gating(&x, tokens, &cfg, &mut w, &mut ids).unwrap());
    let capacity = 2 * tokens / e;
    let (mut indices, mut gates) = (vec![0i64; e * capacity], vec![0f32; e * capacity]);
    let choice = best_us(20, || expert_choice(&x, tokens, e, capacity, &mut indices, &mut gates).unwrap());
    println!(
        "T={tokens} E={e} ({}): z-loss {z:8.1} us, top-p (p=0.6) {topp:8.1} us, expert choice (C={capacity}) {choice:8.1} us",
        sparseroute_core::simd::level()
    );
}
