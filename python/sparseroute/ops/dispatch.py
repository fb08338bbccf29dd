"""Dropless token dispatch: permute tokens into expert-major rows, unpermute them back.

Layout of a plan (see ``PermutePlan``): a *slot* is one (token, choice) pair with flat index
``s = t * k + j``; a *row* is one row of the permuted tensor. Rows are ordered by expert,
then by ascending slot index (token, then choice): a stable counting sort, identical for
any thread count.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sparseroute import _core, _memory
from sparseroute._threads import get_num_threads
from sparseroute.ops import _eager
from sparseroute.ops._bridge import accumulator_dtype, as_dtype, numpy_view
from sparseroute.ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_same, check_tensor


class PermutePlan(NamedTuple):
    """Where every slot went in a permute, and back.

    Attributes:
        tokens_per_expert: ``[E]`` int64, slots routed to each expert.
        offsets: ``[E + 1]`` int64, exclusive prefix sums of ``tokens_per_expert``: expert
            ``e`` owns rows ``offsets[e]:offsets[e + 1]``; ``offsets[E]`` is the number of
            routed rows.
        row_to_slot: ``[rows]`` int64, the flat slot ``t * k + j`` each row holds (its token
            is ``row_to_slot // k``); -1 for padding rows past ``offsets[E]``.
        slot_to_row: ``[T, k]`` int64, the row of each slot; -1 for an empty or dropped slot.
        dropped: ``[E]`` int64, slots each expert dropped for lack of capacity (zeros when
            dispatch is dropless). ``tokens_per_expert + dropped`` is the demand per expert.

    With ``pad_to_capacity=True`` the rows form an ``[E, C]`` grid: ``offsets[e] = e * C``
    and the unused rows of each expert's block are zero padding (``row_to_slot`` -1). With
    ``block_size=B`` every expert's rows start at a multiple of B and fill whole blocks of B
    rows, the last one padded with zero rows (``row_to_slot`` -1); ``offsets[E]`` then counts
    the padding too.
    """

    tokens_per_expert: Tensor
    offsets: Tensor
    row_to_slot: Tensor
    slot_to_row: Tensor
    dropped: Tensor

    def block_experts(self, block_size: int) -> Tensor:
        """``[ceil(rows / block_size)]`` int64: the expert whose rows each block of
        ``block_size`` rows holds, -1 for blocks past ``offsets[E]``: the per-block expert ids
        that block-sparse grouped GEMM kernels (such as vLLM's fused MoE Triton kernel) read,
        for a plan built by ``permute(..., block_size=block_size)``. Sync-free (one
        ``searchsorted`` on the plan's device) and traceable by torch.compile."""
        block_size = check_int(block_size, "block_size", minimum=1)
        rows = self.row_to_slot.shape[0]
        starts = torch.arange(0, rows, block_size, dtype=torch.int64, device=self.offsets.device)
        experts = torch.searchsorted(self.offsets[1:], starts, right=True)
        return torch.where(starts < self.offsets[-1], experts, -1)


def _gather(
    x: Tensor,
    row_to_slot: Tensor | np.ndarray,
    k: int,
    weights: Tensor | None,
    threads: int,
) -> Tensor:
    """The rows of ``x`` in plan order (the kernel behind permute and unpermute's gradient).
    ``row_to_slot`` may be the numpy array a plan was written through (permute passes it:
    a tensor's view would cost a microsecond more)."""
    out, out_view = _memory.empty_with_view((row_to_slot.shape[0], x.shape[1]), x.dtype)
    _core.gather_rows(
        numpy_view(x.contiguous()),
        row_to_slot if isinstance(row_to_slot, np.ndarray) else numpy_view(row_to_slot.contiguous()),
        k,
        None if weights is None else numpy_view(weights.contiguous()),
        out_view,
        threads,
    )
    return out


# --- sparseroute::permute ------------------------------------------------------------------


def _static_rows(num_experts: int, num_rows: int | None, capacity: int | None, pad: bool) -> int | None:
    """The row count of permute's output when it does not depend on the data: E * capacity
    for the padded layout, else ``num_rows`` (None: as many rows as the plan fills)."""
    if pad and capacity is not None:
        return num_experts * capacity
    return num_rows


def max_permuted_rows(num_slots: int, num_experts: int, block_size: int = 1) -> int:
    """A row count that holds every plan of ``num_slots`` slots (T * k) over ``num_experts``
    experts with each expert's rows in whole blocks of ``block_size``: every slot, plus up to
    ``block_size - 1`` padding rows per expert, rounded up to whole blocks (so that the rows
    reshape into ``[-1, block_size, d]``). As ``permute``'s ``num_rows`` it gives a static
    row count (no host synchronisation on CUDA) for any routing."""
    bound = num_slots + num_experts * (block_size - 1)
    return -(-bound // block_size) * block_size


def plan_rows(
    num_slots: int, num_experts: int, num_rows: int | None, capacity: int | None, pad: bool, block_size: int
) -> tuple[int | None, int]:
    """``(static, built)`` of permute's plan on every device: its row count when that does
    not depend on the data (None otherwise, see ``_static_rows``), and the rows the plan is
    built in: that count, or as many as any plan can fill (``max_permuted_rows``), cut to
    ``offsets[E]`` afterwards."""
    static = _static_rows(num_experts, num_rows, capacity, pad)
    return static, max_permuted_rows(num_slots, num_experts, block_size) if static is None else static


@_eager.custom_op("permute", device_types="cpu")
def _permute_op(
    x: Tensor,
    experts: Tensor,
    num_experts: int,
    num_rows: int | None,
    capacity: int | None,
    drop_weights: Tensor | None,
    pad_to_capacity: bool,
    block_size: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_tokens, k = experts.shape
    static_rows, rows = plan_rows(
        num_tokens * k, num_experts, num_rows, capacity, pad_to_capacity, block_size
    )
    tokens_per_expert, tokens_view = _memory.empty_with_view((num_experts,), torch.int64)
    offsets, offsets_view = _memory.empty_with_view((num_experts + 1,), torch.int64)
    row_to_slot, row_to_slot_view = _memory.empty_with_view((rows,), torch.int64)
    slot_to_row, slot_to_row_view = _memory.empty_with_view((num_tokens, k), torch.int64)
    dropped, dropped_view = _memory.empty_with_view((num_experts,), torch.int64)
    dropped_view.fill(0)
    threads = get_num_threads()
    plan_views = (tokens_view, offsets_view, row_to_slot_view)
    if capacity is None:
        routed = _core.build_plan(
            numpy_view(experts.contiguous()), num_experts, block_size, *plan_views, slot_to_row_view, threads
        )
    else:
        routed = _core.build_capacity_plan(
            numpy_view(experts.contiguous()),
            num_experts,
            capacity,
            None if drop_weights is None else numpy_view(drop_weights.contiguous()),
            pad_to_capacity,
            block_size,
            *plan_views,
            slot_to_row_view,
            dropped_view,
            threads,
        )
    if static_rows is None and routed < rows:
        row_to_slot = row_to_slot[:routed].clone()
        row_to_slot_view = row_to_slot_view[:routed]
    x_sorted = _gather(x, row_to_slot_view, k, None, threads)
    return x_sorted, tokens_per_expert, offsets, row_to_slot, slot_to_row, dropped


@_permute_op.register_fake
def _(
    x: Tensor,
    experts: Tensor,
    num_experts: int,
    num_rows: int | None,
    capacity: int | None,
    drop_weights: Tensor | None,
    pad_to_capacity: bool,
    block_size: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_tokens, k = experts.shape
    static_rows = _static_rows(num_experts, num_rows, capacity, pad_to_capacity)
    rows = torch.library.get_ctx().new_dynamic_size() if static_rows is None else static_rows
    return (
        x.new_empty(rows, x.shape[1]),
        experts.new_empty(num_experts, dtype=torch.int64),
        experts.new_empty(num_experts + 1, dtype=torch.int64),
        experts.new_empty(rows, dtype=torch.int64),
        experts.new_empty(num_tokens, k, dtype=torch.int64),
        experts.new_empty(num_experts, dtype=torch.int64),
    )


def _permute_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    _x_sorted, _tpe, _offsets, row_to_slot, slot_to_row, _dropped = output
    ctx.save_for_backward(row_to_slot, slot_to_row)
    # Integer outputs (expert ids, plans) take no gradient: without this, autograd would
    # fill a zero tensor as large as each of them on every backward.
    ctx.set_materialize_grads(False)


def _permute_backward(ctx: Any, grad_x_sorted: Tensor | None, *_grads: Tensor | None) -> tuple[Any, ...]:
    if grad_x_sorted is None:
        return (None,) * 8
    row_to_slot, slot_to_row = ctx.saved_tensors
    # The gradient of a gather is the sum of each token's rows: an unweighted unpermute.
    grad_x = _eager.call("unpermute", grad_x_sorted, slot_to_row, row_to_slot, None)
    return grad_x, None, None, None, None, None, None, None


_eager.register_autograd(_permute_op, _permute_backward, setup_context=_permute_setup_context)


# --- sparseroute::unpermute and its gradient pieces ----------------------------------------


@_eager.custom_op("unpermute", device_types="cpu")
def _unpermute_op(
    y_sorted: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, weights: Tensor | None
) -> Tensor:
    num_tokens = slot_to_row.shape[0]
    y, y_view = _memory.empty_with_view((num_tokens, y_sorted.shape[1]), y_sorted.dtype)
    _core.combine_rows(
        numpy_view(y_sorted.contiguous()),
        numpy_view(slot_to_row.contiguous()),
        None if weights is None else numpy_view(weights.contiguous()),
        y_view,
        get_num_threads(),
    )
    return y


@_unpermute_op.register_fake
def _(y_sorted: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, weights: Tensor | None) -> Tensor:
    return y_sorted.new_empty(slot_to_row.shape[0], y_sorted.shape[1])


@_eager.custom_op("gather_rows", device_types="cpu")
def _gather_rows_op(x: Tensor, row_to_slot: Tensor, k: int, weights: Tensor | None) -> Tensor:
    """``out[r] = weights[s] * x[s // k]`` for ``s = row_to_slot[r]``; zero rows where s = -1."""
    return _gather(x, row_to_slot, k, weights, get_num_threads())


@_gather_rows_op.register_fake
def _(x: Tensor, row_to_slot: Tensor, k: int, weights: Tensor | None) -> Tensor:
    return x.new_empty(row_to_slot.shape[0], x.shape[1])


@_eager.custom_op("slot_dots", device_types="cpu")
def _slot_dots_op(grad_y: Tensor, y_sorted: Tensor, slot_to_row: Tensor) -> Tensor:
    """``out[t, j] = dot(grad_y[t], y_sorted[slot_to_row[t, j]])``, 0 for empty slots."""
    out = torch.empty(slot_to_row.shape, dtype=accumulator_dtype(y_sorted.dtype))
    _core.slot_dots(
        numpy_view(grad_y.contiguous()),
        numpy_view(y_sorted.contiguous()),
        numpy_view(slot_to_row.contiguous()),
        numpy_view(out),
        get_num_threads(),
    )
    return out


@_slot_dots_op.register_fake
def _(grad_y: Tensor, y_sorted: Tensor, slot_to_row: Tensor) -> Tensor:
    return y_sorted.new_empty(slot_to_row.shape, dtype=accumulator_dtype(y_sorted.dtype))


def _unpermute_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    y_sorted, slot_to_row, row_to_slot, weights = inputs
    ctx.save_for_backward(y_sorted, slot_to_row, row_to_slot, weights)


def _unpermute_backward(ctx: Any, grad_y: Tensor) -> tuple[Any, ...]:
    y_sorted, slot_to_row, row_to_slot, weights = ctx.saved_tensors
    needs_rows, _, _, needs_weights = ctx.needs_input_grad
    k = slot_to_row.shape[1]
    grad_rows = _eager.call("gather_rows", grad_y, row_to_slot, k, weights) if needs_rows else None
    grad_weights = _eager.call("slot_dots", grad_y, y_sorted, slot_to_row) if needs_weights else None
    return grad_rows, None, None, grad_weights


_eager.register_autograd(_unpermute_op, _unpermute_backward, setup_context=_unpermute_setup_context)


# --- public API ----------------------------------------------------------------------------


def _check_experts(experts: object, num_tokens: int | None) -> Tensor:
    experts = check_tensor(experts, "experts", ndim=2, layout="[T, k]", dtypes=INDEX_DTYPES)
    if num_tokens is not None:
        check_same(experts.shape[0], num_tokens, "experts", "T (rows of x)")
    if experts.shape[1] < 1:
        raise ValueError(
            f"experts: expected at least one slot per token (k >= 1), got shape {tuple(experts.shape)}"
        )
    return as_dtype(experts, torch.int64)


DROP_POLICIES = ("position", "probs")


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    k: int,
    capacity_factor: float,
    *,
    min_capacity: int = 0,
    align: int = 1,
) -> int:
    """Rows per expert for ``capacity_factor``: ``ceil(T * k / E * capacity_factor)``, at
    least ``min_capacity``, rounded up to a multiple of ``align``.

    The product is evaluated as Megatron-Core's ``get_capacity`` evaluates it (Python floats,
    ``(T * k / E) * capacity_factor``), so both give the same capacity for the same inputs.
    """
    num_tokens = check_int(num_tokens, "num_tokens", minimum=0)
    num_experts = check_int(num_experts, "num_experts", minimum=1)
    k = check_int(k, "k", minimum=1, maximum=num_experts, maximum_name="num_experts")
    min_capacity = check_int(min_capacity, "min_capacity", minimum=0)
    align = check_int(align, "align", minimum=1)
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"capacity_factor: expected a float, got {type(capacity_factor).__name__}")
    if not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor: expected a finite value > 0, got {capacity_factor}")
    capacity = max(math.ceil((num_tokens * k / num_experts) * capacity_factor), min_capacity)
    return -(-capacity // align) * align


def permute(
    x: Tensor,
    experts: Tensor,
    num_experts: int,
    *,
    num_rows: int | None = None,
    capacity: int | None = None,
    weights: Tensor | None = None,
    drop_policy: str = "position",
    pad_to_capacity: bool = False,
    block_size: int = 1,
) -> tuple[Tensor, PermutePlan]:
    """Gather token rows into expert-major order, dropless or with an expert capacity.

    Args:
        x: ``[T, d]`` hidden states, float32, bfloat16 or float16 (or float64).
        experts: ``[T, k]`` int64 or int32 expert ids in ``[0, num_experts)``; -1 marks an
            empty slot, which gets no row.
        num_experts: E, the number of experts.
        num_rows: the row count of ``x_sorted``. ``None``: exactly the number of rows the
            plan fills (under torch.compile the count is then data-dependent). An int
            ``>=`` that count gives a static shape: rows past ``plan.offsets[E]`` are zero
            padding.
        capacity: ``None`` for dropless dispatch, else the most rows an expert receives
            (see ``expert_capacity``); the other slots are dropped: they get no row, their
            ``slot_to_row`` is -1 and unpermute skips them.
        weights: ``[T, k]`` routing weights, needed by ``drop_policy="probs"``.
        drop_policy: which slots an over-full expert keeps. ``"position"``: its first
            ``capacity`` slots in (token, choice) order. ``"probs"``: the ``capacity`` slots with
            the highest ``weights`` (equal weights keep the lower token). Kept rows stay in
            (token, choice) order either way. Remaining weights are not renormalised (see
            ``unpermute(..., renormalize_after_drop=True)``).
        pad_to_capacity: lay rows out as a static ``[E * capacity, d]`` grid, expert ``e``
            in rows ``e * capacity ..``, unused rows zero: the layout batched expert matmuls
            and CUDA graphs need.
        block_size: start every expert's rows at a multiple of ``block_size`` and pad them
            with zero rows to whole blocks of it: the layout of block-sparse grouped GEMMs,
            which give each block of rows to one expert (vLLM's ``moe_align_block_size``,
            here with the rows in the same deterministic order as without blocks; see
            ``PermutePlan.block_experts``). ``offsets`` then count the padding rows, and the
            plan's rows number up to ``max_permuted_rows(T * k, E, block_size)``, a static
            ``num_rows`` for any routing. With ``pad_to_capacity`` the capacity must be a
            multiple of it (``expert_capacity(..., align=block_size)``). Default 1: none.

    Returns:
        ``(x_sorted, plan)``: ``x_sorted [rows, d]`` in ``x``'s dtype, rows of expert 0 first,
        within an expert in ascending (token, slot) order; ``plan`` a ``PermutePlan``
        (``plan.dropped`` counts the dropped slots per expert). Differentiable with respect
        to ``x``.
    """
    x = check_tensor(x, "x", ndim=2, layout="[T, d]", dtypes=FLOAT_DTYPES)
    experts = _check_experts(experts, x.shape[0])
    num_experts = check_int(num_experts, "num_experts", minimum=1)
    if num_rows is not None:
        num_rows = check_int(num_rows, "num_rows", minimum=0)
    block_size = check_int(block_size, "block_size", minimum=1)
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy: expected one of {DROP_POLICIES}, got {drop_policy!r}")
    drop_weights = None
    if capacity is None:
        if pad_to_capacity:
            raise ValueError("pad_to_capacity: expected a capacity to pad to, got capacity=None")
    else:
        capacity = check_int(capacity, "capacity", minimum=0)
        if pad_to_capacity and num_rows is not None:
            raise ValueError(
                f"num_rows: expected None with pad_to_capacity=True (rows are E * capacity = "
                f"{num_experts * capacity}), got {num_rows}"
            )
        if pad_to_capacity and capacity % block_size != 0:
            raise ValueError(
                f"capacity: expected a multiple of block_size = {block_size} with pad_to_capacity=True "
                f"(expert_capacity(..., align={block_size}) gives one), got {capacity}"
            )
        if drop_policy == "probs":
            if weights is None:
                raise ValueError(
                    'weights: expected the [T, k] routing weights for drop_policy="probs", got None'
                )
            weights = check_tensor(weights, "weights", ndim=2, layout="[T, k]", dtypes=FLOAT_DTYPES)
            if tuple(weights.shape) != tuple(experts.shape):
                raise ValueError(
                    f"weights: expected shape [T, k] = {list(experts.shape)} (the shape of experts), "
                    f"got {list(weights.shape)}"
                )
            drop_weights = as_dtype(weights.detach(), torch.float32)
    x_sorted, tokens_per_expert, offsets, row_to_slot, slot_to_row, dropped = _eager.call(
        "permute", x, experts, num_experts, num_rows, capacity, drop_weights, pad_to_capacity, block_size
    )
    return x_sorted, PermutePlan(tokens_per_expert, offsets, row_to_slot, slot_to_row, dropped)


def moe_align_block_size(
    topk_ids: Tensor, block_size: int, num_experts: int
) -> tuple[Tensor, Tensor, Tensor]:
    """A deterministic drop-in for vLLM's ``moe_align_block_size``: the slots of ``topk_ids``
    sorted by expert, each expert's slots padded to whole blocks of ``block_size``, as
    block-sparse fused MoE kernels (vLLM's and SGLang's Triton ``fused_moe_kernel``) read them.

    Within an expert the slots are in ascending order (token, then choice), on every device
    and every run; vLLM ranks them with atomic increments. It is the plan of
    ``permute(..., block_size=block_size)`` without moving any row, and sync-free on CUDA.

    Args:
        topk_ids: ``[T, k]`` int64 or int32 expert ids in ``[0, num_experts)``; -1 marks an
            empty slot, which is left out.
        block_size: rows per block of the grouped GEMM.
        num_experts: E.

    Returns:
        ``(sorted_token_ids, expert_ids, num_tokens_post_padded)``, int32 as vLLM's:
        ``[max_permuted_rows(T * k, E, block_size)]`` flat slot indices ``t * k + j`` in
        expert-major order, padding marked ``T * k`` (the length of vLLM's
        ``pad_sorted_ids=True``); ``[ceil(len(sorted_token_ids) / block_size)]`` the
        expert of each block, -1 for blocks past the padded rows; ``[1]`` the number of
        padded rows.
    """
    experts = _check_experts(topk_ids, None)
    block_size = check_int(block_size, "block_size", minimum=1)
    num_experts = check_int(num_experts, "num_experts", minimum=1)
    num_slots = experts.numel()
    rows = max_permuted_rows(num_slots, num_experts, block_size)
    # Rows of width 0: the plan alone, no data moved.
    no_rows = torch.empty(experts.shape[0], 0, device=experts.device)
    _, plan = permute(no_rows, experts, num_experts, num_rows=rows, block_size=block_size)
    sorted_token_ids = torch.where(plan.row_to_slot >= 0, plan.row_to_slot, num_slots).to(torch.int32)
    expert_ids = plan.block_experts(block_size).to(torch.int32)
    return sorted_token_ids, expert_ids, plan.offsets[-1:].to(torch.int32)


def renormalize_kept(weights: Tensor, plan: PermutePlan) -> Tensor:
    """``weights`` with dropped and empty slots zeroed and each token's kept weights divided
    by their sum (at least the dtype's eps): the GShard / DeepSpeed convention of
    renormalising after capacity drops. A token that lost every slot gets zeros.
    Differentiable with respect to ``weights``."""
    kept = plan.slot_to_row >= 0
    masked = weights * kept
    total = masked.sum(dim=-1, keepdim=True)
    return masked / total.clamp_min(torch.finfo(total.dtype).eps)


def unpermute(
    y_sorted: Tensor,
    plan: PermutePlan,
    weights: Tensor | None = None,
    *,
    renormalize_after_drop: bool = False,
) -> Tensor:
    """Combine expert-major rows back into token order.

    ``y[t] = sum_j weights[t, j] * y_sorted[plan.slot_to_row[t, j]]`` over the non-empty
    slots of token ``t``, accumulated in float32 in slot order (``((w0*y0) + w1*y1) + ...``)
    and written in ``y_sorted``'s dtype; a token with no slot gets zeros. ``weights=None``
    sums with weight 1. A per-token gather: no atomics, bitwise identical for any thread
    count.

    Args:
        y_sorted: ``[rows, d]`` expert outputs in the row order of ``plan``.
        plan: the ``PermutePlan`` returned by ``permute``.
        weights: ``[T, k]`` float weights (e.g. from ``topk_gating``), or ``None``.
        renormalize_after_drop: divide each token's weights by the sum over its kept slots
            first (``renormalize_kept``), as GShard and DeepSpeed do after capacity drops.
            Default: weights are used as given, dropped slots simply contribute nothing (as
            in Megatron-Core).

    Returns:
        ``y [T, d]`` in ``y_sorted``'s dtype. Differentiable with respect to ``y_sorted``
        and ``weights``.
    """
    y_sorted = check_tensor(y_sorted, "y_sorted", ndim=2, layout="[rows, d]", dtypes=FLOAT_DTYPES)
    if not isinstance(plan, PermutePlan):
        raise TypeError(f"plan: expected the PermutePlan returned by permute, got {type(plan).__name__}")
    slot_to_row = check_tensor(
        plan.slot_to_row, "plan.slot_to_row", ndim=2, layout="[T, k]", dtypes=(torch.int64,)
    )
    row_to_slot = check_tensor(
        plan.row_to_slot, "plan.row_to_slot", ndim=1, layout="[rows]", dtypes=(torch.int64,)
    )
    check_same(
        y_sorted.shape[0], row_to_slot.shape[0], "y_sorted", "rows of the plan (len(plan.row_to_slot))"
    )
    if weights is not None:
        weights = check_tensor(weights, "weights", ndim=2, layout="[T, k]", dtypes=FLOAT_DTYPES)
        if tuple(weights.shape) != tuple(slot_to_row.shape):
            raise ValueError(
                f"weights: expected shape [T, k] = {list(slot_to_row.shape)} (the plan's slots), "
                f"got {list(weights.shape)}"
            )
        weights = as_dtype(weights, accumulator_dtype(y_sorted.dtype))
        if renormalize_after_drop:
            weights = renormalize_kept(weights, plan)
    elif renormalize_after_drop:
        raise ValueError("renormalize_after_drop: expected weights to renormalise, got weights=None")
    y: Tensor = _eager.call("unpermute", y_sorted, slot_to_row, row_to_slot, weights)
    return y
