"""Grouped expert compute: every expert's linear layer (and MLP) on its own slice of rows.

After ``permute``, the rows of expert ``e`` are the contiguous slice
``offsets[e]:offsets[e + 1]`` of ``x_sorted``. A grouped linear layer multiplies each slice
by its expert's weight matrix: one matmul per non-empty expert, written straight into its
slice of one output (no masks, no gathers, no per-expert ``index_add_``); on CUDA in bfloat16,
one grouped GEMM for all experts (``uses_grouped_mm``). On CPU, a loop of
BLAS matmuls over contiguous slices is the fastest exact path: measured against
``torch.nn.functional.grouped_mm`` in torch 2.15 (fp32, 2 cores), the loop is as fast for
many small experts and 1.8x faster for a few large ones.

Weight layouts are those of transformers 5's experts classes:

* ``transposed=False`` (the default, Mixtral, Qwen, OLMoE, DeepSeek): ``weight [E, N, K]``,
  ``y = x @ weight[e].T``, as ``torch.nn.Linear`` stores it.
* ``transposed=True`` (GPT-OSS): ``weight [E, K, N]``, ``y = x @ weight[e]``.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute import _memory
from sparseroute._core import InvalidInputError
from sparseroute.ops import _eager
from sparseroute.ops._bridge import as_dtype
from sparseroute.ops._checks import FLOAT_DTYPES, check_tensor

#: Activations ``grouped_mlp`` accepts by name (the names transformers' configs use).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

GATE_LAYOUTS = ("concatenated", "interleaved")

#: The ops of this module run the same torch code on CPU and CUDA tensors (on CUDA: cuBLAS
#: matmuls; reading the offsets for the per-expert slices is one host synchronisation).
BOTH_DEVICES = ("cpu", "cuda")


def _expert_bounds(offsets: Tensor, num_rows: int) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty expert slice.

    The values are checked here, inside the op, rather than in the Python wrapper: reading
    them there would be a data-dependent branch under torch.compile. A malformed offsets
    tensor must not become an out-of-bounds or overlapping slice.
    """
    bounds = offsets.tolist()
    if bounds[0] != 0 or any(b < a for a, b in itertools.pairwise(bounds)) or bounds[-1] > num_rows:
        raise InvalidInputError(
            f"offsets: expected non-decreasing values from 0 to at most the {num_rows} rows of "
            f"x_sorted (the plan.offsets of permute), got {bounds}"
        )
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _expert_matrix(weight: Tensor, expert: int, transposed: bool) -> Tensor:
    """The ``[K, N]`` matrix that right-multiplies the rows of ``expert``."""
    return weight[expert] if transposed else weight[expert].T


# --- grouped GEMM on CUDA ---------------------------------------------------------------------
# On CUDA, bfloat16 layers run torch's grouped GEMM (torch.nn.functional.grouped_mm): one kernel
# for every expert, and no host synchronisation (the loop must read the offsets back). Its
# results agree with the loop's cuBLAS matmuls within bfloat16 rounding (both accumulate in
# float32). SPARSEROUTE_GROUPED_MM=0 turns it off.


