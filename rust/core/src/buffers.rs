//! A cache of output buffers that have already been written once.
//!
//! Writing fresh memory is dominated by page faults: on the reference machine, about 8 GB/s
//! into freshly mapped memory against about 50 GB/s into memory already touched. The large
//! outputs of permute and unpermute (T*k rows of hidden states) are allocated and freed on
//! every step of a training loop, and the system allocator hands large blocks back to the
//! kernel on free, so every step pays the faults again. This pool keeps freed buffers (up to
//! a byte limit) and hands them out again; the Python side wraps them as ordinary torch
//! tensors whose deleter returns the buffer here.
//!
//! Buffers come back with stale contents (like `torch.empty`): kernels write every element
//! of their outputs.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Buffers are aligned for any SIMD load and to a cache line.
const ALIGN: usize = 64;
/// Sizes round up to this granularity, so a buffer fits requests of nearby sizes.
const GRANULE: usize = 1 << 21;

/// An aligned allocation owned by whoever holds it.
#[derive(Debug)]
pub struct Buffer {
    ptr: NonNull<u8>,
    capacity: usize,
}

// SAFETY: a Buffer is a unique owner of plain memory.
unsafe impl Send for Buffer {}

impl Buffer {
    fn allocate(capacity: usize) -> Buffer {
        let layout = Layout::from_size_align(capacity, ALIGN).expect("buffer size overflows");
        // SAFETY: capacity is non-zero (callers round up to at least one granule).
        let ptr = unsafe { alloc::alloc(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Buffer { ptr, capacity }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `allocate` with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.capacity, ALIGN)) }
    }
}

struct Cache {
    /// Free buffers, most recently released last.
    free: Vec<Buffer>,
    cached_bytes: usize,
    limit: usize,
}

impl Cache {
    fn evict_to_limit(&mut self) {
        let mut excess = self.cached_bytes.saturating_sub(self.limit);
        let mut evicted = 0;
        while excess > 0 {
            let capacity = self.free[evicted].capacity;
            excess = excess.saturating_sub(capacity);
            self.cached_bytes -= capacity;
            evicted += 1;
        }
        // Dropping the drained buffers frees them.
        self.free.drain(..evicted);
    }
}

/// A byte-limited cache of free buffers.
pub struct BufferPool {
    /// The process that owns the cache. A forked child must not wait on a lock another
    /// thread of the parent may have held at the fork; it bypasses the cache instead.
    pid: u32,
    cache: Mutex<Cache>,
}

impl BufferPool {
    pub fn new(limit: usize) -> BufferPool {
        BufferPool {
            pid: std::process::id(),
            cache: Mutex::new(Cache { free: Vec::new(), cached_bytes: 0, limit }),
        }
    }

    fn cache(&self) -> Option<std::sync::MutexGuard<'_, Cache>> {
        if std::process::id() != self.pid {
            return None;
        }
        Some(self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// A buffer of at least `bytes` bytes: a cached one of the same rounded size if there
    /// is one, else a new allocation.
    pub fn acquire(&self, bytes: usize) -> Buffer {
        let capacity = bytes.max(1).div_ceil(GRANULE) * GRANULE;
        if let Some(mut cache) = self.cache() {
            if let Some(i) = cache.free.iter().rposition(|b| b.capacity == capacity) {
                cache.cached_bytes -= capacity;
                return cache.free.swap_remove(i);
            }
        }
        Buffer::allocate(capacity)
    }

    /// Returns a buffer to the cache, freeing the least recently released buffers while the
    /// cache exceeds its limit (so the cache follows the sizes in use now). A buffer larger
    /// than the whole limit is freed at once.
    pub fn release(&self, buffer: Buffer) {
        let Some(mut cache) = self.cache() else { return };
        if buffer.capacity > cache.limit {
            return;
        }
        cache.cached_bytes += buffer.capacity;
        cache.free.push(buffer);
        cache.evict_to_limit();
    }

    /// Sets the byte limit, freeing the least recently released buffers beyond it.
    pub fn set_limit(&self, limit: usize) {
        let Some(mut cache) = self.cache() else { return };
        cache.limit = limit;
        cache.evict_to_limit();
    }

    pub fn limit(&self) -> usize {
        self.cache().map_or(0, |c| c.limit)
    }

    /// Bytes held by free buffers.
    pub fn cached_bytes(&self) -> usize {
        self.cache().map_or(0, |c| c.cached_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_buffers_are_reused_for_the_same_rounded_size() {
        let pool = BufferPool::new(8 * GRANULE);
        let a = pool.acquire(GRANULE + 1);
        assert_eq!(a.capacity(), 2 * GRANULE);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        let address = a.as_ptr();
        pool.release(a);
        assert_eq!(pool.cached_bytes(), 2 * GRANULE);
        let b = pool.acquire(2 * GRANULE - 5);
        assert_eq!(b.as_ptr(), address);
        assert_eq!(pool.cached_bytes(), 0);
        let c = pool.acquire(5 * GRANULE);
        assert_ne!(c.as_ptr(), address);
    }

    #[test]
    fn releases_evict_the_least_recently_released() {
        let pool = BufferPool::new(4 * GRANULE);
        let (a, b, c) = (pool.acquire(2 * GRANULE), pool.acquire(2 * GRANULE), pool.acquire(GRANULE));
        let (a_address, c_address) = (a.as_ptr(), c.as_ptr());
        pool.release(a);
        pool.release(b);
        pool.release(c);
        // a (oldest) made room for c.
        assert_eq!(pool.cached_bytes(), 3 * GRANULE);
        assert_eq!(pool.acquire(GRANULE).as_ptr(), c_address);
        assert_ne!(pool.acquire(2 * GRANULE).as_ptr(), a_address);
        pool.release(pool.acquire(5 * GRANULE));
        assert_eq!(pool.cached_bytes(), 0);
    }

    #[test]
    fn the_limit_bounds_cached_bytes() {
        let pool = BufferPool::new(3 * GRANULE);
        let (a, b) = (pool.acquire(2 * GRANULE), pool.acquire(2 * GRANULE));
        pool.release(a);
        pool.release(b);
        assert_eq!(pool.cached_bytes(), 2 * GRANULE);
        pool.set_limit(0);
        assert_eq!(pool.cached_bytes(), 0);
    }
}
