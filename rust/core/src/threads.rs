//! The thread pool every kernel runs on.
//!
//! Kernels never touch rayon's global pool: they run inside [`install`], which uses a pool
//! owned by this module, sized by the caller (Python passes `torch.get_num_threads()`).
//!
//! Fork safety: torch's DataLoader forks worker processes. A forked child inherits the
//! parent's pool object but none of its threads, so waiting on it would deadlock. The pool
//! is therefore tagged with the id of the process that built it; a child sees a different
//! id, forgets the inherited pool without touching it, and builds its own.

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

/// Runs `f` on a pool of `threads` threads (at least one); rayon parallel iterators
/// inside `f` use that pool, never the global one.
pub fn install<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    pool_for(threads).install(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn install_runs_on_a_pool_of_the_requested_size() {
        for threads in [1, 2, 3] {
            let seen = install(threads, rayon::current_num_threads);
            assert_eq!(seen, threads);
        }
    }

    #[test]
    fn parallel_sum_is_correct_on_any_pool() {
        let data: Vec<u64> = (0..10_000).collect();
        for threads in [1, 2, 4] {
            let total: u64 = install(threads, || data.par_iter().sum());
            assert_eq!(total, 10_000 * 9_999 / 2);
        }
    }
}
