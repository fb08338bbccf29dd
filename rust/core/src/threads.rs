//! Where kernels run: inline on the calling thread, or on a thread pool.
//!
//! Kernels split their output into blocks of rows with [`for_each_block`] (or
//! [`for_each_block2`]). Called from outside a pool, they run the blocks in order on the
//! calling thread; called inside [`run`] with more than one thread, they run them in
//! parallel. Either way every output element is computed by one block in a fixed order, so
//! results do not depend on the choice.
//!
//! [`run`] decides: small jobs run inline (handing a job to a pool thread and waking it
//! costs tens of microseconds, more than the job itself when decoding one token), larger
//! ones on a pool owned by this module (never rayon's global pool), sized by the caller
//! (Python passes `torch.get_num_threads()`).
//!
//! Fork safety: torch's DataLoader forks worker processes. A forked child inherits the
//! parent's pool object but none of its threads, so waiting on it would deadlock. The pool
//! is therefore tagged with the id of the process that built it; a child sees a different
//! id, forgets the inherited pool without touching it, and builds its own.

use crate::error::Result;
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex};

struct OwnedPool {
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<OwnedPool>> = Mutex::new(None);

fn pool_for(threads: usize) -> Arc<ThreadPool> {
    let threads = threads.max(1);
    let pid = std::process::id();
    // A poisoned lock only means a panic happened while a caller held it; the slot itself
    // is always in a consistent state, so keep using it.
    let mut slot = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match slot.as_ref() {
        Some(owned) if owned.pid == pid && owned.threads == threads => return owned.pool.clone(),
        Some(owned) if owned.pid != pid => {
            // Inherited across fork: its worker threads do not exist in this process.
            // Dropping it would signal threads that are not there; leak it instead.
            std::mem::forget(slot.take());
        }
        _ => {}
    }
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sparseroute-{i}"))
            .build()
            .expect("building a rayon thread pool failed"),
    );
    *slot = Some(OwnedPool { pid, threads, pool: pool.clone() });
    pool
}

/// Jobs with fewer elements than this run inline on the calling thread.
pub const MIN_PARALLEL_WORK: usize = 1 << 15;

/// Runs `f`, a kernel call touching about `work` elements, with up to `threads` threads:
/// inline on the calling thread when `threads <= 1` or the job is small, otherwise on a
/// pool of `threads` threads (never rayon's global pool).
pub fn run<R: Send>(threads: usize, work: usize, f: impl FnOnce() -> R + Send) -> R {
    if threads <= 1 || work < MIN_PARALLEL_WORK {
        f()
    } else {
        pool_for(threads).install(f)
    }
}

/// Whether the caller runs on a pool with more than one thread (inside [`run`]).
fn parallel() -> bool {
    rayon::current_thread_index().is_some() && rayon::current_num_threads() > 1
}

/// Calls `body(first_row, block)` for consecutive blocks of `rows_per_block` rows of
/// `out` (each row `row_len` long): in parallel inside [`run`], in order otherwise.
pub fn for_each_block<T, F>(out: &mut [T], row_len: usize, rows_per_block: usize, body: F) -> Result<()>
where
    T: Send,
    F: Fn(usize, &mut [T]) -> Result<()> + Sync + Send,
{
    let block_len = rows_per_block.max(1) * row_len.max(1);
    if !parallel() || out.len() <= block_len {
        return out
            .chunks_mut(block_len)
            .enumerate()
            .try_for_each(|(b, block)| body(b * rows_per_block, block));
    }
    out.par_chunks_mut(block_len).enumerate().try_for_each(|(b, block)| body(b * rows_per_block, block))
}

/// [`for_each_block`] over two outputs with the same number of rows.
pub fn for_each_block2<T, U, F>(
    (a, a_row_len): (&mut [T], usize),
    (b, b_row_len): (&mut [U], usize),
    rows_per_block: usize,
    body: F,
) -> Result<()>
where
    T: Send,
    U: Send,
    F: Fn(usize, &mut [T], &mut [U]) -> Result<()> + Sync + Send,
{
    for_each_block2_with(
        (a, a_row_len),
        (b, b_row_len),
        rows_per_block,
        || (),
        |_, first, x, y| body(first, x, y),
    )
}

/// [`for_each_block2`] with per-worker state: `init` makes a state once per piece of work
/// a thread takes on (not once per block), and `body` gets it with each block. Kernels use
/// it for scratch buffers, whose allocation would otherwise be paid for every block.
pub fn for_each_block2_with<T, U, S, I, F>(
    (a, a_row_len): (&mut [T], usize),
    (b, b_row_len): (&mut [U], usize),
    rows_per_block: usize,
    init: I,
    body: F,
) -> Result<()>
where
    T: Send,
    U: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [T], &mut [U]) -> Result<()> + Sync + Send,
{
    let rows = rows_per_block.max(1);
    let (a_len, b_len) = (rows * a_row_len.max(1), rows * b_row_len.max(1));
    if !parallel() || a.len() <= a_len {
        let mut state = init();
        return a
            .chunks_mut(a_len)
            .zip(b.chunks_mut(b_len))
            .enumerate()
            .try_for_each(|(i, (x, y))| body(&mut state, i * rows, x, y));
    }
    a.par_chunks_mut(a_len)
        .zip(b.par_chunks_mut(b_len))
        .enumerate()
        .try_for_each_init(init, |state, (i, (x, y))| body(state, i * rows, x, y))
}

/// Calls `body(i, &mut a[i], &mut b[i])` for every index of two equally long slices: in
/// parallel inside [`run`], in order otherwise.
pub fn for_each_pair<A, B, F>(a: &mut [A], b: &mut [B], body: F) -> Result<()>
where
    A: Send,
    B: Send,
    F: Fn(usize, &mut A, &mut B) -> Result<()> + Sync + Send,
{
    assert_eq!(a.len(), b.len(), "for_each_pair needs slices of equal length");
    if parallel() {
        a.par_iter_mut().zip(b.par_iter_mut()).enumerate().try_for_each(|(i, (x, y))| body(i, x, y))
    } else {
        a.iter_mut().zip(b.iter_mut()).enumerate().try_for_each(|(i, (x, y))| body(i, x, y))
    }
}

/// `items.map(f)` collected in order: in parallel inside [`run`], in order otherwise.
pub fn map_collect<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(usize, &T) -> Result<R> + Sync + Send,
) -> Result<Vec<R>> {
    if parallel() {
        items.par_iter().enumerate().map(|(i, item)| f(i, item)).collect()
    } else {
        items.iter().enumerate().map(|(i, item)| f(i, item)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn small_jobs_run_inline_and_large_ones_on_a_pool() {
        assert_eq!(run(4, 10, rayon::current_thread_index), None);
        assert_eq!(run(1, MIN_PARALLEL_WORK, rayon::current_thread_index), None);
        for threads in [2, 3] {
            assert_eq!(run(threads, MIN_PARALLEL_WORK, rayon::current_num_threads), threads);
        }
    }

    #[test]
    fn blocks_cover_the_output_in_any_mode() {
        for threads in [1, 2, 3] {
            let mut out = vec![0usize; 1000 * 3];
            run(threads, usize::MAX, || {
                for_each_block(&mut out, 3, 7, |first, block| {
                    for (i, row) in block.chunks_mut(3).enumerate() {
                        row.fill(first + i);
                    }
                    Ok(())
                })
            })
            .unwrap();
            let expected: Vec<usize> = (0..1000).flat_map(|r| [r, r, r]).collect();
            assert_eq!(out, expected);
        }
    }
}