def uses_grouped_mm(x: Tensor, weight: Tensor) -> bool:
    """Whether ``grouped_linear`` on these tensors runs torch's grouped GEMM: CUDA (compute
    capability 8.0+), bfloat16, every matrix dimension a multiple of 8 (16-byte rows), fewer
    than 2^31 rows (the group ends it takes are int32; more rows take the loop)."""
    return (
        x.device.type == "cuda"
        and x.dtype == weight.dtype == torch.bfloat16
        and hasattr(F, "grouped_mm")
        and os.environ.get("SPARSEROUTE_GROUPED_MM", "1") != "0"
        and 0 < x.shape[0] < 2**31
        and x.shape[1] % 8 == 0
        and weight.shape[1] % 8 == 0
        and weight.shape[2] % 8 == 0
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


class _GroupLayout(NamedTuple):
    """What grouped_mm needs of one plan's offsets, for ``num_rows`` rows."""

    #: ``offsets[1:]`` as int32 group ends, non-decreasing and within the rows.
    ends: Tensor
    #: ``[rows, 1]``: the rows past the last group (padding), whose outputs must be zeros.
    padding: Tensor
    #: ``[E, 1, 1]``: the experts with no rows, whose weight gradients must be zeros.
    empty: Tensor


# The layouts of live offsets tensors, by id: an MoE layer's offsets serve two or three
# grouped_linear calls forward and as many backward, and each layout is a handful of small
# torch ops (a few microseconds of host time each on a GPU). An entry goes when its offsets
# tensor is freed, and is rebuilt when the tensor was modified in place (its version moved).
_LAYOUTS: dict[int, tuple[int, int, _GroupLayout]] = {}


def _forget_layout(key: int) -> None:
    _LAYOUTS.pop(key, None)


def _group_layout(offsets: Tensor, num_rows: int) -> _GroupLayout:
    build = _group_layout_cuda if offsets.is_cuda else _group_layout_torch
    if offsets.is_cuda and torch.cuda.is_current_stream_capturing():
        # A CUDA graph must compute the layout itself: replays may see other offsets (a
        # static input refilled between replays) without any Python running.
        return build(offsets, num_rows)
    key = id(offsets)
    cached = _LAYOUTS.get(key)
    if cached is not None and cached[0] == offsets._version and cached[1] == num_rows:
        return cached[2]
    layout = build(offsets, num_rows)
    if cached is None:
        weakref.finalize(offsets, _forget_layout, key)
    _LAYOUTS[key] = (offsets._version, num_rows, layout)
    return layout


def _group_layout_cuda(offsets: Tensor, num_rows: int) -> _GroupLayout:
    from sparseroute import _cuda_ops

    return _GroupLayout(*_cuda_ops.group_layout_cuda(offsets, num_rows))


def _group_layout_torch(offsets: Tensor, num_rows: int) -> _GroupLayout:
    """The layout in torch code (for CPU tensors; on CUDA, _cuda_ops.group_layout_cuda computes
    the same in two launches). Malformed offsets (not starting at 0, decreasing, or past the
    rows) could make a group read outside x: the ends are clamped and made non-decreasing."""
    ends = torch.cummax(offsets[1:].clamp(0, num_rows), dim=0).values.to(torch.int32)
    row_ids = torch.arange(num_rows, device=offsets.device, dtype=torch.int32)
    return _GroupLayout(
        ends=ends,
        padding=(row_ids >= ends[-1]).unsqueeze(1),
        empty=(torch.diff(ends, prepend=ends.new_zeros(1)) == 0).view(-1, 1, 1),
    )


def _grouped_linear_grouped_mm(
    x: Tensor, weight: Tensor, offsets: Tensor, bias: Tensor | None, transposed: bool
) -> Tensor:
    layout = _group_layout(offsets, x.shape[0])
    y = F.grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offs=layout.ends)
    if bias is not None:
        row_ids = torch.arange(x.shape[0], device=x.device, dtype=torch.int32)
        row_experts = torch.searchsorted(layout.ends, row_ids, right=True).clamp(max=weight.shape[0] - 1)
        y.add_(bias.index_select(0, row_experts))
    # Rows past the last expert (padding) are zeros, as in the loop.
    return y.masked_fill_(layout.padding, 0)


