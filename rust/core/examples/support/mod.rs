//! What the timing examples share.

/// Deterministic pseudo-normal logits (sum of uniforms), so runs are comparable.
pub fn logits(n: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0).collect()
}
