//! Where kernels run: inline on the calling thread, or shared between it and helper threads.
//!
//! Kernels split their work into numbered pieces (blocks of rows, chunks, experts) with
//! [`for_each_block`], [`for_each_block2`], [`for_each_block2_with`], [`for_each_pair`] or
//! [`map_collect`]. Called from outside [`run`], they do the pieces in order on the calling
//! thread; called inside [`run`] with more than one thread, the calling thread and the
//! team's helpers take pieces from one shared counter until none are left. Either way every
//! output element is computed by one piece in a fixed order, so results do not depend on
//! the choice, and an error is the one the first failing piece (in order) reports.
//!
//! [`run`] decides: small jobs run inline (waking a helper costs tens of microseconds, more
//! than the job itself when decoding one token), larger ones are shared with a team of
//! `threads - 1` helpers owned by this module, sized by the caller (Python passes
//! `torch.get_num_threads()`).
//!
//! Why not a work-stealing pool (rayon, used before): there the calling thread hands the
//! job over and sleeps until a pool thread has finished it, so a call pays for waking a
//! pool thread and then for being woken itself; on a 2-core machine an empty job took
//! 24 µs. Here the calling thread starts on the first piece at once, a helper joins when it
//! is awake, and the caller only waits, polling, for pieces a helper has already started.
//! [`run`] wakes the helpers as it starts, so they come up while the kernel checks its
//! arguments; they poll (yielding their core to any other runnable thread) while a `run`
//! is under way and for `LINGER` (100 µs) after their last piece, then sleep. On that machine a
//! z-loss forward + backward at 16384 tokens took 479 µs against rayon's 548 (medians of
//! 20 alternating processes) and Sinkhorn 557 against 576.
//!
//! Fork safety: torch's DataLoader forks worker processes. A forked child inherits the
//! parent's team object but none of its threads, so waiting on it would deadlock. The team
//! is therefore tagged with the id of the process that built it; a child sees a different
//! id, forgets the inherited team without touching it, and builds its own.

use crate::error::{CoreError, Result};
use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Jobs with fewer elements than this run inline on the calling thread.
pub const MIN_PARALLEL_WORK: usize = 1 << 15;

/// How long a helper keeps polling for the next job after its last one, before it sleeps:
/// long enough to bridge the Python code between two kernels of one layer.
const LINGER: Duration = Duration::from_micros(100);

