"""Handing torch tensors to the kernels: zero-copy numpy views of contiguous CPU tensors for
the Rust core, and the dtypes kernels compute in.

bfloat16 has no numpy dtype; its tensors cross as int16 views of the same bits, which the
binding reinterprets (see rust/python/src/arrays.rs).
"""

from __future__ import annotations

import numpy as np
import torch


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array sharing ``tensor``'s memory (``tensor`` must be contiguous, on CPU)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    # (detach only where needed: it costs about as much as the view itself.)
    return (tensor.detach() if tensor.requires_grad else tensor).numpy()


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, without the call where ``tensor`` already has ``dtype``: ``to``
    then returns ``tensor`` itself too, but only after a pass through torch's dispatcher
    (about 1.5 µs on the CPU, a tenth of a one-token routing call)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sparseroute computes in for inputs of ``dtype``: float64 stays float64
    (for gradient checking), everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
