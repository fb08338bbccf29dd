"""Token selection for conditional computation: Mixture-of-Depths and token pruning.

A router scores every position; ``select_tokens`` keeps the best ``C`` positions of each
sequence (or, while decoding, those above a threshold); ``gather_tokens`` compacts them
into ``[B, C, d]`` for the block; ``scatter_tokens`` puts the block's output back into the
full sequence, optionally as the gated residual update through which the router learns.

Layout of ``indices`` ``[B, C]``: per sequence the kept positions in ascending order (so
causal attention over the kept subset stays causal), then -1 where a sequence keeps fewer
than ``C``. The kernels (rust/core/src/tokens.rs) accept any ``indices`` whose
non-negative entries are distinct within their sequence; -1 entries are skipped.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sparseroute import _core, _memory
from sparseroute._threads import get_num_threads
from sparseroute.ops import _eager
from sparseroute.ops._bridge import accumulator_dtype, as_dtype, numpy_view
from sparseroute.ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor

FRACTION_ROUNDING_SLACK = 1e-9
"""Products ``fraction * length`` within this relative distance of an integer count as it."""

# --- sparseroute::select_tokens ------------------------------------------------------------


@_eager.custom_op("select_tokens", device_types="cpu")
def _select_tokens_op(
    scores: Tensor, capacity: int, rule: str, value: float, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    batch, seq_len = scores.shape
    indices = torch.empty(batch, capacity, dtype=torch.int64)
    mask = torch.empty(batch, seq_len, dtype=torch.bool)
    _core.select_tokens(
        numpy_view(scores.contiguous()),
        None if lengths is None else numpy_view(lengths.contiguous()),
        rule,
        value,
        numpy_view(indices),
        numpy_view(mask.view(torch.uint8)),
        get_num_threads(),
    )
    return indices, mask


@_select_tokens_op.register_fake
def _(
    scores: Tensor, capacity: int, rule: str, value: float, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    batch, seq_len = scores.shape
    return (
        scores.new_empty(batch, capacity, dtype=torch.int64),
        scores.new_empty(batch, seq_len, dtype=torch.bool),
    )


# --- sparseroute::gather_tokens ------------------------------------------------------------


@_eager.custom_op("gather_tokens", device_types="cpu")
def _gather_tokens_op(x: Tensor, indices: Tensor, scale: Tensor | None) -> Tensor:
    """``[B, C, d]``: the rows of ``x`` at ``indices`` (times ``scale[b, p]`` when given,
    computed in the accumulator dtype), zeros for -1 entries."""
    batch, capacity = indices.shape
    out = _memory.empty((batch, capacity, x.shape[2]), x.dtype)
    _core.gather_tokens(
        numpy_view(x.contiguous()),
        numpy_view(indices.contiguous()),
        None if scale is None else numpy_view(as_dtype(scale, accumulator_dtype(x.dtype)).contiguous()),
        numpy_view(out),
        get_num_threads(),
    )
    return out


@_gather_tokens_op.register_fake
def _(x: Tensor, indices: Tensor, scale: Tensor | None) -> Tensor:
    return x.new_empty(indices.shape[0], indices.shape[1], x.shape[2])


def _gather_tokens_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, indices, scale = inputs
    ctx.save_for_backward(indices, scale)
    ctx.seq_len = x.shape[1]


def _gather_tokens_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    indices, scale = ctx.saved_tensors
    handed = _take_handed_gradient(ctx)
    if handed is None:
        # The gradient of a gather of distinct rows is a scatter into zeros.
        grad_x = _eager.call("scatter_tokens", None, grad, indices, scale, ctx.seq_len)
    else:
        # The scatter's gradient for x, completed with this gather's rows in one pass.
        residual, replaced = handed
        if replaced:
            # Its kept rows were zeroed (the scatter overwrote them): the rows replace them.
            grad_x = _eager.call("scatter_tokens", residual, grad, indices, None, ctx.seq_len)
        else:
            ones = torch.ones(
                indices.shape[0], ctx.seq_len, dtype=accumulator_dtype(grad.dtype), device=grad.device
            )
            grad_x = _eager.call("scatter_tokens", residual, grad, indices, ones, ctx.seq_len)
    return grad_x, None, None


_eager.register_autograd(
    _gather_tokens_op, _gather_tokens_backward, setup_context=_gather_tokens_setup_context
)


# --- sparseroute::scatter_tokens -----------------------------------------------------------


@_eager.custom_op("scatter_tokens", device_types="cpu")
def _scatter_tokens_op(
    x: Tensor | None, y: Tensor | None, indices: Tensor, gate: Tensor | None, seq_len: int
) -> Tensor:
    """``[B, S, d]``: ``x`` (zeros when None) where no entry keeps a position; at kept
    positions the entry's row of ``y`` (zeros when None), or ``x + gate * y`` with a gate."""
    reference = x if x is not None else y
    assert reference is not None, "scatter_tokens needs x or y"
    dtype = reference.dtype
    out = _memory.empty((indices.shape[0], seq_len, reference.shape[2]), dtype)
    _core.scatter_tokens(
        None if x is None else numpy_view(x.contiguous()),
        None if y is None else numpy_view(y.contiguous()),
        numpy_view(indices.contiguous()),
        None if gate is None else numpy_view(as_dtype(gate, accumulator_dtype(dtype)).contiguous()),
        numpy_view(out),
        get_num_threads(),
    )
    return out


