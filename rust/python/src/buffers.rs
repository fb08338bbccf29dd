//! Output tensors backed by the core's buffer cache, handed to torch through DLPack.
//!
//! `pooled_empty` returns a DLPack capsule; `torch.from_dlpack` turns it into an ordinary
//! tensor whose storage, when torch frees it, returns its buffer to the cache through the
//! DLPack deleter instead of to the system. The deleter may run on any thread, with or
//! without the GIL: it touches only the Rust cache.

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use sparseroute_core::buffers::{Buffer, BufferPool};
use std::ffi::{c_void, CStr};
use std::sync::LazyLock;

/// Default limit of the cache: enough for the permuted activations of a large MoE layer.
const DEFAULT_LIMIT: usize = 2 << 30;

static POOL: LazyLock<BufferPool> = LazyLock::new(|| {
    let limit = std::env::var("SPARSEROUTE_BUFFER_CACHE_BYTES").ok().and_then(|v| v.parse().ok());
    BufferPool::new(limit.unwrap_or(DEFAULT_LIMIT))
});

// The DLPack ABI (dlpack.h, version 0.8), the part a CPU tensor needs.
#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const DL_CPU: i32 = 1;
const DLTENSOR: &CStr = c"dltensor";

/// What a managed tensor owns: its buffer and its shape array.
struct Owned {
    buffer: Buffer,
    shape: Vec<i64>,
}

unsafe extern "C" fn release_to_pool(managed: *mut DLManagedTensor) {
    // SAFETY: `managed` and its context were created by `pooled_empty` with Box::into_raw,
    // and DLPack calls the deleter exactly once.
    unsafe {
        let managed = Box::from_raw(managed);
        let owned = Box::from_raw(managed.manager_ctx as *mut Owned);
        POOL.release(owned.buffer);
    }
}

unsafe extern "C" fn drop_unconsumed_capsule(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the GIL held. A consumer renames the capsule to
    // "used_dltensor" and takes over the deleter; only an unconsumed capsule frees here.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let managed = ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()) as *mut DLManagedTensor;
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
        }
    }
}

fn dl_dtype(dtype: &str) -> PyResult<(DLDataType, usize)> {
    let (code, bits) = match dtype {
        "float64" => (2, 64),
        "float32" => (2, 32),
        "float16" => (2, 16),
        "bfloat16" => (4, 16),
        "int64" => (0, 64),
        other => {
            return Err(PyValueError::new_err(format!("dtype: unsupported for pooled buffers: {other}")))
        }
    };
    Ok((DLDataType { code, bits, lanes: 1 }, bits as usize / 8))
}

/// A DLPack capsule for an uninitialised C-contiguous CPU tensor of `shape` and `dtype`,
/// backed by a cached buffer.
#[pyfunction]
pub fn pooled_empty<'py>(py: Python<'py>, shape: Vec<i64>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
    let (dl_type, itemsize) = dl_dtype(dtype)?;
    let mut elements: usize = 1;
    for &extent in &shape {
        let extent = usize::try_from(extent).map_err(|_| PyValueError::new_err("shape: negative extent"))?;
        elements = elements.checked_mul(extent).ok_or_else(|| PyValueError::new_err("shape: too large"))?;
    }
    let bytes = elements.checked_mul(itemsize).ok_or_else(|| PyValueError::new_err("shape: too large"))?;
    let mut owned = Box::new(Owned { buffer: POOL.acquire(bytes), shape });
    let managed = Box::new(DLManagedTensor {
        dl_tensor: DLTensor {
            data: owned.buffer.as_ptr() as *mut c_void,
            device: DLDevice { device_type: DL_CPU, device_id: 0 },
            ndim: owned.shape.len() as i32,
            dtype: dl_type,
            shape: owned.shape.as_mut_ptr(),
            strides: std::ptr::null_mut(), // C-contiguous
            byte_offset: 0,
        },
        manager_ctx: Box::into_raw(owned) as *mut c_void,
        deleter: Some(release_to_pool),
    });
    let managed = Box::into_raw(managed);
    // SAFETY: a valid pointer and a static name; on failure the capsule does not exist, so
    // the managed tensor is released here.
    unsafe {
        let capsule =
            ffi::PyCapsule_New(managed as *mut c_void, DLTENSOR.as_ptr(), Some(drop_unconsumed_capsule));
        if capsule.is_null() {
            release_to_pool(managed);
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, capsule))
    }
}

/// Sets how many bytes of freed output buffers sparseroute keeps for reuse.
#[pyfunction]
pub fn set_buffer_cache_limit(limit: usize) {
    POOL.set_limit(limit);
}

/// (bytes held by free cached buffers, the limit).
#[pyfunction]
pub fn buffer_cache_info() -> (usize, usize) {
    (POOL.cached_bytes(), POOL.limit())
}
