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
on torch's current stream. Nothing synchronises with the host, except where a size or a
stopping point depends on the data: ``permute`` with ``num_rows=None`` reads its row count
back, ``sinkhorn`` without ``iters`` reads its convergence flag, and the grouped linear
layers outside torch's grouped GEMM read the offsets to slice the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sparseroute import _cuda
from sparseroute._core import InvalidInputError
from sparseroute._cuda import pointer
from sparseroute.ops import _eager
from sparseroute.ops._bridge import accumulator_dtype, as_dtype
from sparseroute.ops.balance import Z_LOSS_STATS
from sparseroute.ops.dispatch import plan_rows
from sparseroute.placement import REPLICA_POLICIES

#: Ops whose one implementation serves both devices: torch code (per-expert cuBLAS matmuls,
#: elementwise ops), registered for "cpu" and "cuda" by the op itself (sparseroute.ops.experts).
TORCH_CODE_OPS: tuple[str, ...] = (
    "grouped_linear",
    "grouped_linear_backward",
    "silu_gate",
    "silu_gate_backward",
)

#: Ops with CUDA kernels (the names of the ``sparseroute::`` custom ops).
CUDA_OPS: tuple[str, ...] = (
    "topk_gating",
    "topk_gating_backward",
    "permute",
    "unpermute",
    "gather_rows",
    "slot_dots",
    "select_tokens",
    "gather_tokens",
    "scatter_tokens",
    "token_dots",
    "score_sums",
    "score_sums_backward",
    "expert_counts",
    "z_loss",
    "z_loss_backward",
    "layer_plan",
    "topp_gating",
    "expert_choice",
    "expert_choice_backward",
    "expert_choice_slots",
    "sinkhorn",
    "replica_map",
    *TORCH_CODE_OPS,
)

#: Up to this many experts a warp routes a token; above, a block of 256 threads does.
WARP_TEAM_MAX_EXPERTS = 512
#: Top-k gating without a bias or group limit, up to this k, routes each token with a lane
#: team (sr_topk_gating_team*; see gating_lanes for its width).
LANE_TEAM_MAX_K = 16
#: Lane teams: enough lanes per token for about this many threads in all, while each lane
#: keeps at least GATING_MIN_EXPERTS_PER_LANE experts.
GATING_TARGET_THREADS = 1 << 16
GATING_MIN_EXPERTS_PER_LANE = 8
#: The lane-team kernel packs a 16-bit logit and its expert into 32 bits.
PAIR_MAX_EXPERTS = 1 << 16
#: Slots per warp in the plan kernels, at most (more when E is large: see plan_chunks). Each
#: warp walks its chunk 32 slots at a time through cursors in global memory, so its time grows
#: with the chunk: plans of few slots get chunks down to PLAN_MIN_CHUNK_SLOTS, so that at least
#: PLAN_MIN_CHUNKS warps share them.
PLAN_CHUNK_SLOTS = 1024
PLAN_MIN_CHUNK_SLOTS = 128
PLAN_MIN_CHUNKS = 64
#: The most entries of the plan's per-chunk count workspace (int64: 32 MiB).
PLAN_WORKSPACE_ENTRIES = 1 << 22
#: Plans of at most this many slots and rows, and SMALL_PLAN_MAX_EXPERTS experts
#: (SR_SMALL_PLAN_EXPERTS in plan.cu), are built by one block in one launch (sr_plan_small);
#: larger ones by the five chunked kernels.
SMALL_PLAN_MAX_SLOTS = 1 << 15
SMALL_PLAN_MAX_EXPERTS = 128
#: Blocks of the row kernels at most (they loop over the rest).
MAX_ROW_BLOCKS = 1 << 18
#: Slots per block-step of sr_expert_counts (plan.cu, SR_COUNT_CHUNK).
EXPERT_COUNT_CHUNK = 2048
#: Slots of the error buffer that the Python glue adds to (see _cuda.ERROR_KINDS).
ERROR_DROP_WEIGHTS = 6


def _invalid(name: str, expected: str, got: object) -> InvalidInputError:
    return InvalidInputError(f"{name}: expected {expected}, got {got}")


#: The most of anything a kernel counts in int32 (sr_select_tokens' histograms and run
#: counts, sr_replica_load's counters).
MAX_INT32_COUNT = 2**31 - 1


def _check_int32_count(count: int, name: str, what: str) -> None:
    """``count`` (of ``what``, from argument ``name``) must fit a kernel's int32 counters."""
    if count > MAX_INT32_COUNT:
        raise _invalid(name, f"at most {MAX_INT32_COUNT} {what} on CUDA", count)


def _on_device(tensor: Tensor, name: str, device: torch.device, what: str) -> None:
    if tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {what}), got {tensor.device}")


def _element_dtype(tensor: Tensor, name: str) -> torch.dtype:
    if tensor.dtype not in _cuda.DTYPE_CODES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16, float16 or float64, got {tensor.dtype}")
    return tensor.dtype


