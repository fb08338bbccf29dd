"""Dropless token dispatch: permute tokens into expert-major rows, unpermute them back.

Layout of a plan (see ``PermutePlan``): a *slot* is one (token, choice) pair with flat index
``s = t * k + j``; a *row* is one row of the permuted tensor. Rows are ordered by expert,
then by ascending slot index (token, then choice): a stable counting sort, identical for
any thread count.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from sparseroute import _core, _memory
from sparseroute._threads import get_num_threads
from sparseroute.ops._bridge import accumulator_dtype, numpy_view
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
        slot_to_row: ``[T, k]`` int64, the row of each slot; -1 for an empty slot.
    """

    tokens_per_expert: Tensor
    offsets: Tensor
    row_to_slot: Tensor
    slot_to_row: Tensor


def _gather(x: Tensor, row_to_slot: Tensor, k: int, weights: Tensor | None, threads: int) -> Tensor:
    """The rows of ``x`` in plan order (the kernel behind permute and unpermute's gradient)."""
    out = _memory.empty((row_to_slot.shape[0], x.shape[1]), x.dtype)
    _core.gather_rows(
        numpy_view(x.contiguous()),
        numpy_view(row_to_slot.contiguous()),
        k,
        None if weights is None else numpy_view(weights.contiguous()),
        numpy_view(out),
        threads,
    )
    return out


# --- sparseroute::permute ------------------------------------------------------------------


@torch.library.custom_op("sparseroute::permute", mutates_args=(), device_types="cpu")
def _permute_op(
    x: Tensor, experts: Tensor, num_experts: int, num_rows: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_tokens, k = experts.shape
    capacity = num_tokens * k if num_rows is None else num_rows
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int64)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64)
    row_to_slot = torch.empty(capacity, dtype=torch.int64)
    slot_to_row = torch.empty(num_tokens, k, dtype=torch.int64)
    threads = get_num_threads()
    routed = _core.build_plan(
        numpy_view(experts.contiguous()),
        num_experts,
        numpy_view(tokens_per_expert),
        numpy_view(offsets),
        numpy_view(row_to_slot),
        numpy_view(slot_to_row),
        threads,
    )
    if num_rows is None and routed < capacity:
        row_to_slot = row_to_slot[:routed].clone()
    x_sorted = _gather(x, row_to_slot, k, None, threads)
    return x_sorted, tokens_per_expert, offsets, row_to_slot, slot_to_row


@_permute_op.register_fake
def _(
    x: Tensor, experts: Tensor, num_experts: int, num_rows: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_tokens, k = experts.shape
    rows = num_rows if num_rows is not None else torch.library.get_ctx().new_dynamic_size()
    return (
        x.new_empty(rows, x.shape[1]),
        experts.new_empty(num_experts, dtype=torch.int64),
        experts.new_empty(num_experts + 1, dtype=torch.int64),
        experts.new_empty(rows, dtype=torch.int64),
        experts.new_empty(num_tokens, k, dtype=torch.int64),
    )


def _permute_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    _x_sorted, _tpe, _offsets, row_to_slot, slot_to_row = output
    ctx.save_for_backward(row_to_slot, slot_to_row)


def _permute_backward(ctx: Any, grad_x_sorted: Tensor, *_grads: Tensor) -> tuple[Any, ...]:
    row_to_slot, slot_to_row = ctx.saved_tensors
    # The gradient of a gather is the sum of each token's rows: an unweighted unpermute.
    grad_x = torch.ops.sparseroute.unpermute(grad_x_sorted, slot_to_row, row_to_slot, None)
    return grad_x, None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup_context)


# --- sparseroute::unpermute and its gradient pieces ----------------------------------------


@torch.library.custom_op("sparseroute::unpermute", mutates_args=(), device_types="cpu")
def _unpermute_op(
    y_sorted: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, weights: Tensor | None
) -> Tensor:
    num_tokens = slot_to_row.shape[0]
    y = _memory.empty((num_tokens, y_sorted.shape[1]), y_sorted.dtype)
    _core.combine_rows(
        numpy_view(y_sorted.contiguous()),
        numpy_view(slot_to_row.contiguous()),
        None if weights is None else numpy_view(weights.contiguous()),
        numpy_view(y),
        get_num_threads(),
    )
    return y


