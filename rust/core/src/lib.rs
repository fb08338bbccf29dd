//! sparseroute-core: the CPU algorithms of sparseroute, in plain Rust.
//!
//! Every kernel reads borrowed slices and writes into caller-allocated buffers (torch owns
//! memory, or the [`buffers`] cache hands it out), validates what it reads, and returns
//! [`CoreError`] instead of panicking. Kernels split their outputs into blocks with
//! [`threads::for_each_block`]; callers choose inline or pooled execution with
//! [`threads::run`]. Results are bitwise identical for any thread count: every output
//! element is computed by one block in a fixed order.

pub mod balance;
pub mod batching;
pub mod buffers;
pub mod cache;
pub mod dispatch;
pub mod element;
pub mod error;
pub mod gating;
pub mod lanes;
pub mod layers;
pub mod placement;
pub mod schedule;
pub mod simd;
#[cfg(test)]
mod test_rng;
pub mod threads;
pub mod tokens;

pub use element::{Accumulator, Element};
pub use error::{CoreError, Result};