def _check_logits(logits: Tensor) -> torch.dtype:
    """The element type of router logits ``[T, E]``, after checking the dtype, the rank and
    that there is at least one expert."""
    dtype = _element_dtype(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [T, E], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise _invalid("logits", "at least one expert (E >= 1)", "E = 0")
    return dtype


def _token_teams(
    num_tokens: int, num_experts: int, warp_kernel: str, block_kernel: str
) -> tuple[str, int, int]:
    """``(kernel, grid, block)`` of a per-token gating kernel: ``warp_kernel``, a warp per
    token and four tokens per 128-thread block, up to ``WARP_TEAM_MAX_EXPERTS`` experts;
    ``block_kernel``, a 256-thread block per token, above."""
    if num_experts <= WARP_TEAM_MAX_EXPERTS:
        return warp_kernel, -(-num_tokens // 4), 128
    return block_kernel, num_tokens, 256


# --- topk_gating -------------------------------------------------------------------------------


def gating_lanes(num_tokens: int, num_experts: int) -> int:
    """Lanes per token of the lane-team gating kernel, a power of two from 1 to 32: the fewest
    that give GATING_TARGET_THREADS threads in all (each lane adds merge rounds, so no more
    than the GPU needs to hide memory latency), and no more than leave each lane
    GATING_MIN_EXPERTS_PER_LANE experts."""
    wanted = -(-GATING_TARGET_THREADS // max(num_tokens, 1))
    lanes = min(32, 1 << (wanted - 1).bit_length())
    while lanes > 1 and num_experts < lanes * GATING_MIN_EXPERTS_PER_LANE:
        lanes //= 2
    return lanes


class _GatingLaunch(NamedTuple):
    """How one call signature of top-k gating runs (see ``_gating_launch``)."""

    kernel: str
    grid: int
    block: int
    #: "team" (sr_topk_gating_team*: by logit), "keyed_team" (by key), or "token" (a warp or
    #: a block per token: group limits, and a bias with k > 16).
    route: str
    #: Lanes per token of the team kernels.
    lanes: int
    #: Whether a row of logits is whole 16-byte words (the team kernel then also needs an
    #: aligned base, checked per call).
    row_in_words: bool
    #: The group limit as the token kernels take it (0, 0, 2 without one).
    groups: int
    kept_groups: int
    group_score_k: int


def _gating_launch(
    logits: Tensor,
    k: int,
    score: str,
    has_bias: bool,
    num_groups: int | None,
    topk_groups: int | None,
    group_score_k: int,
) -> _GatingLaunch:
    """Checks what top-k gating's arguments must satisfy apart from the tensors' values and
    devices, and picks its kernel and launch shape: everything that depends only on the
    call signature (see ``topk_gating_cuda``)."""
    _check_logits(logits)
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise _invalid("k", f"1 <= k <= E = {num_experts}", f"k = {k}")
    if score not in ("softmax", "sigmoid"):
        raise _invalid("score", "'softmax' or 'sigmoid'", repr(score))
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
        if group_score_k < 1:
            raise _invalid("group_score_k", "at least 1", group_score_k)
        groups, kept_groups = num_groups, topk_groups
    row_in_words = num_experts * logits.element_size() % 16 == 0
    # Selection by score (plus the bias) without a group limit (one group selects as none),
    # or by logit: a lane team per token (see gating.cu), for k <= 16.
    by_key = groups <= 1 and (has_bias or groups == 1)
    by_logit = not has_bias and not groups and num_experts <= PAIR_MAX_EXPERTS
    if k <= LANE_TEAM_MAX_K and (by_key or by_logit):
        width = next(m for m in (2, 4, 8, 16) if m >= k)
        lanes = gating_lanes(num_tokens, num_experts)
        route = "keyed_team" if by_key else "team"
        kernel = f"sr_topk_gating_{route}{width}"
        return _GatingLaunch(kernel, -(-num_tokens * lanes // 128), 128, route, lanes, row_in_words, 0, 0, 2)
    kernel, grid, block = _token_teams(num_tokens, num_experts, "sr_topk_gating_warp", "sr_topk_gating_block")
    # (All of a group's keys when it has fewer: the kernel's int stays in range.)
    scored = min(group_score_k, num_experts // groups) if groups else 2
    return _GatingLaunch(kernel, grid, block, "token", 0, row_in_words, groups, kept_groups, scored)


#: The launch of every top-k gating call signature seen (dtype, shape, k, score, whether
#: there is a bias, the group arguments), with the tuning that chose it: a model calls the
#: op with a few signatures over and over, and checking the arguments and choosing the kernel
#: again on each call took a third of the glue's host time (13.0 against 8.8 µs a call with
#: the launch left out, on a CPU). Cleared when it grows past MAX_CACHED_LAUNCHES.
_gating_launches: dict[tuple[Any, ...], _GatingLaunch] = {}
MAX_CACHED_LAUNCHES = 4096


def topk_gating_cuda(
    logits: Tensor,
    k: int,
    score: str,
    normalize: bool,
    expert_bias: Tensor | None,
    num_groups: int | None,
    topk_groups: int | None,
    group_score_k: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    dtype = logits.dtype
    shape = logits.shape
    # The tuning constants are in the key so that changing them (the lane-width benchmark,
    # tests that force a route) takes effect at once.
    signature = (
        dtype,
        shape,
        k,
        score,
        expert_bias is None,
        num_groups,
        topk_groups,
        group_score_k,
        LANE_TEAM_MAX_K,
        GATING_TARGET_THREADS,
        GATING_MIN_EXPERTS_PER_LANE,
        gating_lanes,
    )
    launch_shape = _gating_launches.get(signature)
    if launch_shape is None:
        launch_shape = _gating_launch(
            logits, k, score, expert_bias is not None, num_groups, topk_groups, group_score_k
        )
        if len(_gating_launches) >= MAX_CACHED_LAUNCHES:
            _gating_launches.clear()
        _gating_launches[signature] = launch_shape
    if not math.isfinite(scale):
        raise _invalid("scale", "a finite number", scale)
    num_tokens, num_experts = shape
    acc = accumulator_dtype(dtype)
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
    kernel, grid, block, route, lanes, row_in_words, groups, kept_groups, scored = launch_shape
    logits_at = logits.data_ptr()
    row = (logits_at, num_tokens, num_experts, k, score == "sigmoid", normalize)
    group_scores = torch.empty(num_tokens, groups, dtype=acc, device=device) if groups else None
    options: tuple[Any, ...]
    if route == "team":
        options = (scale, row_in_words and logits_at % 16 == 0, lanes)
    elif route == "keyed_team":
        options = (pointer(bias), scale, lanes)
    else:
        options = (pointer(bias), groups, kept_groups, scored, pointer(group_scores), scale)
    launch = _cuda.launcher(device)
    launch(
        "gating.cu",
        dtype,
        kernel,
        grid,
        block,
        (*row, *options, weights.data_ptr(), experts.data_ptr(), launch.error_pointer),
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
    experts = as_dtype(experts, torch.int64).contiguous()
    grad_weights = as_dtype(grad_weights, accumulator_dtype(dtype)).contiguous()
    launch = _cuda.launcher(device)
    launch(
        "gating.cu",
        dtype,
        *_token_teams(
            num_tokens, num_experts, "sr_topk_gating_backward_warp", "sr_topk_gating_backward_block"
        ),
        (
            pointer(logits),
            num_tokens,
            num_experts,
            k,
            pointer(experts),
            pointer(grad_weights),
            score == "sigmoid",
            normalize,
            scale,
            pointer(grad_logits),
            launch.error_pointer,
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
    row_to_slot = as_dtype(row_to_slot, torch.int64).contiguous()
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
        weights = as_dtype(weights, accumulator_dtype(dtype)).contiguous()
    launch = _cuda.launcher(device)
    launch(
        "rows.cu",
        dtype,
        "sr_gather_rows",
        min(num_rows, MAX_ROW_BLOCKS),
        128,
        (
            pointer(x),
            x.shape[0],
            row_len,
            pointer(row_to_slot),
            num_rows,
            k,
            pointer(weights),
            pointer(out),
            _vectorized(row_len, x, out),
            launch.error_pointer,
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
    slot_to_row = as_dtype(slot_to_row, torch.int64).contiguous()
    if weights is not None:
        _on_device(weights, "weights", device, "y_sorted")
        if weights.numel() != num_tokens * k:
            raise _invalid("weights", f"{num_tokens * k} elements", weights.numel())
        weights = as_dtype(weights, accumulator_dtype(dtype)).contiguous()
    launch = _cuda.launcher(device)
    launch(
        "rows.cu",
        dtype,
        "sr_combine_rows",
        min(num_tokens, MAX_ROW_BLOCKS),
        128,
        (
            pointer(y_sorted),
            num_rows,
            row_len,
            pointer(slot_to_row),
            num_tokens,
            k,
            pointer(weights),
            pointer(out),
            _vectorized(row_len, y_sorted, out),
            launch.error_pointer,
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
    out = torch.zeros(num_tokens, k, dtype=accumulator_dtype(dtype), device=device)
    if num_tokens * k == 0:
        return out
    if tuple(grad_y.shape) != (num_tokens, row_len):
        raise _invalid("grad_y", f"shape [T, d] = {[num_tokens, row_len]}", list(grad_y.shape))
    grad_y = grad_y.contiguous()
    y_sorted = y_sorted.contiguous()
    slot_to_row = as_dtype(slot_to_row, torch.int64).contiguous()
    launch = _cuda.launcher(device)
    launch(
        "rows.cu",
        dtype,
        "sr_slot_dots",
        -(-(num_tokens * k) // 32),
        256,
        (
            pointer(grad_y),
            pointer(y_sorted),
            num_rows,
            row_len,
            pointer(slot_to_row),
            num_tokens,
            k,
            pointer(out),
            launch.error_pointer,
        ),
    )
    return out


# --- permute: the plan, then the rows ---------------------------------------------------------


def plan_chunks(num_slots: int, num_experts: int) -> tuple[int, int]:
    """(number of chunks, slots per chunk) of the plan kernels: chunks of PLAN_CHUNK_SLOTS
    slots, or smaller ones (PLAN_MIN_CHUNK_SLOTS at least) for PLAN_MIN_CHUNKS chunks; and
    few enough that the [chunks, E] workspace stays within PLAN_WORKSPACE_ENTRIES. The plan
    itself does not depend on the chunking."""
    if num_slots == 0:
        return 0, 1
    target = min(max(-(-num_slots // PLAN_MIN_CHUNKS), PLAN_MIN_CHUNK_SLOTS), PLAN_CHUNK_SLOTS)
    chunks = min(-(-num_slots // target), max(1, PLAN_WORKSPACE_ENTRIES // num_experts))
    chunk = -(-num_slots // chunks)
    return -(-num_slots // chunk), chunk


def _dropless_plan(
    launch: _cuda.Launcher,
    experts: Tensor,
    num_experts: int,
    rows: int,
    block_size: int = 1,
    dropped: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(tokens_per_expert, offsets, row_to_slot [rows], slot_to_row)`` of the dropless plan of
    ``experts`` (int64, contiguous), each expert's rows in whole blocks of ``block_size``; -1
    in the rows that hold no slot (padding, and past ``offsets[E]``). The plan kernels write
    every entry of their outputs, and zeros into ``dropped`` ([E] int64, if given: the drop
    counts of a dropless permute), so that none of them needs a fill kernel first."""
    device = experts.device
    num_tokens, k = experts.shape
    num_slots = num_tokens * k
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int64, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    slot_to_row = torch.empty(num_tokens, k, dtype=torch.int64, device=device)
    if max(num_slots, rows) <= SMALL_PLAN_MAX_SLOTS and num_experts <= SMALL_PLAN_MAX_EXPERTS:
        row_to_slot = torch.empty(rows, dtype=torch.int64, device=device)
        launch(
            "plan.cu",
            None,
            "sr_plan_small",
            1,
            1024,
            (
                pointer(experts),
                num_slots,
                num_experts,
                block_size,
                rows,
                pointer(tokens_per_expert),
                pointer(offsets),
                pointer(row_to_slot),
                pointer(slot_to_row),
                pointer(dropped),
                launch.error_pointer,
            ),
        )
        return tokens_per_expert, offsets, row_to_slot, slot_to_row
    row_to_slot = torch.empty(rows, dtype=torch.int64, device=device)
    chunks, chunk = plan_chunks(num_slots, num_experts)
    # Each chunk's warp zeroes its row of the workspace before counting.
    counts = torch.empty(max(chunks, 1) * num_experts, dtype=torch.int64, device=device)
    # A warp per expert, eight per block of sr_plan_totals and sr_plan_cursors; the latter's
    # threads also fill the rows past the plan, which may be all of them (eight rows or more
    # per thread).
    expert_blocks = -(-num_experts // 8)
    cursor_blocks = max(expert_blocks, min(-(-rows // (256 * 8)), MAX_ROW_BLOCKS))
    plan: list[tuple[str, int, int, tuple[Any, ...]]] = [
        (
            "sr_plan_count",
            -(-chunks // 4),
            128,
            (
                pointer(experts),
                num_slots,
                num_experts,
                chunk,
                chunks,
                pointer(counts),
                launch.error_pointer,
            ),
        ),
        (
            "sr_plan_totals",
            expert_blocks,
            256,
            (pointer(counts), chunks, num_experts, pointer(tokens_per_expert)),
        ),
        ("sr_plan_scan", 1, 1024, (pointer(tokens_per_expert), num_experts, block_size, pointer(offsets))),
        (
            "sr_plan_cursors",
            cursor_blocks,
            256,
            (
                pointer(counts),
                chunks,
                num_experts,
                pointer(tokens_per_expert),
                pointer(offsets),
                rows,
                pointer(row_to_slot),
                pointer(dropped),
            ),
        ),
        (
            "sr_plan_scatter",
            -(-chunks // 4),
            128,
            (
                pointer(experts),
                num_slots,
                num_experts,
                chunk,
                chunks,
                pointer(counts),
                rows,
                pointer(row_to_slot),
                pointer(slot_to_row),
                launch.error_pointer,
            ),
        ),
    ]
    for kernel, grid, block, args in plan:
        launch("plan.cu", None, kernel, grid, block, args)
    return tokens_per_expert, offsets, row_to_slot, slot_to_row


def group_layout_cuda(offsets: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(ends [E] int32, padding [rows, 1] bool, empty [E, 1, 1] bool)`` of a plan's offsets ``[E + 1]``
    for torch's grouped GEMM (see ``sparseroute.ops.experts._group_layout``, whose torch code
    computes the same on other devices): the clamped, non-decreasing group ends, the rows past
    the last group, the experts without rows. Malformed offsets are counted in the error
    buffer."""
    device = offsets.device
    num_experts = offsets.shape[0] - 1
    if offsets.dim() != 1 or num_experts < 1:
        raise _invalid("offsets", "a 1-D tensor of E + 1 >= 2 entries", tuple(offsets.shape))
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    empty = torch.empty(num_experts, dtype=torch.bool, device=device)
    padding = torch.empty(num_rows, dtype=torch.bool, device=device)
    with _cuda.launcher(device) as launch:
        launch(
            "plan.cu",
            None,
            "sr_group_ends",
            1,
            1024,
            (
                pointer(as_dtype(offsets, torch.int64).contiguous()),
                num_experts,
                num_rows,
                pointer(ends),
                pointer(empty),
                launch.error_pointer,
            ),
        )
        launch(
            "plan.cu",
            None,
            "sr_padding_rows",
            min(-(-num_rows // 256), MAX_ROW_BLOCKS),
            256,
            (pointer(ends), num_experts, num_rows, pointer(padding)),
        )
    return ends, padding.unsqueeze(1), empty.view(-1, 1, 1)


#: The most signed 64-bit integer: flipping these bits of a negative float's pattern orders
#: negative floats below positive ones as integers (the order of Rust's f64::total_cmp).
_LOW_63_BITS = (1 << 63) - 1


def _kept_by_weight(
    launch: _cuda.Launcher,
    experts: Tensor,
    drop_weights: Tensor,
    dropless_rows: Tensor,
    routed_offsets: Tensor,
    capacity: int,
) -> tuple[Tensor, Tensor]:
    """drop_policy "probs": ``(kept, kept_before)`` over the dropless rows. Row i is kept when
    its slot is among its expert's ``capacity`` highest weights (equal weights: the lower
    slot first, -0.0 below 0.0, as the CPU's ``total_cmp``); ``kept_before[i]`` counts the
    kept rows before it. Two stable sorts (weight descending, then expert) rank every slot
    within its expert; NaN weights are counted in the error buffer (they rank first)."""
    num_experts = routed_offsets.shape[0] - 1
    num_rows = dropless_rows.shape[0]
    flat_weights = drop_weights.reshape(-1)
    launch.errors[ERROR_DROP_WEIGHTS].add_(torch.isnan(flat_weights).sum().to(torch.int32))
    valid = dropless_rows >= 0
    slots = dropless_rows.clamp(min=0)
    bits = flat_weights.to(torch.float64)[slots].view(torch.int64)
    keys = bits ^ ((bits >> 63) & _LOW_63_BITS)
    expert_of_row = torch.where(valid, experts.reshape(-1)[slots], num_experts)
    order = torch.sort(keys, descending=True, stable=True).indices
    order = order[torch.sort(expert_of_row[order], stable=True).indices]
    ranks = torch.arange(num_rows, device=order.device) - routed_offsets[expert_of_row[order]]
    kept = torch.empty(num_rows, dtype=torch.uint8, device=order.device)
    kept[order] = (ranks < capacity).to(torch.uint8)
    kept_before = torch.cumsum(kept, 0, dtype=torch.int64) - kept
    return kept, kept_before


def _capacity_plan(
    launch: _cuda.Launcher,
    experts: Tensor,
    num_experts: int,
    capacity: int,
    drop_weights: Tensor | None,
    pad_to_capacity: bool,
    rows: int,
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(tokens_per_expert, offsets, row_to_slot [rows], slot_to_row, dropped)`` of the
    capacity-constrained plan: the dropless plan, then each dropless row kept or dropped
    (``sr_capacity_rows``). An expert keeps min(demand, capacity) slots under both drop
    policies, so the counts and offsets follow from the dropless counts alone."""
    device = experts.device
    num_slots = experts.numel()
    demand, routed_offsets, dropless_rows, slot_to_row = _dropless_plan(
        launch, experts, num_experts, num_slots
    )
    tokens_per_expert = demand.clamp(max=capacity)
    dropped = demand - tokens_per_expert
    if pad_to_capacity:
        offsets = torch.arange(num_experts + 1, dtype=torch.int64, device=device) * capacity
    else:
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
        blocks = tokens_per_expert if block_size == 1 else -(-tokens_per_expert // block_size) * block_size
        torch.cumsum(blocks, 0, out=offsets[1:])
    kept = kept_before = None
    if drop_weights is not None:
        kept, kept_before = _kept_by_weight(
            launch, experts, drop_weights, dropless_rows, routed_offsets, capacity
        )
    row_to_slot = torch.full((rows,), -1, dtype=torch.int64, device=device)
    launch(
        "plan.cu",
        None,
        "sr_capacity_rows",
        min(-(-num_slots // 256), MAX_ROW_BLOCKS),
        256,
        (
            pointer(experts),
            pointer(dropless_rows),
            num_slots,
            num_experts,
            pointer(routed_offsets),
            pointer(kept),
            pointer(kept_before),
            capacity,
            pointer(offsets),
            rows,
            pointer(row_to_slot),
            pointer(slot_to_row),
            launch.error_pointer,
        ),
    )
    return tokens_per_expert, offsets, row_to_slot, slot_to_row, dropped


def permute_cuda(
    x: Tensor,
    experts: Tensor,
    num_experts: int,
    num_rows: int | None,
    capacity: int | None,
    drop_weights: Tensor | None,
    pad_to_capacity: bool,
    block_size: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _element_dtype(x, "x")
    device = x.device
    _on_device(experts, "experts", device, "x")
    if experts.dim() != 2:
        raise ValueError(f"experts: expected a 2-D tensor [T, k], got shape {tuple(experts.shape)}")
    if num_experts < 1:
        raise _invalid("num_experts", "at least 1", num_experts)
    if capacity is not None and capacity < 0:
        raise _invalid("capacity", "a value >= 0", capacity)
    if block_size < 1:
        raise _invalid("block_size", "at least 1", block_size)
    if pad_to_capacity and capacity is not None and capacity % block_size != 0:
        raise _invalid("capacity", f"a multiple of block_size = {block_size} with pad_to_capacity", capacity)
    num_tokens, k = experts.shape
    if drop_weights is not None:
        _on_device(drop_weights, "drop_weights", device, "x")
        if drop_weights.numel() != num_tokens * k:
            raise _invalid("drop_weights", f"{num_tokens * k} weights (T * k)", drop_weights.numel())
    static_rows, rows = plan_rows(
        num_tokens * k, num_experts, num_rows, capacity, pad_to_capacity, block_size
    )
    experts = as_dtype(experts, torch.int64).contiguous()
    with _cuda.launcher(device) as launch:
        if capacity is None:
            dropped = torch.empty(num_experts, dtype=torch.int64, device=device)
            tokens_per_expert, offsets, row_to_slot, slot_to_row = _dropless_plan(
                launch, experts, num_experts, rows, block_size, dropped
            )
        else:
            tokens_per_expert, offsets, row_to_slot, slot_to_row, dropped = _capacity_plan(
                launch, experts, num_experts, capacity, drop_weights, pad_to_capacity, rows, block_size
            )
    if static_rows is None:
        # The row count is data-dependent: read it back (the one host synchronisation of the
        # CUDA ops; pass num_rows for a sync-free, graph-capturable permute).
        routed = int(offsets[num_experts].item())
        if routed < rows:
            row_to_slot = row_to_slot[:routed].clone()
    x_sorted = _gather(x, row_to_slot, k, None)
    return x_sorted, tokens_per_expert, offsets, row_to_slot, slot_to_row, dropped


# --- tokens: Mixture-of-Depths selection and row movement ---------------------------------------

#: The kept-position kinds of sr_select_tokens (its `rule` argument).
_SELECT_RULES = {"top": 0, "fraction": 1, "threshold": 2}


def _token_indices(indices: Tensor, device: torch.device, batch: int, seq_len: int) -> Tensor:
    _on_device(indices, "indices", device, "x")
    if indices.dim() != 2 or indices.shape[0] != batch:
        raise ValueError(
            f"indices: expected a 2-D tensor [B, C] with B = {batch}, got shape {tuple(indices.shape)}"
        )
    if indices.shape[1] > max(seq_len, 0) or indices.shape[1] >= 2**31:
        raise _invalid("indices", f"at most S = {seq_len} entries per sequence", tuple(indices.shape))
    return as_dtype(indices, torch.int64).contiguous()


def _token_inverse(launch: Any, dtype: torch.dtype, indices: Tensor, seq_len: int) -> Tensor:
    """[B, S] int32: the entry of indices that keeps each position, -1 for none, -2 for a
    position kept twice (counted, and treated as kept by none)."""
    batch, capacity = indices.shape
    inverse = torch.full((batch, seq_len), -1, dtype=torch.int32, device=indices.device)
    entries = batch * capacity
    launch(
        "tokens.cu",
        dtype,
        "sr_token_inverse",
        min(-(-entries // 256), MAX_ROW_BLOCKS),
        256,
        (
            pointer(indices),
            batch,
            seq_len,
            capacity,
            pointer(inverse),
            launch.error_pointer,
        ),
    )
    return inverse


def _per_position(
    tensor: Tensor | None, name: str, dtype: torch.dtype, batch: int, seq_len: int, device: torch.device
) -> Tensor | None:
    """A [B, S] scale or gate as a contiguous accumulator-dtype tensor on ``device``."""
    if tensor is None:
        return None
    if tensor.numel() != batch * seq_len:
        raise _invalid(name, f"[B, S] = {[batch, seq_len]} elements", tuple(tensor.shape))
    return tensor.to(device=device, dtype=accumulator_dtype(dtype)).contiguous()


def gather_tokens_cuda(x: Tensor, indices: Tensor, scale: Tensor | None) -> Tensor:
    dtype = _element_dtype(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x: expected a 3-D tensor [B, S, d], got shape {tuple(x.shape)}")
    device = x.device
    batch, seq_len, row_len = x.shape
    indices = _token_indices(indices, device, batch, seq_len)
    capacity = indices.shape[1]
    scale = _per_position(scale, "scale", dtype, batch, seq_len, device)
    x = x.contiguous()
    out = torch.empty(batch, capacity, row_len, dtype=dtype, device=device)
    if batch * capacity == 0:
        return out
    with _cuda.launcher(device) as launch:
        inverse = _token_inverse(launch, dtype, indices, seq_len)
        if row_len > 0:
            launch(
                "tokens.cu",
                dtype,
                "sr_gather_tokens",
                min(batch * capacity, MAX_ROW_BLOCKS),
                128,
                (
                    pointer(x),
                    batch,
                    seq_len,
                    row_len,
                    pointer(indices),
                    capacity,
                    pointer(inverse),
                    pointer(scale),
                    pointer(out),
                    _vectorized(row_len, x, out),
                ),
            )
    return out


def scatter_tokens_cuda(
    x: Tensor | None, y: Tensor | None, indices: Tensor, gate: Tensor | None, seq_len: int
) -> Tensor:
    reference = x if x is not None else y
    if reference is None:
        raise ValueError("scatter_tokens: needs x or y")
    dtype = _element_dtype(reference, "x" if x is not None else "y")
    device = reference.device
    if reference.dim() != 3:
        raise ValueError(f"x: expected a 3-D tensor, got shape {tuple(reference.shape)}")
    batch, row_len = reference.shape[0], reference.shape[2]
    indices = _token_indices(indices, device, batch, seq_len)
    capacity = indices.shape[1]
    if x is not None:
        _on_device(x, "x", device, "x")
        if tuple(x.shape) != (batch, seq_len, row_len) or x.dtype != dtype:
            raise _invalid(
                "x", f"shape {[batch, seq_len, row_len]}, dtype {dtype}", (tuple(x.shape), x.dtype)
            )
        x = x.contiguous()
    if y is not None:
        _on_device(y, "y", device, "x")
        if tuple(y.shape) != (batch, capacity, row_len) or y.dtype != dtype:
            raise _invalid(
                "y", f"shape {[batch, capacity, row_len]}, dtype {dtype}", (tuple(y.shape), y.dtype)
            )
        y = y.contiguous()
    if gate is not None and y is None:
        raise ValueError("gate: needs the rows y to scale")
    gate = _per_position(gate, "gate", dtype, batch, seq_len, device)
    out = torch.empty(batch, seq_len, row_len, dtype=dtype, device=device)
    if batch * seq_len == 0 or row_len == 0:
        return out
    with _cuda.launcher(device) as launch:
        inverse = _token_inverse(launch, dtype, indices, seq_len)
        launch(
            "tokens.cu",
            dtype,
            "sr_scatter_tokens",
            min(batch * seq_len, MAX_ROW_BLOCKS),
            128,
            (
                pointer(x),
                pointer(y),
                batch,
                seq_len,
                row_len,
                capacity,
                pointer(inverse),
                pointer(gate),
                pointer(out),
                _vectorized(row_len, *(t for t in (x, y, out) if t is not None)),
            ),
        )
    return out


def token_dots_cuda(grad: Tensor, y: Tensor, indices: Tensor) -> Tensor:
    dtype = _element_dtype(grad, "grad")
    if grad.dim() != 3:
        raise ValueError(f"grad: expected a 3-D tensor [B, S, d], got shape {tuple(grad.shape)}")
    device = grad.device
    batch, seq_len, row_len = grad.shape
    indices = _token_indices(indices, device, batch, seq_len)
    capacity = indices.shape[1]
    _on_device(y, "y", device, "grad")
    if y.dtype != dtype:
        raise TypeError(f"y: expected dtype {dtype} (the dtype of grad), got {y.dtype}")
    if tuple(y.shape) != (batch, capacity, row_len):
        raise _invalid("y", f"shape [B, C, d] = {[batch, capacity, row_len]}", list(y.shape))
    out = torch.zeros(batch, seq_len, dtype=accumulator_dtype(dtype), device=device)
    if batch * seq_len == 0 or capacity == 0:
        return out
    grad = grad.contiguous()
    y = y.contiguous()
    with _cuda.launcher(device) as launch:
        inverse = _token_inverse(launch, dtype, indices, seq_len)
        launch(
            "tokens.cu",
            dtype,
            "sr_token_dots",
            -(-(batch * seq_len) // 32),
            256,
            (
                pointer(grad),
                pointer(y),
                batch,
                seq_len,
                row_len,
                capacity,
                pointer(inverse),
                pointer(out),
            ),
        )
    return out


def select_tokens_cuda(
    scores: Tensor, capacity: int, rule: str, value: float, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    _element_dtype(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores: expected a 2-D tensor [B, S], got shape {tuple(scores.shape)}")
    device = scores.device
    batch, seq_len = scores.shape
    if not 0 <= capacity <= seq_len:
        raise _invalid("capacity", f"0 <= capacity <= {seq_len} (the sequence length)", capacity)
    if rule not in _SELECT_RULES:
        raise _invalid("rule", "'top', 'fraction' or 'threshold'", repr(rule))
    if rule == "fraction" and not 0 < value <= 1:
        raise _invalid("capacity", "a fraction in (0, 1]", value)
    if rule == "threshold" and math.isnan(value):
        raise _invalid("threshold", "a number", "NaN")
    if lengths is not None:
        _on_device(lengths, "lengths", device, "scores")
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"lengths: expected shape [B] = [{batch}], got {list(lengths.shape)}")
        lengths = as_dtype(lengths, torch.int64).contiguous()
    indices = torch.empty(batch, capacity, dtype=torch.int64, device=device)
    mask = torch.empty(batch, seq_len, dtype=torch.bool, device=device)
    if batch == 0 or seq_len == 0:
        return indices, mask
    _check_int32_count(seq_len, "scores", "positions per sequence")
    with _cuda.launcher(device) as launch:
        _launch_select(
            launch, scores.contiguous(), capacity, _SELECT_RULES[rule], value, lengths, indices, mask
        )
    return indices, mask


#: Positions per thread that sr_select_tokens' blocks are sized for (one block per sequence,
#: 32 to 1024 threads): enough threads that each walk over the sequence (one per digit) has
#: many loads in flight, and few enough that short sequences do not pay for idle warps at
#: every barrier.
SELECT_POSITIONS_PER_THREAD = 8


def select_threads(seq_len: int) -> int:
    """The threads of each sr_select_tokens block for sequences of ``seq_len`` positions."""
    warps = -(-seq_len // (32 * SELECT_POSITIONS_PER_THREAD))
    return 32 * min(max(warps, 1), 32)


def _launch_select(
    launch: _cuda.Launcher,
    scores: Tensor,
    capacity: int,
    rule: int,
    value: float,
    lengths: Tensor | None,
    indices: Tensor,
    mask: Tensor | None,
    kept_scores: Tensor | None = None,
) -> None:
    """Each row of the contiguous ``[B, S]`` scores: its kept positions into ``indices``
    ``[B, C]`` (ascending, -1 padded), and optionally the mask ``[B, S]`` and the kept scores
    ``[B, C]`` (the scores' dtype)."""
    batch, seq_len = scores.shape
    launch(
        "tokens.cu",
        scores.dtype,
        "sr_select_tokens",
        min(batch, MAX_ROW_BLOCKS),
        select_threads(seq_len),
        (
            pointer(scores),
            batch,
            seq_len,
            capacity,
            pointer(lengths),
            rule,
            value,
            pointer(indices),
            pointer(mask),
            pointer(kept_scores),
            launch.error_pointer,
        ),
    )


# --- load balancing: score sums, expert counts, z-loss ------------------------------------------

#: Tokens per reduction segment of score_sums (balance.cu, SR_SCORE_SEGMENT).
SCORE_SEGMENT_TOKENS = 64
#: Segments per group above which sr_score_totals adds each sum with a warp
#: (balance.cu, SR_SCORE_TOTALS_BY_WARP).
SCORE_TOTALS_BY_WARP = 32


def _token_mask(mask: Tensor | None, num_tokens: int, device: torch.device) -> Tensor | None:
    """The [T] token mask as contiguous uint8 on ``device`` (the public wrappers check that it
    is there already)."""
    if mask is None:
        return None
    if mask.numel() != num_tokens:
        raise _invalid("attention_mask", f"{num_tokens} elements (one per token)", mask.numel())
    return mask.reshape(-1).to(device=device, dtype=torch.uint8).contiguous()


def _balance_logits(logits: Tensor, score: str | None) -> tuple[torch.dtype, int, int]:
    dtype = _element_dtype(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [T, E], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise _invalid("logits", "at least one expert (E >= 1)", "E = 0")
    if score is not None and score not in ("softmax", "sigmoid"):
        raise _invalid("score", "'softmax' or 'sigmoid'", repr(score))
    return dtype, logits.shape[0], logits.shape[1]


def _group_size(group_size: int) -> int:
    if group_size < 1:
        raise _invalid("seq_len", "at least 1", group_size)
    return group_size


def score_sums_cuda(logits: Tensor, score: str, group_size: int, mask: Tensor | None) -> Tensor:
    dtype, num_tokens, num_experts = _balance_logits(logits, score)
    group_size = _group_size(group_size)
    device = logits.device
    groups = -(-num_tokens // group_size)
    if num_tokens == 0:
        return torch.zeros(groups, num_experts, dtype=accumulator_dtype(dtype), device=device)
    # Every sum is written by sr_score_totals, in the accumulator type: no zero fill and no
    # conversion (two launches fewer).
    sums = torch.empty(groups, num_experts, dtype=accumulator_dtype(dtype), device=device)
    logits = logits.contiguous()
    mask = _token_mask(mask, num_tokens, device)
    segments = min((group_size - 1) // SCORE_SEGMENT_TOKENS + 2, -(-num_tokens // SCORE_SEGMENT_TOKENS))
    scores = torch.empty(num_tokens, num_experts, dtype=accumulator_dtype(dtype), device=device)
    partials = torch.empty(groups * segments, num_experts, dtype=torch.float64, device=device)
    sigmoid = score == "sigmoid"
    with _cuda.launcher(device) as launch:
        launch(
            "balance.cu",
            dtype,
            "sr_score_stats",
            -(-num_tokens // 4),
            128,
            (
                pointer(logits),
                num_tokens,
                num_experts,
                sigmoid,
                pointer(mask),
                pointer(scores),
                launch.error_pointer,
            ),
        )
        launch(
            "balance.cu",
            dtype,
            "sr_score_partials",
            min(-(-partials.numel() // 256), MAX_ROW_BLOCKS),
            256,
            (
                pointer(scores),
                num_tokens,
                num_experts,
                group_size,
                groups,
                segments,
                pointer(partials),
            ),
        )
        launch(
            "balance.cu",
            dtype,
            "sr_score_totals",
            min(-(-sums.numel() * (32 if segments > SCORE_TOTALS_BY_WARP else 1) // 256), MAX_ROW_BLOCKS),
            256,
            (pointer(partials), groups, segments, num_experts, pointer(sums)),
        )
    return sums


def score_sums_backward_cuda(
    logits: Tensor, score: str, group_size: int, mask: Tensor | None, grad_sums: Tensor
) -> Tensor:
    dtype, num_tokens, num_experts = _balance_logits(logits, score)
    group_size = _group_size(group_size)
    device = logits.device
    _on_device(grad_sums, "grad_sums", device, "logits")
    groups = -(-num_tokens // group_size)
    if grad_sums.numel() != groups * num_experts:
        raise _invalid("grad_sums", f"[G, E] = {[groups, num_experts]} elements", tuple(grad_sums.shape))
    grad_logits = torch.empty(num_tokens, num_experts, dtype=dtype, device=device)
    if num_tokens == 0:
        return grad_logits
    logits = logits.contiguous()
    mask = _token_mask(mask, num_tokens, device)
    grad_sums = as_dtype(grad_sums, accumulator_dtype(dtype)).contiguous()
    launch = _cuda.launcher(device)
    launch(
        "balance.cu",
        dtype,
        "sr_score_sums_backward",
        -(-num_tokens // 4),
        128,
        (
            pointer(logits),
            num_tokens,
            num_experts,
            score == "sigmoid",
            group_size,
            pointer(mask),
            pointer(grad_sums),
            pointer(grad_logits),
            launch.error_pointer,
        ),
    )
    return grad_logits


def expert_counts_cuda(experts: Tensor, num_experts: int, group_size: int, mask: Tensor | None) -> Tensor:
    if experts.dim() != 2:
        raise ValueError(f"experts: expected a 2-D tensor [T, k], got shape {tuple(experts.shape)}")
    if num_experts < 0 or num_experts >= 2**31:
        raise _invalid("num_experts", "a number of experts in [0, 2**31)", num_experts)
    group_size = _group_size(group_size)
    device = experts.device
    num_tokens, k = experts.shape
    groups = -(-num_tokens // group_size)
    counts = torch.zeros(groups, num_experts, dtype=torch.int64, device=device)
    if num_tokens * k == 0:
        return counts
    experts = as_dtype(experts, torch.int64).contiguous()
    mask = _token_mask(mask, num_tokens, device)
    # Larger groups are one group; clamped, group_size * k cannot overflow in the kernel.
    group_size = min(group_size, num_tokens)
    chunks = groups * -(-(group_size * k) // EXPERT_COUNT_CHUNK)
    launch = _cuda.launcher(device)
    launch(
        "plan.cu",
        None,
        "sr_expert_counts",
        min(chunks, MAX_ROW_BLOCKS),
        256,
        (
            pointer(experts),
            num_tokens,
            k,
            num_experts,
            group_size,
            pointer(mask),
            pointer(counts),
            launch.error_pointer,
        ),
    )
    return counts


def z_loss_cuda(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    dtype, num_tokens, num_experts = _balance_logits(logits, None)
    device = logits.device
    acc = accumulator_dtype(dtype)
    loss = torch.zeros((), dtype=acc, device=device)
    stats = torch.empty(num_tokens, Z_LOSS_STATS, dtype=acc, device=device)
    if num_tokens == 0:
        return loss, stats
    logits = logits.contiguous()
    mask = _token_mask(mask, num_tokens, device)
    count = torch.empty(1, dtype=torch.float64, device=device)
    scale = torch.empty(1, dtype=acc, device=device)
    squares = torch.empty(num_tokens, dtype=torch.float64, device=device)
    with _cuda.launcher(device) as launch:
        launch(
            "balance.cu",
            dtype,
            "sr_z_loss_count",
            1,
            1024,
            (pointer(mask), num_tokens, pointer(count), pointer(scale)),
        )
        launch(
            "balance.cu",
            dtype,
            "sr_z_loss_rows",
            -(-num_tokens // 4),
            128,
            (
                pointer(logits),
                num_tokens,
                num_experts,
                pointer(mask),
                pointer(scale),
                pointer(stats),
                pointer(squares),
                launch.error_pointer,
            ),
        )
        launch(
            "balance.cu",
            dtype,
            "sr_z_loss_total",
            1,
            1024,
            (pointer(squares), num_tokens, pointer(count), pointer(loss)),
        )
    return loss, stats


# --- routing variants: top-p, expert choice -------------------------------------------------------


def topp_gating_cuda(
    logits: Tensor, p: float, min_k: int, max_k: int, inclusive: bool, normalize: bool
) -> tuple[Tensor, Tensor]:
    dtype = _check_logits(logits)
    num_tokens, num_experts = logits.shape
    if not 0.0 < p <= 1.0:
        raise _invalid("p", "a probability in (0, 1]", p)
    if not 1 <= max_k <= num_experts:
        raise _invalid("max_k", f"1 <= max_k <= E = {num_experts}", max_k)
    if not 0 <= min_k <= max_k:
        raise _invalid("min_k", f"0 <= min_k <= max_k = {max_k}", min_k)
    device = logits.device
    logits = logits.contiguous()
    weights = torch.empty(num_tokens, max_k, dtype=accumulator_dtype(dtype), device=device)
    experts = torch.empty(num_tokens, max_k, dtype=torch.int64, device=device)
    launch = _cuda.launcher(device)
    launch(
        "topp.cu",
        dtype,
        "sr_topp_gating",
        -(-num_tokens // 4),
        128,
        (
            pointer(logits),
            num_tokens,
            num_experts,
            p,
            min_k,
            max_k,
            inclusive,
            normalize,
            pointer(weights),
            pointer(experts),
            launch.error_pointer,
        ),
    )
    return weights, experts


def _expert_probabilities(launch: _cuda.Launcher, logits: Tensor) -> Tensor:
    """``[E, T]``: the softmax over experts of each token, expert-major (the CPU's bits)."""
    num_tokens, num_experts = logits.shape
    probs = torch.empty(num_experts, num_tokens, dtype=accumulator_dtype(logits.dtype), device=logits.device)
    launch(
        "expert_choice.cu",
        logits.dtype,
        "sr_expert_probs",
        -(-num_tokens // 4),
        128,
        (pointer(logits), num_tokens, num_experts, pointer(probs), launch.error_pointer),
    )
    return probs


def expert_choice_cuda(logits: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    _check_logits(logits)
    num_tokens, num_experts = logits.shape
    if not 0 <= capacity <= num_tokens:
        raise _invalid("capacity", f"0 <= capacity <= T = {num_tokens}", capacity)
    _check_int32_count(num_tokens, "logits", "tokens")
    device = logits.device
    indices = torch.empty(num_experts, capacity, dtype=torch.int64, device=device)
    gates = torch.empty(num_experts, capacity, dtype=accumulator_dtype(logits.dtype), device=device)
    if num_tokens == 0:
        return gates, indices
    with _cuda.launcher(device) as launch:
        probs = _expert_probabilities(launch, logits.contiguous())
        if capacity > 0:
            # Each expert's row of probabilities is a sequence whose top C it keeps: ties to
            # the lower token, listed in ascending token order, the gates beside them.
            _launch_select(launch, probs, capacity, _SELECT_RULES["top"], 0.0, None, indices, None, gates)
    return gates, indices


def expert_choice_backward_cuda(logits: Tensor, indices: Tensor, grad_gates: Tensor) -> Tensor:
    dtype = _check_logits(logits)
    device = logits.device
    _on_device(indices, "indices", device, "logits")
    _on_device(grad_gates, "grad_gates", device, "logits")
    num_tokens, num_experts = logits.shape
    if indices.shape != grad_gates.shape or indices.dim() != 2 or indices.shape[0] != num_experts:
        raise _invalid("indices", f"shape [E = {num_experts}, C] like grad_gates", tuple(indices.shape))
    grad_logits = torch.empty(num_tokens, num_experts, dtype=dtype, device=device)
    if num_tokens == 0:
        return grad_logits
    acc = accumulator_dtype(dtype)
    # gates[e, c] = p[indices[e, c], e]: with g the gates' gradient in the [T, E] slot layout,
    # dL/dl_t = p_t * (g_t - <p_t, g_t>), token by token.
    placed = torch.zeros(num_tokens, num_experts, dtype=acc, device=device)
    with _cuda.launcher(device) as launch:
        _place_choices(launch, indices, as_dtype(grad_gates, acc), num_tokens, None, placed)
        launch(
            "expert_choice.cu",
            dtype,
            "sr_expert_choice_backward",
            -(-num_tokens // 4),
            128,
            (
                pointer(logits.contiguous()),
                num_tokens,
                num_experts,
                pointer(placed),
                pointer(grad_logits),
                launch.error_pointer,
            ),
        )
    return grad_logits


def _place_choices(
    launch: _cuda.Launcher,
    indices: Tensor,
    values: Tensor,
    num_tokens: int,
    experts: Tensor | None,
    slot_values: Tensor,
) -> None:
    """``values[e, c]`` (float32 or float64) into ``slot_values[indices[e, c], e]`` of the
    ``[T, E]`` slot layout, and ``e`` into ``experts`` there unless it is None."""
    num_experts, capacity = indices.shape
    if num_experts * capacity == 0:
        return
    launch(
        "expert_choice.cu",
        values.dtype,
        "sr_expert_choice_slots",
        min(-(-(num_experts * capacity) // 256), MAX_ROW_BLOCKS),
        256,
        (
            pointer(as_dtype(indices, torch.int64).contiguous()),
            pointer(values.contiguous()),
            num_experts,
            capacity,
            num_tokens,
            pointer(experts),
            pointer(slot_values),
            launch.error_pointer,
        ),
    )


def expert_choice_slots_cuda(indices: Tensor, gates: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    device = indices.device
    _on_device(gates, "gates", device, "indices")
    if indices.dim() != 2 or gates.shape != indices.shape:
        raise _invalid("indices", "an [E, C] tensor shaped like gates", tuple(indices.shape))
    if gates.dtype not in (torch.float32, torch.float64):
        raise _invalid("gates", "float32 or float64 (the gates of expert_choice)", gates.dtype)
    num_experts = indices.shape[0]
    experts = torch.full((num_tokens, num_experts), -1, dtype=torch.int64, device=device)
    weights = torch.zeros(num_tokens, num_experts, dtype=gates.dtype, device=device)
    with _cuda.launcher(device) as launch:
        _place_choices(launch, indices, gates, num_tokens, experts, weights)
    return weights, experts


# --- Sinkhorn ---------------------------------------------------------------------------------

#: Tokens per block of the Sinkhorn iteration (rust/core/src/balance/mod.rs, SINKHORN_BLOCK).
SINKHORN_BLOCK = 512
#: Without an iteration limit, iterations queued between two reads of the convergence flag.
SINKHORN_ITERATIONS_PER_CHECK = 8


def sinkhorn_cuda(logits: Tensor, iters: int | None, tol: float) -> Tensor:
    _check_logits(logits)
    num_tokens, num_experts = logits.shape
    if not tol >= 0:
        raise _invalid("tol", "a value >= 0", tol)
    if iters is not None and iters < 1:
        raise _invalid("iters", "at least 1", iters)
    device = logits.device
    out = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
    if num_tokens == 0:
        return out
    logits = as_dtype(logits, torch.float32).contiguous()
    num_blocks = -(-num_tokens // SINKHORN_BLOCK)
    d0 = torch.empty(num_tokens, dtype=torch.float32, device=device)
    d1 = torch.ones(num_experts, dtype=torch.float32, device=device)
    partials = torch.empty(num_blocks * num_experts, dtype=torch.float32, device=device)
    changes = torch.empty(num_experts, dtype=torch.float32, device=device)
    state = torch.zeros(2, dtype=torch.int32, device=device)  # done, iterations
    # The CPU's float32 constants: 1/T and 1/E divided in float32, tol rounded to float32.
    t_inv = np.float32(1.0) / np.float32(num_tokens)
    e_inv = np.float32(1.0) / np.float32(num_experts)
    count = num_tokens * num_experts
    with _cuda.launcher(device) as launch:
        grid = min(-(-count // 256), MAX_ROW_BLOCKS)
        launch(
            "sinkhorn.cu",
            None,
            "sr_sinkhorn_cost",
            grid,
            256,
            (pointer(logits), count, pointer(out), launch.error_pointer),
        )

        # The arguments of one iteration do not change between iterations.
        block_args = (
            pointer(out),
            num_tokens,
            num_experts,
            t_inv,
            pointer(d1),
            pointer(d0),
            pointer(partials),
            pointer(state),
        )
        update_args = (
            pointer(partials),
            num_blocks,
            num_experts,
            e_inv,
            tol,  # rounded to float32 by the kernel parameter
            pointer(d1),
            pointer(changes),
            pointer(state),
        )

        def iterate(times: int) -> None:
            for _ in range(times):
                launch("sinkhorn.cu", None, "sr_sinkhorn_block", num_blocks, 256, block_args)
                launch("sinkhorn.cu", None, "sr_sinkhorn_update", 1, 256, update_args)

        if iters is not None:
            iterate(iters)
        else:
            # Until converged: the flag is read (a host synchronisation) every few iterations;
            # the iterations queued after convergence return at once.
            while True:
                iterate(SINKHORN_ITERATIONS_PER_CHECK)
                if int(state[0].item()):
                    break
        launch(
            "sinkhorn.cu",
            None,
            "sr_sinkhorn_scores",
            grid,
            256,
            (pointer(out), num_tokens, num_experts, pointer(d0), pointer(d1)),
        )
    return out


def z_loss_backward_cuda(logits: Tensor, stats: Tensor, grad: Tensor) -> Tensor:
    dtype, num_tokens, num_experts = _balance_logits(logits, None)
    device = logits.device
    acc = accumulator_dtype(dtype)
    _on_device(stats, "stats", device, "logits")
    _on_device(grad, "grad", device, "logits")
    if tuple(stats.shape) != (num_tokens, Z_LOSS_STATS) or stats.dtype != acc:
        expected = f"{acc} [T, {Z_LOSS_STATS}] = {[num_tokens, Z_LOSS_STATS]}"
        raise _invalid("stats", expected, f"{stats.dtype} {list(stats.shape)}")
    grad_logits = torch.empty(num_tokens, num_experts, dtype=dtype, device=device)
    if num_tokens == 0:
        return grad_logits
    logits = logits.contiguous()
    stats = stats.contiguous()
    # The upstream gradient stays on the device: no host sync.
    grad = as_dtype(grad, acc).reshape(1)
    launch = _cuda.launcher(device)
    launch(
        "balance.cu",
        dtype,
        "sr_z_loss_backward",
        -(-num_tokens // 4),
        128,
        (pointer(logits), num_tokens, num_experts, pointer(stats), pointer(grad), pointer(grad_logits)),
    )
    return grad_logits


# --- layer routing --------------------------------------------------------------------------------


def layer_plan_cuda(logits: Tensor) -> Tensor:
    dtype = _element_dtype(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] != 3:
        raise ValueError(f"logits: expected [B, L, 3], got shape {tuple(logits.shape)}")
    device = logits.device
    plans = torch.empty(logits.shape[:-1], dtype=torch.int64, device=device)
    num_rows = plans.numel()
    if num_rows == 0:
        return plans
    logits = logits.contiguous()
    launch = _cuda.launcher(device)
    launch(
        "layers.cu",
        dtype,
        "sr_layer_plan",
        min(-(-num_rows // 256), MAX_ROW_BLOCKS),
        256,
        (pointer(logits), num_rows, pointer(plans), launch.error_pointer),
    )
    return plans


# --- replica_map -------------------------------------------------------------------------------


def replica_map_cuda(
    experts: Tensor,
    logical_to_physical: Tensor,
    replica_counts: Tensor,
    num_slots: int,
    slots_per_gpu: int,
    policy: str,
) -> Tensor:
    """``experts`` [T, k] mapped to physical slots (see placement.cu). The layer's table may
    live on the CPU (plans are made there): it is copied to the device, a few hundred bytes."""
    device = experts.device
    if experts.dim() != 2:
        raise _invalid("experts", "a 2-D tensor [T, k]", tuple(experts.shape))
    if logical_to_physical.dim() != 2 or replica_counts.shape != logical_to_physical.shape[:1]:
        raise _invalid(
            "logical_to_physical",
            f"[E, R] with E = {replica_counts.shape[0] if replica_counts.dim() == 1 else '?'} "
            "(the length of replica_counts)",
            tuple(logical_to_physical.shape),
        )
    num_experts, replicas = logical_to_physical.shape
    if num_experts < 1 or replicas < 1:
        raise _invalid("logical_to_physical", "[E, R] with E >= 1 and R >= 1", (num_experts, replicas))
    if slots_per_gpu < 1 or num_slots % slots_per_gpu != 0:
        raise _invalid("slots_per_gpu", f"a divisor of num_slots = {num_slots} (>= 1)", slots_per_gpu)
    if policy not in REPLICA_POLICIES:
        raise _invalid("policy", f"one of {REPLICA_POLICIES}", repr(policy))
    if policy == "load":
        _check_int32_count(experts.numel(), "experts", "ids (T * k) for policy 'load'")
    experts = as_dtype(experts, torch.int64).contiguous()
    table = logical_to_physical.to(device=device, dtype=torch.int64).contiguous()
    counts = replica_counts.to(device=device, dtype=torch.int64).contiguous()
    out = torch.empty_like(experts)
    num_entries = experts.numel()
    if num_entries == 0:
        return out
    with _cuda.launcher(device) as launch:
        if policy == "round_robin":
            # An occurrence's number among its expert's is its rank in the dropless plan.
            _, offsets, _, slot_to_row = _dropless_plan(launch, experts, num_experts, num_entries)
            launch(
                "placement.cu",
                None,
                "sr_replica_round_robin",
                min(-(-num_entries // 256), MAX_ROW_BLOCKS),
                256,
                (
                    pointer(experts),
                    num_entries,
                    pointer(slot_to_row),
                    pointer(offsets),
                    pointer(table),
                    pointer(counts),
                    num_experts,
                    replicas,
                    num_slots,
                    pointer(out),
                    launch.error_pointer,
                ),
            )
        else:
            num_gpus = num_slots // slots_per_gpu
            in_shared = num_gpus + num_slots <= REPLICA_SHARED_COUNTERS
            size = 0 if in_shared else num_gpus + num_slots
            workspace = torch.zeros(size, dtype=torch.int64, device=device)
            launch(
                "placement.cu",
                None,
                "sr_replica_load",
                1,
                32,
                (
                    pointer(experts),
                    num_entries,
                    pointer(table),
                    pointer(counts),
                    num_experts,
                    replicas,
                    num_slots,
                    slots_per_gpu,
                    pointer(workspace),
                    pointer(out),
                    launch.error_pointer,
                ),
            )
    return out


#: GPU and slot counters of sr_replica_load that fit in shared memory (placement.cu).
REPLICA_SHARED_COUNTERS = 8192


# --- registration -------------------------------------------------------------------------------

_KERNELS: dict[str, Callable[..., Any]] = {
    "topk_gating": topk_gating_cuda,
    "topk_gating_backward": topk_gating_backward_cuda,
    "permute": permute_cuda,
    "unpermute": unpermute_cuda,
    "gather_rows": gather_rows_cuda,
    "slot_dots": slot_dots_cuda,
    "select_tokens": select_tokens_cuda,
    "gather_tokens": gather_tokens_cuda,
    "scatter_tokens": scatter_tokens_cuda,
    "token_dots": token_dots_cuda,
    "score_sums": score_sums_cuda,
    "score_sums_backward": score_sums_backward_cuda,
    "expert_counts": expert_counts_cuda,
    "z_loss": z_loss_cuda,
    "z_loss_backward": z_loss_backward_cuda,
    "layer_plan": layer_plan_cuda,
    "topp_gating": topp_gating_cuda,
    "expert_choice": expert_choice_cuda,
    "expert_choice_backward": expert_choice_backward_cuda,
    "expert_choice_slots": expert_choice_slots_cuda,
    "sinkhorn": sinkhorn_cuda,
    "replica_map": replica_map_cuda,
}
assert (*_KERNELS, *TORCH_CODE_OPS) == CUDA_OPS


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
        _eager.register_kernel(name, "cuda", kernel)
    for qualified_name in _sparseroute_ops():
        if qualified_name.removeprefix("sparseroute::") in _KERNELS or _has_cuda_kernel(qualified_name):
            continue
        _eager.register_kernel(
            qualified_name.removeprefix("sparseroute::"), "cuda", _missing_kernel(qualified_name)
        )