@_unpermute_op.register_fake
def _(y_sorted: Tensor, slot_to_row: Tensor, row_to_slot: Tensor, weights: Tensor | None) -> Tensor:
    return y_sorted.new_empty(slot_to_row.shape[0], y_sorted.shape[1])


@torch.library.custom_op("sparseroute::gather_rows", mutates_args=(), device_types="cpu")
def _gather_rows_op(x: Tensor, row_to_slot: Tensor, k: int, weights: Tensor | None) -> Tensor:
    """``out[r] = weights[s] * x[s // k]`` for ``s = row_to_slot[r]``; zero rows where s = -1."""
    return _gather(x, row_to_slot, k, weights, get_num_threads())


@_gather_rows_op.register_fake
def _(x: Tensor, row_to_slot: Tensor, k: int, weights: Tensor | None) -> Tensor:
    return x.new_empty(row_to_slot.shape[0], x.shape[1])


@torch.library.custom_op("sparseroute::slot_dots", mutates_args=(), device_types="cpu")
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
    grad_rows = torch.ops.sparseroute.gather_rows(grad_y, row_to_slot, k, weights) if needs_rows else None
    grad_weights = torch.ops.sparseroute.slot_dots(grad_y, y_sorted, slot_to_row) if needs_weights else None
    return grad_rows, None, None, grad_weights


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup_context)


# --- public API ----------------------------------------------------------------------------


def _check_experts(experts: object, num_tokens: int | None) -> Tensor:
    experts = check_tensor(experts, "experts", ndim=2, layout="[T, k]", dtypes=INDEX_DTYPES)
    if num_tokens is not None:
        check_same(experts.shape[0], num_tokens, "experts", "T (rows of x)")
    if experts.shape[1] < 1:
        raise ValueError(
            f"experts: expected at least one slot per token (k >= 1), got shape {tuple(experts.shape)}"
        )
    return experts.to(torch.int64)


def permute(
    x: Tensor, experts: Tensor, num_experts: int, *, num_rows: int | None = None
) -> tuple[Tensor, PermutePlan]:
    """Gather token rows into expert-major order (dropless).

    Args:
        x: ``[T, d]`` hidden states, float32, bfloat16 or float16 (or float64).
        experts: ``[T, k]`` int64 or int32 expert ids in ``[0, num_experts)``; -1 marks an
            empty slot, which gets no row.
        num_experts: E, the number of experts.
        num_rows: the row count of ``x_sorted``. ``None``: exactly the number of non-empty
            slots (``T * k`` when there is no -1; under torch.compile the count is then
            data-dependent). An int ``>= `` that count gives a static shape: rows past
            ``plan.offsets[E]`` are zero padding.

    Returns:
        ``(x_sorted, plan)``: ``x_sorted [rows, d]`` in ``x``'s dtype, rows of expert 0 first,
        within an expert in ascending (token, slot) order; ``plan`` a ``PermutePlan``.
        Differentiable with respect to ``x``.
    """
    x = check_tensor(x, "x", ndim=2, layout="[T, d]", dtypes=FLOAT_DTYPES)
    experts = _check_experts(experts, x.shape[0])
    num_experts = check_int(num_experts, "num_experts", minimum=1)
    if num_rows is not None:
        num_rows = check_int(num_rows, "num_rows", minimum=0)
    x_sorted, tokens_per_expert, offsets, row_to_slot, slot_to_row = torch.ops.sparseroute.permute(
        x, experts, num_experts, num_rows
    )
    return x_sorted, PermutePlan(tokens_per_expert, offsets, row_to_slot, slot_to_row)


def unpermute(y_sorted: Tensor, plan: PermutePlan, weights: Tensor | None = None) -> Tensor:
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
        weights = weights.to(accumulator_dtype(y_sorted.dtype))
    y: Tensor = torch.ops.sparseroute.unpermute(y_sorted, slot_to_row, row_to_slot, weights)
    return y
