//! Fuzz checks of sparseroute-core: each takes arbitrary bytes, decodes a call of one kernel
//! family from them (shapes, options, element type and values), runs it, and compares the
//! result with a plain reference written here from docs/semantics.md. A failed check panics.
//!
//! `cargo fuzz` drives them with coverage guidance (`make fuzz`, one binary per check in
//! `fuzz_targets/`, under AddressSanitizer); `tests/replay.rs` runs each on a fixed set of
//! byte strings as an ordinary test, so that every `make test` runs them on stable Rust.
//!
//! The values come from a small palette (exact ties, zeros, large and tiny magnitudes) or
//! from raw bits (any float, NaN and infinities included): the kernels must refuse what the
//! semantics refuse and agree with the reference on everything else.

mod balance;
mod dispatch;
mod gating;
mod input;
mod probabilities;
mod reference;

pub use balance::balance;
pub use dispatch::dispatch;
pub use gating::gating;
pub use probabilities::probabilities;

/// A check: decodes a call from the bytes, runs it, panics where it disagrees.
pub type Check = fn(&[u8]);

/// Every check, by the name of its fuzz target.
pub const CHECKS: &[(&str, Check)] =
    &[("gating", gating), ("dispatch", dispatch), ("probabilities", probabilities), ("balance", balance)];
