//! Single-thread timing of the top-k gating forward kernel, for work on the kernel itself:
//! `cargo run --release -p sparseroute-core --example gating_timing`.
//! (Speed-ups against torch are measured from Python, by `benches/ratios.py`.)

use sparseroute_core::gating::{topk_gating, GatingConfig, ScoreFunction};
use std::time::Instant;

mod support;
use support::logits;

fn main() {
    let tokens = 16_384;
    let args: Vec<usize> =
        std::env::args().skip(1).map(|a| a.parse().expect("usage: gating_timing [E k]")).collect();
    let shapes = match args[..] {
        [e, k] => vec![(e, k)],
        _ => vec![(8, 2), (16, 2), (64, 8), (128, 8), (256, 8), (256, 2), (60, 4)],
    };
    for (e, k) in shapes {
        let x = logits(tokens * e);
        let cfg = GatingConfig {
            num_experts: e,
            k,
            score: ScoreFunction::Softmax,
            normalize: true,
            groups: None,
            scale: 1.0,
        };
        let mut w = vec![0.0f32; tokens * k];
        let mut ids = vec![0i64; tokens * k];
        let mut best = f64::INFINITY;
        for _ in 0..if args.is_empty() { 30 } else { 300 } {
            let start = Instant::now();
            topk_gating(&x, tokens, None, &cfg, &mut w, &mut ids).unwrap();
            best = best.min(start.elapsed().as_secs_f64());
        }
        let mut read = f64::INFINITY;
        for _ in 0..30 {
            let start = Instant::now();
            let lanes = x.chunks_exact(16).fold([0f32; 16], |mut a, c| {
                a.iter_mut().zip(c).for_each(|(a, &v)| *a = a.max(v));
                a
            });
            std::hint::black_box(lanes);
            read = read.min(start.elapsed().as_secs_f64());
        }
        println!(
            "E={e:4} k={k}: {:8.1} us, {:6.1} ns/token (reading the logits alone: {:6.1} ns/token)",
            best * 1e6,
            best * 1e9 / tokens as f64,
            read * 1e9 / tokens as f64
        );
    }
}