@_scatter_tokens_op.register_fake
def _(x: Tensor | None, y: Tensor | None, indices: Tensor, gate: Tensor | None, seq_len: int) -> Tensor:
    reference = x if x is not None else y
    assert reference is not None, "scatter_tokens needs x or y"
    return reference.new_empty(indices.shape[0], seq_len, reference.shape[2])


def _scatter_tokens_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, y, indices, gate, seq_len = inputs
    ctx.save_for_backward(y if gate is not None else None, indices, gate)
    ctx.has_x, ctx.has_y, ctx.seq_len = x is not None, y is not None, seq_len
    ctx.gate_dtype = None if gate is None else gate.dtype


def _scatter_tokens_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    y, indices, gate = ctx.saved_tensors
    grad_x = grad_y = grad_gate = None
    if ctx.has_x and ctx.needs_input_grad[0] and not _hand_gradient_to_gather(ctx, grad, gate is None):
        # A gated update passes x through unchanged; a replacement overwrote the kept rows.
        if gate is not None:
            grad_x = grad
        else:
            grad_x = _eager.call("scatter_tokens", grad, None, indices, None, ctx.seq_len)
    if ctx.has_y and ctx.needs_input_grad[1]:
        grad_y = _eager.call("gather_tokens", grad, indices, gate)
    if gate is not None and ctx.needs_input_grad[3]:
        grad_gate = _eager.call("token_dots", grad, y, indices).to(ctx.gate_dtype)
    return grad_x, grad_y, None, grad_gate, None


_eager.register_autograd(
    _scatter_tokens_op, _scatter_tokens_backward, setup_context=_scatter_tokens_setup_context
)


@_eager.custom_op("token_dots", device_types="cpu")
def _token_dots_op(grad: Tensor, y: Tensor, indices: Tensor) -> Tensor:
    """``[B, S]`` (accumulator dtype): ``dot(grad[b, p], y[b, c])`` at the kept positions
    ``p = indices[b, c]``, 0 elsewhere: the gate's gradient of a gated scatter."""
    out = torch.empty(grad.shape[0], grad.shape[1], dtype=accumulator_dtype(grad.dtype))
    _core.token_dots(
        numpy_view(grad.contiguous()),
        numpy_view(y.contiguous()),
        numpy_view(indices.contiguous()),
        numpy_view(out),
        get_num_threads(),
    )
    return out


@_token_dots_op.register_fake
def _(grad: Tensor, y: Tensor, indices: Tensor) -> Tensor:
    return grad.new_empty(grad.shape[0], grad.shape[1], dtype=accumulator_dtype(grad.dtype))


