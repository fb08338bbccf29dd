"""The "cuda" kernels of sparseroute's custom ops (the CUDA sources are in sparseroute/cuda).

Each function here is registered with ``torch.library.register_kernel`` on the op defined in
``sparseroute.ops``, so the schema, the fake kernel and the autograd formula are the CPU
op's, and the CUDA kernel returns exactly the CPU kernel's outputs: the same shapes and
dtypes, the same expert choices and plans bit for bit, the same combine bit for bit. Where
the GPU departs from the CPU (invalid input is counted instead of raised, the last bits of
the gating weights) is written down in docs/cuda.md.

``register()`` (called at the end of ``sparseroute/__init__.py``, once every op is defined)
registers them; ops without a CUDA kernel get a stand-in "cuda" kernel that raises a clear
NotImplementedError, unless a CUDA kernel was registered for them before. ``CUDA_OPS`` lists
the ops that have a real one.

Every function validates what it can without reading tensor values (the public wrappers have
already checked types, shapes and dtypes; these checks cover direct ``torch.ops`` calls),
allocates outputs and workspaces with torch on the input's device, and launches the kernels
on torch's current stream. Nothing synchronises with the host, except ``permute`` with
``num_rows=None``, whose output row count is data-dependent and must be read back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparseroute import _cuda
from sparseroute._core import InvalidInputError
from sparseroute._cuda import pointer

#: Ops with CUDA kernels (the names of the ``sparseroute::`` custom ops).
CUDA_OPS: tuple[str, ...] = (
    "topk_gating",
    "topk_gating_backward",
    "permute",
    "unpermute",
    "gather_rows",
    "slot_dots",
)

#: Up to this many experts a warp routes a token; above, a block of 256 threads does.
WARP_TEAM_MAX_EXPERTS = 512
#: Slots per warp in the plan kernels, at least (fewer chunks when E is large: see _plan_chunks).
PLAN_CHUNK_SLOTS = 1024
#: The most entries of the plan's per-chunk count workspace (int64: 32 MiB).
PLAN_WORKSPACE_ENTRIES = 1 << 22
#: Blocks of the row kernels at most (they loop over the rest).
MAX_ROW_BLOCKS = 1 << 18


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _invalid(name: str, expected: str, got: object) -> InvalidInputError:
    return InvalidInputError(f"{name}: expected {expected}, got {got}")


def _on_device(tensor: Tensor, name: str, device: torch.device, what: str) -> None:
    if tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {what}), got {tensor.device}")


def _element_dtype(tensor: Tensor, name: str) -> torch.dtype:
    if tensor.dtype not in _cuda.DTYPE_CODES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16, float16 or float64, got {tensor.dtype}")
    return tensor.dtype


def _i32(value: int) -> np.int32:
    scalar: np.int32 = np.int32(value)
    return scalar


def _i64(value: int) -> np.int64:
    scalar: np.int64 = np.int64(value)
    return scalar


# --- topk_gating -------------------------------------------------------------------------------


def topk_gating_cuda(
    logits: Tensor,
    k: int,
    score: str,
    normalize: bool,
    expert_bias: Tensor | None,
    num_groups: int | None,
    topk_groups: int | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    dtype = _element_dtype(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [T, E], got shape {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    if num_experts < 1:
        raise _invalid("logits", "at least one expert (E >= 1)", "E = 0")
    if not 1 <= k <= num_experts:
        raise _invalid("k", f"1 <= k <= E = {num_experts}", f"k = {k}")
    if score not in ("softmax", "sigmoid"):
        raise _invalid("score", "'softmax' or 'sigmoid'", repr(score))
    if not math.isfinite(scale):
        raise _invalid("scale", "a finite number", scale)
    groups = 0
    kept_groups = 0
    if num_groups is not None or topk_groups is not None:
        if num_groups is None or topk_groups is None:
            raise _invalid("num_groups", "num_groups and topk_groups together", (num_groups, topk_groups))
        if num_groups < 1 or num_experts % num_groups != 0:
            raise _invalid(
                "num_groups", f"a positive divisor of the number of experts E = {num_experts}", num_groups
            )
        if not 1 <= topk_groups <= num_groups:
            raise _invalid("topk_groups", f"1 <= topk_groups <= num_groups = {num_groups}", topk_groups)
        reachable = topk_groups * (num_experts // num_groups)
        if k > reachable:
            raise _invalid("k", f"at most topk_groups * E / num_groups = {reachable} experts", f"k = {k}")
        groups, kept_groups = num_groups, topk_groups
    acc = _accumulator(dtype)
    device = logits.device
    logits = logits.contiguous()
    bias = None
    if expert_bias is not None:
        _on_device(expert_bias, "expert_bias", device, "logits")
        if tuple(expert_bias.shape) != (num_experts,):
            raise _invalid("expert_bias", f"{num_experts} elements", expert_bias.numel())
        bias = expert_bias.detach().to(acc).contiguous()
    weights = torch.empty(num_tokens, k, dtype=acc, device=device)
    experts = torch.empty(num_tokens, k, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return weights, experts
    group_scores = torch.empty(num_tokens, groups, dtype=acc, device=device) if groups else None
    warp_team = num_experts <= WARP_TEAM_MAX_EXPERTS
    with _cuda.launcher(device) as launch:
        launch(
            "gating.cu",
            dtype,
            "sr_topk_gating_warp" if warp_team else "sr_topk_gating_block",
            -(-num_tokens // 4) if warp_team else num_tokens,
            128 if warp_team else 256,
            (
                pointer(logits),
                _i64(num_tokens),
                _i32(num_experts),
                _i32(k),
                _i32(score == "sigmoid"),
                _i32(normalize),
                pointer(bias),
                _i32(groups),
                _i32(kept_groups),
                pointer(group_scores),
                np.float64(scale),
                pointer(weights),
                pointer(experts),
                pointer(launch.errors),
            ),
        )
    return weights, experts


def topk_gating_backward_cuda(
    logits: Tensor, experts: Tensor, grad_weights: Tensor, score: str, normalize: bool, scale: float
) -> Tensor:
    dtype = _element_dtype(logits, "logits")
    num_tokens, num_experts = logits.shape
    device = logits.device
    _on_device(experts, "experts", device, "logits")
    _on_device(grad_weights, "grad_weights", device, "logits")
    if experts.dim() != 2 or experts.shape[0] != num_tokens:
        raise _invalid("experts", f"shape [T, k] with T = {num_tokens}", tuple(experts.shape))
    k = experts.shape[1]
    if tuple(grad_weights.shape) != tuple(experts.shape):
        raise _invalid("grad_weights", f"shape {tuple(experts.shape)}", tuple(grad_weights.shape))
    if score not in ("softmax", "sigmoid"):
        raise _invalid("score", "'softmax' or 'sigmoid'", repr(score))
    logits = logits.contiguous()
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_experts == 0:
        return grad_logits
    experts = experts.to(torch.int64).contiguous()
    grad_weights = grad_weights.to(_accumulator(dtype)).contiguous()
    warp_team = num_experts <= WARP_TEAM_MAX_EXPERTS
    with _cuda.launcher(device) as launch:
        launch(
            "gating.cu",
            dtype,
            "sr_topk_gating_backward_warp" if warp_team else "sr_topk_gating_backward_block",
            -(-num_tokens // 4) if warp_team else num_tokens,
            128 if warp_team else 256,
            (
                pointer(logits),
                _i64(num_tokens),
                _i32(num_experts),
                _i32(k),
                pointer(experts),
                pointer(grad_weights),
                _i32(score == "sigmoid"),
                _i32(normalize),
                np.float64(scale),
                pointer(grad_logits),
                pointer(launch.errors),
            ),
        )
    return grad_logits


# --- rows: gather, combine, dot products ------------------------------------------------------


def _vectorized(row_len: int, *tensors: Tensor) -> bool:
    """Whether rows can move as 16-byte words: whole words per row, aligned bases."""
    itemsize = tensors[0].element_size()
    return (row_len * itemsize) % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def _gather(x: Tensor, row_to_slot: Tensor, k: int, weights: Tensor | None) -> Tensor:
    dtype = _element_dtype(x, "x")
    device = x.device
    x = x.contiguous()
    row_to_slot = row_to_slot.to(torch.int64).contiguous()
    num_rows = row_to_slot.shape[0]
    row_len = x.shape[1]
    out = torch.empty(num_rows, row_len, dtype=dtype, device=device)
    if num_rows == 0 or row_len == 0:
        return out
    if k < 1:
        raise _invalid("k", "at least 1", k)
    if weights is not None:
        _on_device(weights, "weights", device, "x")
        if weights.numel() != x.shape[0] * k:
            raise _invalid("weights", f"{x.shape[0] * k} elements", weights.numel())
        weights = weights.to(_accumulator(dtype)).contiguous()
    with _cuda.launcher(device) as launch:
        launch(
            "rows.cu",
            dtype,
            "sr_gather_rows",
            min(num_rows, MAX_ROW_BLOCKS),
            128,
            (
                pointer(x),
                _i64(x.shape[0]),
                _i64(row_len),
                pointer(row_to_slot),
                _i64(num_rows),
                _i64(k),
                pointer(weights),
                pointer(out),
                _i32(_vectorized(row_len, x, out)),
                pointer(launch.errors),
            ),
        )
    return out


def gather_rows_cuda(x: Tensor, row_to_slot: Tensor, k: int, weights: Tensor | None) -> Tensor:
    _on_device(row_to_slot, "row_to_slot", x.device, "x")
    return _gather(x, row_to_slot, k, weights)


def unpermute_cuda(
    y_sorted: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, weights: Tensor | None
) -> Tensor:
    dtype = _element_dtype(y_sorted, "y_sorted")
    device = y_sorted.device
    _on_device(slot_to_row, "plan.slot_to_row", device, "y_sorted")
    if slot_to_row.dim() != 2:
        raise ValueError(
            f"plan.slot_to_row: expected a 2-D tensor [T, k], got shape {tuple(slot_to_row.shape)}"
        )
    num_tokens, k = slot_to_row.shape
    y_sorted = y_sorted.contiguous()
    num_rows, row_len = y_sorted.shape
    out = torch.empty(num_tokens, row_len, dtype=dtype, device=device)
    if num_tokens == 0 or row_len == 0:
        return out
    if k < 1:
        raise _invalid("k", "at least 1", 0)
    slot_to_row = slot_to_row.to(torch.int64).contiguous()
    if weights is not None:
        _on_device(weights, "weights", device, "y_sorted")
        if weights.numel() != num_tokens * k:
            raise _invalid("weights", f"{num_tokens * k} elements", weights.numel())
        weights = weights.to(_accumulator(dtype)).contiguous()
    with _cuda.launcher(device) as launch:
        launch(
            "rows.cu",
            dtype,
            "sr_combine_rows",
            min(num_tokens, MAX_ROW_BLOCKS),
            128,
            (
                pointer(y_sorted),
                _i64(num_rows),
                _i64(row_len),
                pointer(slot_to_row),
                _i64(num_tokens),
                _i64(k),
                pointer(weights),
                pointer(out),
                _i32(_vectorized(row_len, y_sorted, out)),
                pointer(launch.errors),
            ),
        )
    return out


def slot_dots_cuda(grad_y: Tensor, y_sorted: Tensor, slot_to_row: Tensor) -> Tensor:
    dtype = _element_dtype(y_sorted, "y_sorted")
    device = y_sorted.device
    _on_device(grad_y, "grad_y", device, "y_sorted")
    _on_device(slot_to_row, "plan.slot_to_row", device, "y_sorted")
    if grad_y.dtype != dtype:
        raise TypeError(f"grad_y: expected dtype {dtype} (the dtype of y_sorted), got {grad_y.dtype}")
    num_tokens, k = slot_to_row.shape
    num_rows, row_len = y_sorted.shape
    out = torch.zeros(num_tokens, k, dtype=_accumulator(dtype), device=device)
    if num_tokens * k == 0:
        return out
    if tuple(grad_y.shape) != (num_tokens, row_len):
        raise _invalid("grad_y", f"shape [T, d] = {[num_tokens, row_len]}", list(grad_y.shape))
    grad_y = grad_y.contiguous()
    y_sorted = y_sorted.contiguous()
    slot_to_row = slot_to_row.to(torch.int64).contiguous()
    with _cuda.launcher(device) as launch:
        launch(
            "rows.cu",
            dtype,
            "sr_slot_dots",
            -(-(num_tokens * k) // 32),
            256,
            (
                pointer(grad_y),
                pointer(y_sorted),
                _i64(num_rows),
                _i64(row_len),
                pointer(slot_to_row),
                _i64(num_tokens),
                _i64(k),
                pointer(out),
                pointer(launch.errors),
            ),
        )
    return out


# --- permute: the plan, then the rows ---------------------------------------------------------


def plan_chunks(num_slots: int, num_experts: int) -> tuple[int, int]:
    """(number of chunks, slots per chunk) of the plan kernels: chunks of at least
    PLAN_CHUNK_SLOTS slots, few enough that the [chunks, E] workspace stays within
    PLAN_WORKSPACE_ENTRIES. The plan itself does not depend on the chunking."""
    if num_slots == 0:
        return 0, 1
    chunks = min(-(-num_slots // PLAN_CHUNK_SLOTS), max(1, PLAN_WORKSPACE_ENTRIES // num_experts))
    chunk = -(-num_slots // chunks)
    return -(-num_slots // chunk), chunk


def permute_cuda(
    x: Tensor,
    experts: Tensor,
    num_experts: int,
    num_rows: int | None,
    capacity: int | None,
    drop_weights: Tensor | None,
    pad_to_capacity: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if capacity is not None or pad_to_capacity:
        raise NotImplementedError(
            "permute: capacity-constrained dispatch (capacity=...) has no CUDA kernel in this version "
            "of sparseroute; dropless permute (capacity=None) has one. Move x and experts to the CPU "
            "for capacity dispatch."
        )
    _element_dtype(x, "x")
    device = x.device
    _on_device(experts, "experts", device, "x")
    if experts.dim() != 2:
        raise ValueError(f"experts: expected a 2-D tensor [T, k], got shape {tuple(experts.shape)}")
    if num_experts < 1:
        raise _invalid("num_experts", "at least 1", num_experts)
    num_tokens, k = experts.shape
    num_slots = num_tokens * k
    rows = num_slots if num_rows is None else num_rows
    experts = experts.to(torch.int64).contiguous()
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int64, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    row_to_slot = torch.full((rows,), -1, dtype=torch.int64, device=device)
    slot_to_row = torch.empty(num_tokens, k, dtype=torch.int64, device=device)
    dropped = torch.zeros(num_experts, dtype=torch.int64, device=device)
    chunks, chunk = plan_chunks(num_slots, num_experts)
    counts = torch.zeros(max(chunks, 1) * num_experts, dtype=torch.int64, device=device)
    expert_blocks = -(-num_experts // 256)
    with _cuda.launcher(device) as launch:
        plan: list[tuple[str, int, int, tuple[Any, ...]]] = [
            (
                "sr_plan_count",
                -(-chunks // 4),
                128,
                (
                    pointer(experts),
                    _i64(num_slots),
                    _i32(num_experts),
                    _i64(chunk),
                    _i64(chunks),
                    pointer(counts),
                    pointer(launch.errors),
                ),
            ),
            (
                "sr_plan_totals",
                expert_blocks,
                256,
                (pointer(counts), _i64(chunks), _i32(num_experts), pointer(tokens_per_expert)),
            ),
            ("sr_plan_scan", 1, 1024, (pointer(tokens_per_expert), _i32(num_experts), pointer(offsets))),
            (
                "sr_plan_cursors",
                expert_blocks,
                256,
                (pointer(counts), _i64(chunks), _i32(num_experts), pointer(offsets)),
            ),
            (
                "sr_plan_scatter",
                -(-chunks // 4),
                128,
                (
                    pointer(experts),
                    _i64(num_slots),
                    _i32(num_experts),
                    _i64(chunk),
                    _i64(chunks),
                    pointer(counts),
                    _i64(rows),
                    pointer(row_to_slot),
                    pointer(slot_to_row),
                    pointer(launch.errors),
                ),
            ),
        ]
        for kernel, grid, block, args in plan:
            launch("plan.cu", None, kernel, grid, block, args)
    if num_rows is None:
        # The row count is data-dependent: read it back (the one host synchronisation of the
        # CUDA ops; pass num_rows for a sync-free, graph-capturable permute).
        routed = int(offsets[num_experts].item())
        if routed < rows:
            row_to_slot = row_to_slot[:routed].clone()
    x_sorted = _gather(x, row_to_slot, k, None)
    return x_sorted, tokens_per_expert, offsets, row_to_slot, slot_to_row, dropped


# --- registration -------------------------------------------------------------------------------

_KERNELS: dict[str, Callable[..., Any]] = {
    "topk_gating": topk_gating_cuda,
    "topk_gating_backward": topk_gating_backward_cuda,
    "permute": permute_cuda,
    "unpermute": unpermute_cuda,
    "gather_rows": gather_rows_cuda,
    "slot_dots": slot_dots_cuda,
}
assert tuple(_KERNELS) == CUDA_OPS


def _has_cuda_kernel(qualified_name: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, "CUDA"))
    except Exception:  # an internal torch API: assume nothing is registered
        return False


def _sparseroute_ops() -> list[str]:
    try:
        names = torch._C._dispatch_get_all_op_names()
    except Exception:  # an internal torch API: no stand-ins then
        return []
    return sorted(name for name in names if name.startswith("sparseroute::"))


def _missing_kernel(qualified_name: str) -> Any:
    short = qualified_name.removeprefix("sparseroute::")

    def no_cuda_kernel(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"sparseroute::{short} has no CUDA kernel in this version of sparseroute (CUDA kernels: "
            f"{', '.join(CUDA_OPS)}); call it with CPU tensors (tensor.cpu())"
        )

    return no_cuda_kernel


def register() -> None:
    """Registers the CUDA kernels, and the stand-ins for ops without one. Idempotent."""
    for name, kernel in _KERNELS.items():
        torch.library.register_kernel(f"sparseroute::{name}", "cuda", kernel)
    for qualified_name in _sparseroute_ops():
        if qualified_name.removeprefix("sparseroute::") in _KERNELS or _has_cuda_kernel(qualified_name):
            continue
        torch.library.register_kernel(qualified_name, "cuda", _missing_kernel(qualified_name))