thread_local! {
    /// The threads the kernel on this thread may share its pieces with: set by [`run`] for
    /// its duration, 0 elsewhere (and while a thread works on a shared job's pieces, so that
    /// a kernel nested in a piece runs inline).
    static TEAM_THREADS: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f`, a kernel call touching about `work` elements, with up to `threads` threads:
/// inline when `threads <= 1` or the job is small, otherwise with the pieces of its
/// parallel loops shared between the calling thread and `threads - 1` helpers.
pub fn run<R: Send>(threads: usize, work: usize, f: impl FnOnce() -> R + Send) -> R {
    let threads = if work < MIN_PARALLEL_WORK { 1 } else { threads.max(1) };
    let _scope = TeamScope::enter(threads);
    // Wake the helpers now: they come up while the kernel checks its arguments, and stay
    // up between its parallel loops.
    let _awake = (threads > 1).then(|| Awake::new(team_for(threads)));
    f()
}

/// Keeps a team's helpers awake (waiting for jobs by polling, not sleeping) while it lives.
struct Awake(Arc<Shared>);

impl Awake {
    fn new(shared: Arc<Shared>) -> Self {
        {
            // Under the lock: a helper checks `runs` under it before it sleeps, so it either
            // sees the new count or is already asleep and gets the notification.
            let _slot = shared.lock();
            shared.runs.fetch_add(1, Ordering::AcqRel);
        }
        shared.job_posted.notify_all();
        Self(shared)
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        self.0.runs.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sets this thread's [`TEAM_THREADS`] and restores the previous value when dropped (on
/// unwinding too).
struct TeamScope(usize);

impl TeamScope {
    fn enter(threads: usize) -> Self {
        Self(TEAM_THREADS.replace(threads))
    }
}

impl Drop for TeamScope {
    fn drop(&mut self) {
        TEAM_THREADS.set(self.0);
    }
}

/// The threads a parallel loop started here may use (1: run it inline).
fn team_threads() -> usize {
    TEAM_THREADS.get().max(1)
}

// --- the team ------------------------------------------------------------------------------

/// A posted job: a borrowed closure with its lifetime erased. A helper calls it only after
/// registering in [`Shared::running`] (under the lock, while the job is posted), and
/// [`share`] withdraws the job and waits until no helper is registered before the closure's
/// borrow ends.
#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn() + Sync + 'static));

// SAFETY: the closure behind the pointer is `Sync`; see `JobRef` for why it outlives every
// call through it.
unsafe impl Send for JobRef {}

struct Slot {
    job: Option<JobRef>,
    /// Counts posted jobs, so that a helper takes each job at most once.
    epoch: u64,
    /// Set when the team is replaced (another thread count): its helpers exit.
    retired: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    /// `Slot::epoch` of the last posted job, read by helpers that poll.
    posted: AtomicU64,
    /// Helpers registered in the posted job (incremented under the lock).
    running: AtomicUsize,
    /// Live [`Awake`] guards: while there are any, idle helpers poll instead of sleeping.
    runs: AtomicUsize,
    job_posted: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // Every change to the slot is a plain assignment; a panic cannot leave it half-made.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Team {
    pid: u32,
    threads: usize,
    shared: Arc<Shared>,
}

static TEAM: Mutex<Option<Team>> = Mutex::new(None);

/// The team of `threads - 1` helpers, made (or remade for another thread count) on demand.
fn team_for(threads: usize) -> Arc<Shared> {
    let pid = std::process::id();
    let mut team = TEAM.lock().unwrap_or_else(PoisonError::into_inner);
    match team.as_ref() {
        Some(t) if t.pid == pid && t.threads == threads => return t.shared.clone(),
        Some(t) if t.pid != pid => {
            // Inherited across fork: its helper threads do not exist in this process, and
            // its mutex may have been held by one of them. Leak it without touching it.
            std::mem::forget(team.take());
        }
        Some(t) => {
            t.shared.lock().retired = true;
            t.shared.job_posted.notify_all();
        }
        None => {}
    }
    let shared = Arc::new(Shared {
        slot: Mutex::new(Slot { job: None, epoch: 0, retired: false }),
        posted: AtomicU64::new(0),
        running: AtomicUsize::new(0),
        runs: AtomicUsize::new(0),
        job_posted: Condvar::new(),
    });
    for i in 0..threads - 1 {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("sparseroute-{i}"))
            .spawn(move || helper(&shared))
            .expect("starting a sparseroute helper thread failed");
    }
    *team = Some(Team { pid, threads, shared: shared.clone() });
    shared
}

/// A helper's life: wait for a job it has not seen yet (polling while a [`run`] is under
/// way, asleep otherwise), run it, repeat until retired.
fn helper(shared: &Shared) {
    let mut seen = 0u64;
    let mut linger_until = Instant::now();
    loop {
        let job = {
            let mut slot = shared.lock();
            loop {
                if slot.retired {
                    return;
                }
                if slot.epoch != seen {
                    seen = slot.epoch;
                    if let Some(job) = slot.job {
                        shared.running.fetch_add(1, Ordering::AcqRel);
                        break job;
                    }
                    // Withdrawn before this helper came to it.
                }
                let awake = || shared.runs.load(Ordering::Acquire) > 0 || Instant::now() < linger_until;
                if awake() {
                    drop(slot);
                    while shared.posted.load(Ordering::Acquire) == seen && awake() {
                        std::thread::yield_now();
                    }
                    slot = shared.lock();
                } else {
                    slot = shared.job_posted.wait(slot).unwrap_or_else(PoisonError::into_inner);
                }
            }
        };
        // SAFETY: registered in `running` while the job was posted: `share` keeps the closure
        // alive until `running` is back to 0 (see `JobRef`). The job catches its own panics.
        unsafe { (*job.0)() };
        linger_until = Instant::now() + LINGER;
        // Release: the caller sees this helper's writes once it sees the count drop.
        shared.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `work` on the calling thread and on the team's helpers at once (every thread calls
/// it once; `work` hands out its pieces itself), and returns when every call has returned.
/// A panic in any of them is raised again here.
fn share(threads: usize, work: &(dyn Fn() + Sync)) {
    let shared = team_for(threads);
    // The helpers' panics are kept here, with this call, rather than in the team: the next
    // job may be posted before this call has looked.
    let helper_panic: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);
    let helper_work = || {
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(work)) {
            helper_panic.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(payload);
        }
    };
    {
        let mut slot = shared.lock();
        if slot.job.is_some() {
            // Another thread's job holds the team: this one runs on the calling thread alone.
            drop(slot);
            return work();
        }
        let job: &(dyn Fn() + Sync) = &helper_work;
        // SAFETY: only the lifetime is erased; see `JobRef`.
        let job: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(job) };
        slot.job = Some(JobRef(job));
        slot.epoch += 1;
        shared.posted.store(slot.epoch, Ordering::Release);
    }
    shared.job_posted.notify_all();
    let outcome = panic::catch_unwind(AssertUnwindSafe(work));
    // Withdrawn: a helper that comes to it from now on finds nothing to take.
    shared.lock().job = None;
    // The registered helpers are at most one piece each from the end: poll rather than sleep
    // (being woken would cost more than that).
    while shared.running.load(Ordering::Acquire) > 0 {
        std::thread::yield_now();
    }
    if let Err(payload) = outcome {
        panic::resume_unwind(payload);
    }
    if let Some(payload) = helper_panic.into_inner().unwrap_or_else(PoisonError::into_inner) {
        panic::resume_unwind(payload);
    }
}

// --- parallel loops ------------------------------------------------------------------------

/// Calls `task(state, i)` for every `i` in `0..count`: in order on this thread, or, inside
/// [`run`] with more than one thread, on the calling thread and the helpers, each taking
/// the next unclaimed `i` until none are left. `init` makes one state per thread that takes
/// a piece. Returns the error of the lowest failing `i` (the one the in-order loop returns:
/// every lower `i` was claimed before it and runs to its end); no piece is started after a
/// failure.
fn for_each_index_with<S, I, F>(count: usize, init: I, task: F) -> Result<()>
where
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize) -> Result<()> + Sync,
{
    let threads = team_threads();
    if threads <= 1 || count <= 1 {
        let mut state = init();
        return (0..count).try_for_each(|i| task(&mut state, i));
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<(usize, CoreError)>> = Mutex::new(None);
    let work = || {
        // Pieces nested in this one run inline.
        let _scope = TeamScope::enter(1);
        let mut state = None;
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            if let Err(error) = task(state.get_or_insert_with(&init), i) {
                failed.store(true, Ordering::Relaxed);
                let mut first = first_error.lock().unwrap_or_else(PoisonError::into_inner);
                if first.as_ref().is_none_or(|(j, _)| i < *j) {
                    *first = Some((i, error));
                }
            }
        }
    };
    share(threads, &work);
    match first_error.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some((_, error)) => Err(error),
        None => Ok(()),
    }
}

/// A slice's start, for handing disjoint parts of it to several threads.
struct Parts<T>(*mut T, usize);

// SAFETY: `Parts` only gives out disjoint parts (each index or range is claimed by one
// thread), and the elements may move between threads (`T: Send`).
unsafe impl<T: Send> Sync for Parts<T> {}

impl<T> Parts<T> {
    fn new(slice: &mut [T]) -> Self {
        Self(slice.as_mut_ptr(), slice.len())
    }

    /// `slice[start..end]`.
    ///
    /// # Safety
    /// The range lies inside the slice, and no other live reference overlaps it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, end: usize) -> &mut [T] {
        debug_assert!(start <= end && end <= self.1);
        // SAFETY: forwarded from the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), end - start) }
    }

    /// Block `i` of the slice cut into blocks of `len` (the last one shorter).
    ///
    /// # Safety
    /// The block starts inside the slice, and no other live reference overlaps it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn block(&self, i: usize, len: usize) -> &mut [T] {
        let start = i * len;
        // SAFETY: forwarded from the caller.
        unsafe { self.range(start, (start + len).min(self.1)) }
    }
}

/// Calls `body(first_row, block)` for consecutive blocks of `rows_per_block` rows of
/// `out` (each row `row_len` long): shared between threads inside [`run`], in order otherwise.
pub fn for_each_block<T, F>(out: &mut [T], row_len: usize, rows_per_block: usize, body: F) -> Result<()>
where
    T: Send,
    F: Fn(usize, &mut [T]) -> Result<()> + Sync + Send,
{
    let rows = rows_per_block.max(1);
    let block_len = rows * row_len.max(1);
    let parts = Parts::new(out);
    // SAFETY: block i's range, inside `out`; each i is claimed by one thread.
    for_each_index_with(
        parts.1.div_ceil(block_len),
        || (),
        |_, i| body(i * rows, unsafe { parts.block(i, block_len) }),
    )
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

/// [`for_each_block2`] with per-thread state: `init` makes a state once per thread that
/// takes a block in this call (not once per block), and `body` gets it with each block.
/// Kernels use it for scratch buffers, whose allocation would otherwise be paid for every
/// block.
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
    let (a_parts, b_parts) = (Parts::new(a), Parts::new(b));
    // Blocks while both outputs have rows left (both have the same number of rows).
    let count = a_parts.1.div_ceil(a_len).min(b_parts.1.div_ceil(b_len));
    for_each_index_with(count, init, |state, i| {
        // SAFETY: block i's ranges, inside the outputs; each i is claimed by one thread.
        let (x, y) = unsafe { (a_parts.block(i, a_len), b_parts.block(i, b_len)) };
        body(state, i * rows, x, y)
    })
}

/// Calls `body(i, &mut a[i], &mut b[i])` for every index of two equally long slices:
/// shared between threads inside [`run`], in order otherwise.
pub fn for_each_pair<A, B, F>(a: &mut [A], b: &mut [B], body: F) -> Result<()>
where
    A: Send,
    B: Send,
    F: Fn(usize, &mut A, &mut B) -> Result<()> + Sync + Send,
{
    assert_eq!(a.len(), b.len(), "for_each_pair needs slices of equal length");
    let (a_parts, b_parts) = (Parts::new(a), Parts::new(b));
    for_each_index_with(
        a_parts.1,
        || (),
        |_, i| {
            // SAFETY: element i, inside both slices; each i is claimed by one thread.
            let (x, y) = unsafe { (&mut a_parts.range(i, i + 1)[0], &mut b_parts.range(i, i + 1)[0]) };
            body(i, x, y)
        },
    )
}

/// `items.map(f)` collected in order: shared between threads inside [`run`], in order
/// otherwise.
pub fn map_collect<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(usize, &T) -> Result<R> + Sync + Send,
) -> Result<Vec<R>> {
    let mut results: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    let parts = Parts::new(&mut results);
    for_each_index_with(
        items.len(),
        || (),
        |_, i| {
            // SAFETY: element i, inside `results`; each i is claimed by one thread.
            unsafe { parts.range(i, i + 1)[0] = Some(f(i, &items[i])?) };
            Ok(())
        },
    )?;
    Ok(results.into_iter().map(|r| r.expect("every item was mapped")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::thread::ThreadId;

    /// The threads that ran `count` pieces of a loop inside `run(threads, ..)`.
    fn threads_used(threads: usize, count: usize) -> usize {
        let seen = Mutex::new(HashSet::<ThreadId>::new());
        run(threads, usize::MAX, || {
            for_each_index_with(
                count,
                || (),
                |_, _| {
                    seen.lock().unwrap().insert(std::thread::current().id());
                    // Long enough for a helper to wake and take some pieces.
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    Ok(())
                },
            )
        })
        .unwrap();
        seen.into_inner().unwrap().len()
    }

    #[test]
    fn small_jobs_run_inline_and_large_ones_are_shared() {
        assert_eq!(run(4, 10, team_threads), 1);
        assert_eq!(run(1, MIN_PARALLEL_WORK, team_threads), 1);
        for threads in [2, 3] {
            assert_eq!(run(threads, MIN_PARALLEL_WORK, team_threads), threads);
        }
        assert_eq!(team_threads(), 1, "run restores the thread's setting");
        assert_eq!(threads_used(1, 20), 1);
        assert!(threads_used(3, 40) > 1, "a helper took part");
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

    #[test]
    fn two_outputs_pairs_and_maps_cover_every_index() {
        for threads in [1, 2, 3] {
            let (mut a, mut b) = (vec![0usize; 50 * 2], vec![0u8; 50]);
            let (mut x, mut y) = (vec![0usize; 37], vec![0usize; 37]);
            let mapped = run(threads, usize::MAX, || {
                for_each_block2((&mut a, 2), (&mut b, 1), 4, |first, ra, rb| {
                    ra.iter_mut().for_each(|v| *v = first);
                    rb.iter_mut().for_each(|v| *v = 1);
                    Ok(())
                })?;
                for_each_pair(&mut x, &mut y, |i, p, q| {
                    (*p, *q) = (i, 2 * i);
                    Ok(())
                })?;
                map_collect(&x, |i, &v| Ok(i + v))
            })
            .unwrap();
            assert_eq!(a, (0..50).flat_map(|r| [r / 4 * 4; 2]).collect::<Vec<_>>());
            assert!(b.iter().all(|&v| v == 1));
            assert_eq!(y, (0..37).map(|i| 2 * i).collect::<Vec<_>>());
            assert_eq!(mapped, (0..37).map(|i| 2 * i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_error_is_the_first_failing_piece_in_order() {
        for threads in [1, 2, 3] {
            for _ in 0..20 {
                let result = run(threads, usize::MAX, || {
                    for_each_index_with(
                        64,
                        || (),
                        |_, i| {
                            if i % 10 == 7 {
                                Err(CoreError::invalid("piece", "no failure", i.to_string()))
                            } else {
                                Ok(())
                            }
                        },
                    )
                });
                let message = result.unwrap_err().to_string();
                assert!(message.contains("got 7"), "{message}");
            }
        }
    }

    #[test]
    fn a_panic_in_a_piece_reaches_the_caller() {
        for threads in [2, 3] {
            let caught = panic::catch_unwind(|| {
                run(threads, usize::MAX, || {
                    for_each_index_with(
                        32,
                        || (),
                        |_, i| {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            assert!(i != 20, "piece 20 fails");
                            Ok(())
                        },
                    )
                })
            });
            assert!(caught.is_err());
            // The team still works afterwards.
            assert!(threads_used(threads, 40) >= 1);
        }
        // A panic on a helper thread (every piece a helper takes panics; in 13 ms of pieces
        // a helper takes some).
        let caller = std::thread::current().id();
        let caught = panic::catch_unwind(|| {
            run(2, usize::MAX, || {
                for_each_index_with(
                    64,
                    || (),
                    |_, _| {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        assert!(std::thread::current().id() == caller, "a helper's piece fails");
                        Ok(())
                    },
                )
            })
        });
        assert!(caught.is_err());
    }

    #[test]
    fn nested_loops_run_inline_inside_a_piece() {
        let inner = Mutex::new(Vec::new());
        run(3, usize::MAX, || {
            for_each_index_with(
                8,
                || (),
                |_, _| {
                    inner.lock().unwrap().push(team_threads());
                    Ok(())
                },
            )
        })
        .unwrap();
        assert!(inner.into_inner().unwrap().iter().all(|&t| t == 1));
    }

    #[test]
    fn concurrent_callers_share_one_team_safely() {
        let handles: Vec<_> = (0..4)
            .map(|c| {
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mut out = vec![0usize; 200];
                        run(2, usize::MAX, || {
                            for_each_block(&mut out, 1, 3, |first, block| {
                                block.iter_mut().enumerate().for_each(|(i, v)| *v = first + i + c);
                                Ok(())
                            })
                        })
                        .unwrap();
                        assert_eq!(out, (0..200).map(|i| i + c).collect::<Vec<_>>());
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
    }
}