# --- one gradient for x instead of two ----------------------------------------------------
#
# In a block ``scatter_tokens(x, f(gather_tokens(x, indices)), indices, gate)``, x has two
# consumers, so autograd adds two full-size gradients: the scatter's (the output's gradient,
# passed through) and the gather's (mostly zeros). That sum, into freshly allocated memory,
# costs more than all of the block's routing kernels together. In eager mode the scatter
# therefore hands its gradient for x to the gather, which returns it completed with its own
# rows in one pass, while the scatter returns None for x. The result is the same sum.
#
# The hand-off happens only when it is provably equivalent: the scatter's x is the very
# tensor (same version) the gather read, with the same indices; the gather lies in the
# history of the scatter's y, so its backward runs after the scatter's; and the engine will
# run the gather's backward in the current backward pass (the gradient is tagged with that
# pass's id). Otherwise, and under torch.compile, both return their own gradients. (When a
# pass only captures the gather's output gradient, the engine reports the gather as run
# but skips it; the handed gradient is then unused, and so is x's: that pass does not
# compute a gradient for x.)

_HISTORY_SEARCH_LIMIT = 4096
"""Autograd nodes searched for the gather in the history of y before giving up."""


def _in_history(start: Any, target: Any) -> bool:
    seen: set[int] = set()
    stack = [start]
    while stack and len(seen) < _HISTORY_SEARCH_LIMIT:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        if node is target:
            return True
        seen.add(id(node))
        stack.extend(edge[0] for edge in node.next_functions)
    return False


def _remember_gather(x: Tensor, indices: Tensor, rows: Tensor) -> None:
    if not torch.compiler.is_compiling() and rows.grad_fn is not None:
        indices._sparseroute_gather = (weakref.ref(x), x._version, weakref.ref(rows.grad_fn))  # type: ignore[attr-defined]


def _link_scatter_to_gather(x: Tensor, y: Tensor, indices: Tensor, out: Tensor) -> None:
    if torch.compiler.is_compiling() or out.grad_fn is None or y.grad_fn is None:
        return
    link = getattr(indices, "_sparseroute_gather", None)
    if link is None:
        return
    x_ref, version, gather_ref = link
    gather = gather_ref()
    if x_ref() is x and x._version == version and gather is not None and _in_history(y.grad_fn, gather):
        out.grad_fn._sparseroute_gather = gather_ref  # type: ignore[attr-defined]


def _hand_gradient_to_gather(ctx: Any, grad: Tensor, replaced: bool) -> bool:
    """Give the scatter's gradient for x to its gather, if it is linked and will run."""
    gather_ref = getattr(ctx, "_sparseroute_gather", None)
    if gather_ref is None or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    gather = gather_ref()
    task = torch._C._current_graph_task_id()
    if gather is None or getattr(gather, "_sparseroute_handed", None) is not None:
        return False
    if not torch._C._will_engine_execute_node(gather):
        return False
    gather._sparseroute_handed = (task, grad, replaced)
    return True


def _take_handed_gradient(ctx: Any) -> tuple[Tensor, bool] | None:
    handed = getattr(ctx, "_sparseroute_handed", None)
    if handed is None:
        return None
    ctx._sparseroute_handed = None
    task, grad, replaced = handed
    # A gradient left by an earlier backward pass that stopped early is not this pass's.
    return (grad, replaced) if task == torch._C._current_graph_task_id() else None


# --- public API ----------------------------------------------------------------------------


class TokenSelection(NamedTuple):
    """The positions a block processes (see ``select_tokens``).

    Attributes:
        indices: ``[B, C]`` int64, per sequence the kept positions in ascending order, then
            -1 where the sequence keeps fewer than ``C``.
        mask: ``[B, S]`` bool, True at kept positions (the target of a Mixture-of-Depths
            auxiliary predictor, and what ``mask.float().mean()`` measures).
    """

    indices: Tensor
    mask: Tensor

    @property
    def counts(self) -> Tensor:
        """``[B]`` int64: positions kept per sequence."""
        return self.mask.sum(dim=1)


