//! sparseroute-core: the CPU algorithms of sparseroute, in plain Rust.
//!
//! Every kernel reads borrowed slices and writes into caller-allocated buffers (torch owns
//! memory), validates what it reads, and returns [`CoreError`] instead of panicking. Kernels
//! use rayon parallel iterators; callers pick the pool with [`threads::install`]. Results are
//! bitwise identical for any thread count: every output element is computed by one task in
//! a fixed order.

pub mod buffers;
pub mod dispatch;
pub mod element;
pub mod error;
pub mod gating;
pub mod lanes;
pub mod threads;

pub use element::{Accumulator, Element};
pub use error::{CoreError, Result};