def _grouped_linear_backward_grouped_mm(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    transposed: bool,
    needs_x: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    layout = _group_layout(offsets, x.shape[0])
    ends = layout.ends
    grad_x, grad_weight, grad_bias = x.new_empty(0), weight.new_empty(0), grad_y.new_empty(0)
    if needs_x:
        # y = x @ M_e gives dx = dy @ M_e.T; M_e.T is weight[e].T (transposed) or weight[e].
        matrix_t = weight.transpose(-2, -1) if transposed else weight
        grad_x = F.grouped_mm(grad_y, matrix_t, offs=ends).masked_fill_(layout.padding, 0)
    if needs_weight:
        # A grouped product over the rows, written straight in the weight's layout:
        # transposed (y = x @ W_e) gives dW_e = x_e.T @ dy_e, [E, K, N]; else (y = x @ W_e.T)
        # dW_e = dy_e.T @ x_e, [E, N, K]. Experts without rows get zeros, whatever the kernel
        # leaves there.
        grad_weight = (
            F.grouped_mm(x.t(), grad_y, offs=ends) if transposed else F.grouped_mm(grad_y.t(), x, offs=ends)
        )
        grad_weight.masked_fill_(layout.empty, 0)
    if needs_bias:
        # Per-expert column sums of dy, as the same grouped product with rows of ones.
        ones = grad_y.new_ones(x.shape[0], 8)
        grad_bias = F.grouped_mm(ones.t(), grad_y, offs=ends).masked_fill_(layout.empty, 0)[:, 0]
    return grad_x, grad_weight, grad_bias


# --- sparseroute::grouped_linear -----------------------------------------------------------


@_eager.custom_op("grouped_linear", device_types=BOTH_DEVICES)
def _grouped_linear_op(
    x: Tensor, weight: Tensor, offsets: Tensor, bias: Tensor | None, transposed: bool
) -> Tensor:
    x = x.contiguous()
    if uses_grouped_mm(x, weight):
        return _grouped_linear_grouped_mm(x, weight.contiguous(), offsets, bias, transposed)
    out_features = weight.shape[2] if transposed else weight.shape[1]
    y = _memory.empty((x.shape[0], out_features), x.dtype, x.device)
    bounds = _expert_bounds(offsets, x.shape[0])
    y[bounds[-1][2] if bounds else 0 :].zero_()
    for e, start, end in bounds:
        matrix = _expert_matrix(weight, e, transposed)
        if bias is None:
            torch.mm(x[start:end], matrix, out=y[start:end])
        else:
            torch.addmm(bias[e], x[start:end], matrix, out=y[start:end])
    return y


@_grouped_linear_op.register_fake
def _(x: Tensor, weight: Tensor, offsets: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[2] if transposed else weight.shape[1])


@_eager.custom_op("grouped_linear_backward", device_types=BOTH_DEVICES)
def _grouped_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    transposed: bool,
    needs_x: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of grouped_linear; an input whose ``needs_*`` is False gets an empty tensor."""
    grad_y = grad_y.contiguous()
    x = x.contiguous()
    if uses_grouped_mm(x, weight):
        return _grouped_linear_backward_grouped_mm(
            grad_y, x, weight.contiguous(), offsets, transposed, needs_x, needs_weight, needs_bias
        )
    num_experts = weight.shape[0]
    out_features = grad_y.shape[1]
    grad_x = _memory.empty(tuple(x.shape), x.dtype, x.device) if needs_x else x.new_empty(0)
    # Every expert with rows writes its whole gradient block; only empty experts need zeros
    # (zero-filling the full tensor first costs as much as a tenth of the backward).
    grad_weight = weight.new_empty(0)
    if needs_weight:
        grad_weight = _memory.empty(tuple(weight.shape), weight.dtype, weight.device)
    grad_bias = grad_y.new_zeros(num_experts, out_features) if needs_bias else grad_y.new_empty(0)
    bounds = _expert_bounds(offsets, x.shape[0])
    if needs_x:
        grad_x[bounds[-1][2] if bounds else 0 :].zero_()
    if needs_weight:
        routed = {e for e, _, _ in bounds}
        for e in range(num_experts):
            if e not in routed:
                grad_weight[e].zero_()
    for e, start, end in bounds:
        g = grad_y[start:end]
        rows = x[start:end]
        if needs_x:
            torch.mm(g, _expert_matrix(weight, e, transposed).T, out=grad_x[start:end])
        if needs_weight:
            # d/dW of rows @ W.T is g.T @ rows; of rows @ W it is rows.T @ g.
            if transposed:
                torch.mm(rows.T, g, out=grad_weight[e])
            else:
                torch.mm(g.T, rows, out=grad_weight[e])
        if needs_bias:
            torch.sum(g, dim=0, out=grad_bias[e])
    return grad_x, grad_weight, grad_bias


@_grouped_linear_backward_op.register_fake
def _(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    transposed: bool,
    needs_x: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        x.new_empty(x.shape) if needs_x else x.new_empty(0),
        weight.new_empty(weight.shape) if needs_weight else weight.new_empty(0),
        grad_y.new_empty(weight.shape[0], grad_y.shape[1]) if needs_bias else grad_y.new_empty(0),
    )


def _grouped_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, offsets, bias, transposed = inputs
    ctx.save_for_backward(x, weight, offsets)
    ctx.transposed = transposed
    ctx.has_bias = bias is not None


def _grouped_linear_backward(ctx: Any, grad_y: Tensor) -> tuple[Any, ...]:
    x, weight, offsets = ctx.saved_tensors
    needs_x, needs_weight, _, needs_bias, _ = ctx.needs_input_grad
    needs_bias = needs_bias and ctx.has_bias
    grad_x, grad_weight, grad_bias = _eager.call(
        "grouped_linear_backward",
        grad_y,
        x,
        weight,
        offsets,
        ctx.transposed,
        needs_x,
        needs_weight,
        needs_bias,
    )
    return (
        grad_x if needs_x else None,
        grad_weight if needs_weight else None,
        None,
        grad_bias if needs_bias else None,
        None,
    )


_eager.register_autograd(
    _grouped_linear_op, _grouped_linear_backward, setup_context=_grouped_linear_setup_context
)


# --- public API ----------------------------------------------------------------------------


def _check_offsets(offsets: object, num_experts: int) -> Tensor:
    offsets = check_tensor(offsets, "offsets", ndim=1, layout="[E + 1]", dtypes=(torch.int64, torch.int32))
    if offsets.shape[0] != num_experts + 1:
        raise ValueError(
            f"offsets: expected E + 1 = {num_experts + 1} entries (E from the weight's first "
            f"dimension), got {offsets.shape[0]}"
        )
    return as_dtype(offsets, torch.int64)


def grouped_linear(
    x_sorted: Tensor,
    offsets: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    transposed: bool = False,
) -> Tensor:
    """Each expert's linear layer applied to its slice of expert-major rows.

    Args:
        x_sorted: ``[rows, K]`` rows in expert-major order (``permute``'s output).
        offsets: ``[E + 1]`` int64 slice bounds (``plan.offsets``): expert ``e`` owns rows
            ``offsets[e]:offsets[e + 1]``. Rows past ``offsets[E]`` (padding) give zeros.
        weight: ``[E, N, K]`` (``transposed=False``, ``y = x @ weight[e].T``) or
            ``[E, K, N]`` (``transposed=True``, ``y = x @ weight[e]``), in ``x_sorted``'s dtype.
        bias: optional ``[E, N]``, added to every row of expert ``e``.

    Returns:
        ``[rows, N]`` in ``x_sorted``'s dtype. Differentiable with respect to ``x_sorted``,
        ``weight`` and ``bias``.
    """
    x_sorted = check_tensor(x_sorted, "x_sorted", ndim=2, layout="[rows, K]", dtypes=FLOAT_DTYPES)
    layout = "[E, K, N]" if transposed else "[E, N, K]"
    weight = check_tensor(weight, "weight", ndim=3, layout=layout, dtypes=(x_sorted.dtype,))
    in_features = weight.shape[1] if transposed else weight.shape[2]
    out_features = weight.shape[2] if transposed else weight.shape[1]
    if in_features != x_sorted.shape[1]:
        raise ValueError(
            f"weight: expected {layout} with K = {x_sorted.shape[1]} (the columns of x_sorted), "
            f"got shape {tuple(weight.shape)}"
        )
    offsets = _check_offsets(offsets, weight.shape[0])
    if bias is not None:
        bias = check_tensor(bias, "bias", ndim=2, layout="[E, N]", dtypes=(x_sorted.dtype,))
        if tuple(bias.shape) != (weight.shape[0], out_features):
            raise ValueError(
                f"bias: expected shape [E, N] = {[weight.shape[0], out_features]}, got {list(bias.shape)}"
            )
    y: Tensor = _eager.call("grouped_linear", x_sorted, weight, offsets, bias, transposed)
    return y


def _split(h: Tensor, gate_layout: str) -> tuple[Tensor, Tensor]:
    """Views of the gate and up halves of ``h [rows, 2F]``."""
    if gate_layout == "interleaved":
        return h[:, 0::2], h[:, 1::2]
    half = h.shape[1] // 2
    return h[:, :half], h[:, half:]


# --- sparseroute::silu_gate ----------------------------------------------------------------
# silu(gate) * up as one op whose backward writes both halves of the gradient straight into
# one [rows, 2F] tensor: autograd through chunk would compute the halves apart and then
# concatenate them (a full extra copy of the largest activation).


@_eager.custom_op("silu_gate", device_types=BOTH_DEVICES)
def _silu_gate_op(h: Tensor, interleaved: bool) -> Tensor:
    gate, up = _split(h, "interleaved" if interleaved else "concatenated")
    # Outputs come from the buffer cache and are written with out= variants: on CPU, the
    # page faults of writing freshly allocated memory cost more than these ops themselves.
    out = _memory.empty((h.shape[0], h.shape[1] // 2), h.dtype, h.device)
    torch.ops.aten.silu.out(gate, out=out)
    out.mul_(up)
    return out


@_silu_gate_op.register_fake
def _(h: Tensor, interleaved: bool) -> Tensor:
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@_eager.custom_op("silu_gate_backward", device_types=BOTH_DEVICES)
def _silu_gate_backward_op(grad_out: Tensor, h: Tensor, interleaved: bool) -> Tensor:
    layout = "interleaved" if interleaved else "concatenated"
    gate, up = _split(h, layout)
    grad_h = _memory.empty(tuple(h.shape), h.dtype, h.device)
    grad_gate, grad_up = _split(grad_h, layout)
    torch.ops.aten.silu.out(gate, out=grad_up)
    grad_up.mul_(grad_out)
    torch.mul(grad_out, up, out=grad_gate)
    torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    return grad_h


@_silu_gate_backward_op.register_fake
def _(grad_out: Tensor, h: Tensor, interleaved: bool) -> Tensor:
    return torch.empty_like(h)


def _silu_gate_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    h, interleaved = inputs
    ctx.save_for_backward(h)
    ctx.interleaved = interleaved


def _silu_gate_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
    (h,) = ctx.saved_tensors
    grad_h: Tensor = _eager.call("silu_gate_backward", grad_out, h, ctx.interleaved)
    return grad_h, None


_eager.register_autograd(_silu_gate_op, _silu_gate_backward, setup_context=_silu_gate_setup_context)


def gated_activation(h: Tensor, activation: Callable[[Tensor], Tensor], gate_layout: str) -> Tensor:
    """``activation(gate) * up`` for ``h = [gate | up]`` (or interleaved), fused for SiLU."""
    if activation is F.silu:
        out: Tensor = _eager.call("silu_gate", h, gate_layout == "interleaved")
        return out
    gate, up = _split(h, gate_layout)
    return activation(gate) * up


def grouped_mlp(
    x_sorted: Tensor,
    offsets: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    *,
    activation: str | Callable[[Tensor], Tensor] = "silu",
    gated: bool = True,
    gate_layout: str = "concatenated",
    transposed: bool = False,
    bias: tuple[Tensor | None, Tensor | None] | None = None,
) -> Tensor:
    """Every expert's MLP on its slice of expert-major rows.

    ``gated=True`` (SwiGLU-style): ``h = x @ gate_up[e]``, split into ``gate`` and ``up``,
    ``y = (activation(gate) * up) @ down[e]``. ``gated=False``: ``y = activation(x @ up[e])
    @ down[e]``.

    Args:
        x_sorted: ``[rows, H]`` rows in expert-major order (``permute``'s output).
        offsets: ``[E + 1]`` slice bounds (``plan.offsets``).
        gate_up_proj: ``[E, 2F, H]`` (``[E, H, 2F]`` when ``transposed``); ``[E, F, H]``
            when not gated.
        down_proj: ``[E, H, F]`` (``[E, F, H]`` when ``transposed``).
        activation: a name in ``ACTIVATIONS`` or a callable applied elementwise.
        gated: whether ``gate_up_proj`` holds a gate and an up projection.
        gate_layout: ``"concatenated"`` (first F columns gate, last F up: transformers'
            default) or ``"interleaved"`` (gate and up alternate: GPT-OSS).
        transposed: weight layout, see ``grouped_linear``.
        bias: optional ``(gate_up_bias [E, 2F], down_bias [E, H])``; either may be None.

    Returns:
        ``[rows, H]`` in ``x_sorted``'s dtype; zeros in padding rows past ``offsets[E]``.
        Differentiable with respect to the rows, the weights and the biases.
    """
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}"
            )
        act = ACTIVATIONS[activation]
    elif callable(activation):
        act = activation
    else:
        raise TypeError(f"activation: expected a str or a callable, got {type(activation).__name__}")
    if gate_layout not in GATE_LAYOUTS:
        raise ValueError(f"gate_layout: expected one of {GATE_LAYOUTS}, got {gate_layout!r}")
    gate_up_bias, down_bias = (None, None) if bias is None else bias
    h = grouped_linear(x_sorted, offsets, gate_up_proj, gate_up_bias, transposed=transposed)
    if gated:
        if h.shape[1] % 2:
            raise ValueError(
                f"gate_up_proj: expected an even output size 2F when gated=True, got {h.shape[1]}"
            )
        h = gated_activation(h, act, gate_layout)
    else:
        h = act(h)
    return grouped_linear(h, offsets, down_proj, down_bias, transposed=transposed)
