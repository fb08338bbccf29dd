"""Argument validation shared by the public ops.

Every check here reads only shapes, dtypes and devices, never tensor values, so it costs
no host-device synchronisation and traces cleanly under torch.compile. Value checks
(expert ids in range, finite logits) happen inside the kernels, which raise
``sparseroute.InvalidInputError`` (a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparseroute import _cuda

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_tensor(
    value: object,
    name: str,
    *,
    ndim: int,
    layout: str,
    dtypes: Sequence[torch.dtype],
) -> torch.Tensor:
    """``value`` must be a CPU (or CUDA) tensor with ``ndim`` dimensions (described as ``layout``,
    e.g. "[T, E]") and one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {value.dtype}")
    if value.is_cuda:
        # CUDA tensors go to the CUDA kernels (sparseroute/_cuda_ops.py), which need CuPy;
        # an op without a CUDA kernel raises NotImplementedError when it is dispatched.
        _cuda.check_available(name)
    elif not value.is_cpu:
        raise ValueError(
            f"{name}: expected a CPU tensor (or a CUDA tensor, for ops with CUDA kernels), "
            f"got device {value.device}"
        )
    return value


def check_int(
    value: object,
    name: str,
    *,
    minimum: int,
    maximum: int | None = None,
    what: str = "",
    maximum_name: str = "",
) -> int:
    """``value`` must be a Python int in [minimum, maximum]. The error message ends with
    ``what``, or with ``maximum_name`` and the maximum (``" (number of experts E = 64)"``),
    which is formatted only when the check fails."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum} <= {name}" + (f" <= {maximum}" if maximum is not None else "")
        if maximum_name:
            what = f" ({maximum_name} = {maximum})"
        raise ValueError(f"{name}: expected {bound}{what}, got {value}")
    return value


def check_same(actual: int, expected: int, name: str, what: str) -> None:
    """A size of ``name`` must equal ``expected`` (``what`` says which size and why)."""
    if actual != expected:
        raise ValueError(f"{name}: expected {what} = {expected}, got {actual}")