def token_capacity(capacity: int | float, seq_len: int) -> int:
    """The index width ``C`` of ``select_tokens(scores, capacity)`` for sequences of
    ``seq_len`` positions: ``capacity`` itself when it is an int (``0 <= capacity <=
    seq_len``), else ``ceil(capacity * seq_len)`` for a fraction in ``(0, 1]``, where a
    product within a relative 1e-9 of an integer counts as that integer (so ``0.1`` of 30
    positions is 3, not 4)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len: expected an int >= 0, got {seq_len!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
        raise TypeError(
            f"capacity: expected an int (tokens per sequence) or a float (fraction of the sequence), "
            f"got {type(capacity).__name__}"
        )
    if isinstance(capacity, int):
        if not 0 <= capacity <= seq_len:
            raise ValueError(
                f"capacity: expected 0 <= capacity <= {seq_len} (the sequence length), got {capacity}"
            )
        return capacity
    if not (math.isfinite(capacity) and 0 < capacity <= 1):
        raise ValueError(f"capacity: expected a fraction in (0, 1], got {capacity}")
    # The formula of the kernel's per-sequence count (rust/core/src/tokens.rs,
    # fraction_count), in Python so that torch.compile can evaluate it while tracing.
    exact = capacity * seq_len
    nearest = round(exact)
    if abs(exact - nearest) <= FRACTION_ROUNDING_SLACK * max(nearest, 1):
        return nearest
    return math.ceil(exact)


def select_tokens(
    scores: Tensor,
    capacity: int | float,
    *,
    lengths: Tensor | None = None,
    threshold: float | None = None,
) -> TokenSelection:
    """The positions of each sequence a conditional block processes.

    Top-C mode (training, prefill): each sequence keeps its ``C`` highest-scoring valid
    positions, ``C = token_capacity(capacity, S)``. An int ``capacity`` keeps
    ``min(C, length)`` positions; a fraction keeps ``ceil(capacity * length)`` of a sequence
    of ``length`` valid positions (at most ``C``), so padding does not earn a sequence extra
    tokens. Equal scores keep the lower position; -0.0 equals 0.0. Scores are compared in
    float32 (float64 for float64 scores), which orders bfloat16 and float16 exactly.

    Threshold mode (decoding, ``threshold`` given): a position is kept when its score is
    greater than ``threshold`` (compared exactly, in float64), and each sequence keeps the
    earliest ``C`` such positions. The decision at a position depends only on its own
    score and the earlier positions, so it is causal: top-C over a sequence is not, while
    sampling token by token.

    Args:
        scores: ``[B, S]`` router scores (logits, or an auxiliary predictor's
            probabilities), float32, bfloat16, float16 or float64. Not differentiable:
            the router learns through ``scatter_tokens(..., gate=...)``.
        capacity: an int number of positions per sequence (``0 <= C <= S``), or a
            fraction of the sequence length in ``(0, 1]``.
        lengths: ``[B]`` int64 or int32, the valid positions of each sequence (``0 <=
            lengths[b] <= S``); positions from ``lengths[b]`` on are padding, never kept,
            and their scores are not read (they may be NaN).
        threshold: switches to threshold mode (a float, not NaN).

    Returns:
        ``TokenSelection(indices [B, C] int64, mask [B, S] bool)``.

    Raises:
        InvalidInputError: a NaN score at a valid position, or ``lengths`` out of range.
    """
    scores = check_tensor(scores, "scores", ndim=2, layout="[B, S]", dtypes=FLOAT_DTYPES)
    batch, seq_len = scores.shape
    width = token_capacity(capacity, seq_len)
    if lengths is not None:
        lengths = check_tensor(lengths, "lengths", ndim=1, layout="[B]", dtypes=INDEX_DTYPES)
        if lengths.shape[0] != batch:
            raise ValueError(
                f"lengths: expected shape [B] = [{batch}] (the rows of scores), got {list(lengths.shape)}"
            )
        lengths = as_dtype(lengths, torch.int64)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold: expected a float (not NaN) or None, got {threshold!r}")
        rule, value = "threshold", float(threshold)
    elif isinstance(capacity, int):
        rule, value = "top", 0.0
    else:
        rule, value = "fraction", float(capacity)
    indices, mask = _eager.call("select_tokens", scores, width, rule, value, lengths)
    return TokenSelection(indices, mask)


def _check_indices(indices: object, batch: int, seq_len: int) -> Tensor:
    indices = check_tensor(indices, "indices", ndim=2, layout="[B, C]", dtypes=INDEX_DTYPES)
    if indices.shape[0] != batch:
        raise ValueError(
            f"indices: expected [B, C] with B = {batch} (the batch of x), got {tuple(indices.shape)}"
        )
    if indices.shape[1] > seq_len:
        raise ValueError(
            f"indices: expected at most S = {seq_len} entries per sequence (distinct positions), "
            f"got shape {tuple(indices.shape)}"
        )
    return as_dtype(indices, torch.int64)


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """The kept rows of each sequence: ``out[b, c] = x[b, indices[b, c]]``, zeros for -1
    entries. Differentiable in ``x`` (the gradient scatters back into zeros).

    Args:
        x: ``[B, S, d]`` hidden states, float32, bfloat16, float16 or float64.
        indices: ``[B, C]`` int64 or int32 positions in ``[-1, S)``, distinct within each
            sequence apart from -1 (``select_tokens`` produces them).

    Returns:
        ``[B, C, d]`` in the dtype of ``x``.

    Raises:
        InvalidInputError: an index out of range, or a position twice in one sequence.
    """
    x = check_tensor(x, "x", ndim=3, layout="[B, S, d]", dtypes=FLOAT_DTYPES)
    original_indices = indices
    indices = _check_indices(indices, x.shape[0], x.shape[1])
    rows: Tensor = _eager.call("gather_tokens", x, indices, None)
    _remember_gather(x, original_indices, rows)
    return rows


def scatter_tokens(x: Tensor, y: Tensor, indices: Tensor, gate: Tensor | None = None) -> Tensor:
    """The full sequence after a block processed its kept positions.

    Without ``gate``, the kept rows are replaced: ``out[b, p] = y[b, c]`` for ``p =
    indices[b, c]``. With ``gate``, they are updated, the Mixture-of-Depths residual:
    ``out[b, p] = x[b, p] + gate[b, p] * y[b, c]``, computed in float32 (float64 for
    float64) and rounded once. Every other row is ``x[b, p]``. A new tensor; ``x`` is not
    modified.

    Gradients: ``x`` receives the output's gradient (with the kept rows zeroed when they
    were replaced), ``y`` the output's gradient at its positions (times the gate), and
    ``gate[b, p]`` the dot product of the output's gradient with ``y[b, c]`` at kept
    positions (0 elsewhere): the path through which the router learns.

    Args:
        x: ``[B, S, d]`` the block's input (the residual stream).
        y: ``[B, C, d]`` the block's output at the kept positions, dtype of ``x``.
        indices: ``[B, C]`` as for ``gather_tokens``; rows of ``y`` at -1 entries are
            ignored.
        gate: ``[B, S]`` router weights per position (any float dtype), for example the
            router's scores; only the kept positions are read.

    Returns:
        ``[B, S, d]`` in the dtype of ``x``.
    """
    x = check_tensor(x, "x", ndim=3, layout="[B, S, d]", dtypes=FLOAT_DTYPES)
    batch, seq_len, width = x.shape
    checked_indices = _check_indices(indices, batch, seq_len)
    index_width = checked_indices.shape[1]
    y = check_tensor(y, "y", ndim=3, layout="[B, C, d]", dtypes=FLOAT_DTYPES)
    expected = (batch, index_width, width)
    if tuple(y.shape) != expected:
        raise ValueError(
            f"y: expected shape [B, C, d] = {list(expected)} (batch and width of x, C of indices), "
            f"got {list(y.shape)}"
        )
    if y.dtype != x.dtype:
        raise TypeError(f"y: expected the dtype of x ({x.dtype}), got {y.dtype}")
    if gate is not None:
        gate = check_tensor(gate, "gate", ndim=2, layout="[B, S]", dtypes=FLOAT_DTYPES)
        if tuple(gate.shape) != (batch, seq_len):
            raise ValueError(
                f"gate: expected shape [B, S] = {[batch, seq_len]} (the positions of x), "
                f"got {list(gate.shape)}"
            )
    out: Tensor = _eager.call("scatter_tokens", x, y, checked_indices, gate, seq_len)
    _link_scatter_to_gather(x, y, indices, out)
    return out
