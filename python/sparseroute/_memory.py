"""Output allocation: large outputs reuse buffers that were written before.

Page faults dominate writing fresh memory on CPU (a fresh 1 GiB output costs several times
more to fill than one already touched), and the large outputs of permute and unpermute are
allocated and freed on every training step. Outputs of at least ``POOLED_MIN_BYTES`` come
from a cache of freed buffers kept by the Rust core (up to a byte limit; default 2 GiB, or
``SPARSEROUTE_BUFFER_CACHE_BYTES``). They are ordinary torch tensors: when torch frees
one, its buffer goes back to the cache instead of to the system.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.utils.dlpack

from sparseroute import _core

POOLED_MIN_BYTES = 1 << 20

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
}
_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _DTYPE_NAMES}


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """An uninitialised contiguous tensor: on the CPU (``device`` None or a CPU device) from
    the buffer cache when it is large; on other devices from torch's own allocator."""
    if device is not None and device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    name = _DTYPE_NAMES.get(dtype)
    if name is None or math.prod(shape) * _ITEMSIZE[dtype] < POOLED_MIN_BYTES:
        # (Sizes as separate ints: torch parses them about 0.5 µs faster than a tuple.)
        return torch.empty(*shape, dtype=dtype) if shape else torch.empty((), dtype=dtype)
    tensor: torch.Tensor = torch.utils.dlpack.from_dlpack(_core.pooled_empty(list(shape), name))
    return tensor


#: The numpy dtype that carries each torch dtype's bits (bfloat16 as int16 words, as
#: ``numpy_view`` passes it).
_NUMPY_DTYPES: dict[torch.dtype, type[np.generic]] = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.uint8: np.uint8,
}


def empty_with_view(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A CPU output as ``empty`` makes it, and the numpy view the Rust core writes it through.

    A small output is allocated by numpy and wrapped by ``torch.from_numpy``: one allocation
    and no separate view, about 1.3 µs less per output than ``torch.empty`` and a view, a
    large share of a one-token routing call. Its storage, like a pooled output's, cannot be
    resized in place."""
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is not None:
        # (An array too large to keep costs nothing to make: its pages are never touched.)
        array = np.empty(shape, numpy_dtype)
        if array.nbytes < POOLED_MIN_BYTES:
            tensor = torch.from_numpy(array)
            return (tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor), array
    tensor = empty(shape, dtype)
    return tensor, (tensor.view(torch.int16) if dtype == torch.bfloat16 else tensor).numpy()


def set_buffer_cache_limit(num_bytes: int) -> None:
    """Keep at most ``num_bytes`` of freed output buffers for reuse (0 disables the cache
    and frees what it holds)."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int):
        raise TypeError(f"num_bytes: expected an int, got {type(num_bytes).__name__}")
    if num_bytes < 0:
        raise ValueError(f"num_bytes: expected at least 0, got {num_bytes}")
    _core.set_buffer_cache_limit(num_bytes)


def buffer_cache_info() -> tuple[int, int]:
    """``(cached_bytes, limit)``: bytes held by freed buffers kept for reuse, and the limit."""
    return _core.buffer_cache_info()
