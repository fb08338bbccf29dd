//! Single-thread timing of the kernels whose cost is a softmax over each row (z-loss forward
//! and backward, top-p, expert choice), for work on the exponential row kernels:
//! `cargo run --release -p sparseroute-core --example softmax_timing [E] [z-loss|top-p|expert-choice]`
//! (all three without the second argument; one of them, for a profiler). Compare SIMD
//! levels in one run with `SPARSEROUTE_SIMD=avx2` (or `=baseline`) on a second run.

use sparseroute_core::balance::{z_loss, z_loss_backward, Groups, Z_LOSS_STATS};
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
    let usage = "usage: softmax_timing [E] [z-loss|top-p|expert-choice]";
    let e: usize = std::env::args().nth(1).map_or(64, |a| a.parse().expect(usage));
    let only = std::env::args().nth(2);
    let runs = |op: &str| only.as_deref().is_none_or(|o| o == op);
    assert!(only.as_deref().is_none_or(|o| ["z-loss", "top-p", "expert-choice"].contains(&o)), "{usage}");
    let x = logits(tokens * e);
    let mut stats = vec![0f32; tokens * Z_LOSS_STATS];
    let groups = Groups { num_tokens: tokens, group_size: tokens, mask: None };
    let z = best_us(if runs("z-loss") { 50 } else { 0 }, || {
        z_loss(&x, e, groups, 1.0 / tokens as f32, &mut stats).unwrap();
    });
    let mut grad = vec![0f32; tokens * e];
    let z_backward = best_us(if runs("z-loss") { 50 } else { 0 }, || {
        z_loss_backward(&x, e, &stats, 0.5, &mut grad).unwrap();
    });
    let cfg = TopPConfig { num_experts: e, p: 0.6, min_k: 1, max_k: e, inclusive: true, normalize: false };
    let (mut w, mut ids) = (vec![0f32; tokens * e], vec![0i64; tokens * e]);
    let topp = best_us(if runs("top-p") { 20 } else { 0 }, || {
        topp_gating(&x, tokens, &cfg, &mut w, &mut ids).unwrap()
    });
    let capacity = 2 * tokens / e;
    let (mut indices, mut gates) = (vec![0i64; e * capacity], vec![0f32; e * capacity]);
    let mut scores = vec![0f32; tokens * e];
    let choice = best_us(if runs("expert-choice") { 20 } else { 0 }, || {
        expert_choice(&x, tokens, e, capacity, &mut indices, &mut gates, &mut scores).unwrap()
    });
    let shown = [
        ("z-loss", z),
        ("z-loss backward", z_backward),
        ("top-p (p=0.6)", topp),
        (&format!("expert choice (C={capacity})"), choice),
    ];
    let timings: Vec<String> = shown
        .iter()
        .filter(|(_, us)| us.is_finite())
        .map(|(name, us)| format!("{name} {us:8.1} us"))
        .collect();
    println!("T={tokens} E={e} ({}): {}", sparseroute_core::simd::level(), timings.join(", "));
}
