"""Load balancing: auxiliary losses, routing statistics and the bias controller.

The heavy parts (normalised scores summed per group, expert counts, the z-loss) run in the
Rust core (rust/core/src/balance/mod.rs) as custom ops with autograd; what remains is
arithmetic on ``[groups, E]`` tensors. docs/semantics.md states every formula and how it
relates to Megatron-Core, DeepSeek-V3 and Hugging Face transformers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sparseroute import _core, _memory
from sparseroute._threads import get_num_threads
from sparseroute.ops import _eager
from sparseroute.ops._bridge import accumulator_dtype, as_dtype, numpy_view
from sparseroute.ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_tensor
from sparseroute.ops.dispatch import PermutePlan
from sparseroute.ops.gating import SCORE_FUNCTIONS

LOSS_SCOPES = ("batch", "sequence")
LOSS_SCALES = ("megatron", "switch")


def _mask_view(mask: Tensor | None) -> Any:
    return None if mask is None else numpy_view(mask.contiguous())


# --- sparseroute::score_sums ---------------------------------------------------------------


@_eager.custom_op("score_sums", device_types="cpu")
def _score_sums_op(logits: Tensor, score: str, group_size: int, mask: Tensor | None) -> Tensor:
    """``[G, E]``: per group of ``group_size`` tokens, the sum of the normalised scores of its
    unmasked tokens (softmax, or sigmoid over its sum), accumulated in float64."""
    num_tokens, num_experts = logits.shape
    groups = -(-num_tokens // group_size)
    sums = torch.empty(groups, num_experts, dtype=torch.float64)
    _core.score_sums(
        numpy_view(logits.contiguous()),
        score,
        group_size,
        _mask_view(mask),
        numpy_view(sums),
        get_num_threads(),
    )
    return as_dtype(sums, accumulator_dtype(logits.dtype))


@_score_sums_op.register_fake
def _(logits: Tensor, score: str, group_size: int, mask: Tensor | None) -> Tensor:
    groups = -(-logits.shape[0] // group_size)
    return logits.new_empty(groups, logits.shape[1], dtype=accumulator_dtype(logits.dtype))


@_eager.custom_op("score_sums_backward", device_types="cpu")
def _score_sums_backward_op(
    logits: Tensor, score: str, group_size: int, mask: Tensor | None, grad_sums: Tensor
) -> Tensor:
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _core.score_sums_backward(
        numpy_view(logits.contiguous()),
        score,
        group_size,
        _mask_view(mask),
        numpy_view(as_dtype(grad_sums, accumulator_dtype(logits.dtype)).contiguous()),
        numpy_view(grad_logits),
        get_num_threads(),
    )
    return grad_logits


@_score_sums_backward_op.register_fake
def _(logits: Tensor, score: str, group_size: int, mask: Tensor | None, grad_sums: Tensor) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _score_sums_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    logits, score, group_size, mask = inputs
    ctx.save_for_backward(logits, mask)
    ctx.score, ctx.group_size = score, group_size


def _score_sums_backward(ctx: Any, grad_sums: Tensor) -> tuple[Any, ...]:
    logits, mask = ctx.saved_tensors
    grad = _eager.call("score_sums_backward", logits, ctx.score, ctx.group_size, mask, grad_sums)
    return grad, None, None, None


_eager.register_autograd(_score_sums_op, _score_sums_backward, setup_context=_score_sums_setup_context)


# --- sparseroute::expert_counts ------------------------------------------------------------


@_eager.custom_op("expert_counts", device_types="cpu")
def _expert_counts_op(experts: Tensor, num_experts: int, group_size: int, mask: Tensor | None) -> Tensor:
    """``[G, E]`` int64: slots of the unmasked tokens of each group routed to each expert."""
    groups = -(-experts.shape[0] // group_size)
    counts = torch.empty(groups, num_experts, dtype=torch.int64)
    _core.expert_counts(
        numpy_view(experts.contiguous()),
        num_experts,
        group_size,
        _mask_view(mask),
        numpy_view(counts),
        get_num_threads(),
    )
    return counts


@_expert_counts_op.register_fake
def _(experts: Tensor, num_experts: int, group_size: int, mask: Tensor | None) -> Tensor:
    return experts.new_empty(-(-experts.shape[0] // group_size), num_experts, dtype=torch.int64)


# --- sparseroute::z_loss -------------------------------------------------------------------

#: Numbers the z-loss keeps per token for its backward: the row's maximum and the gradient
#: factor (rust/core/src/balance/mod.rs, Z_LOSS_STATS; the CUDA kernels write the same).
Z_LOSS_STATS = 2


@_eager.custom_op("z_loss", device_types="cpu")
def _z_loss_op(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(loss, stats)``: the mean over unmasked tokens of ``logsumexp(l_t)^2`` (0 without such
    tokens), and per token ``stats [T, 2]``: the row's maximum ``m_t`` and the gradient factor
    ``2 z_t / (n sum_t)``, from which the backward recomputes ``2 z_t softmax(l_t) / n`` (rows
    whose factor is 0 get a zero gradient: masked tokens). Two numbers per token are all the
    z-loss keeps for the backward, besides the logits themselves."""
    acc = accumulator_dtype(logits.dtype)
    count = logits.shape[0] if mask is None else int(mask.count_nonzero())
    stats, stats_view = _memory.empty_with_view((logits.shape[0], Z_LOSS_STATS), acc)
    # The 1/n goes into the kernel, which folds it into every token's gradient factor too.
    total = _core.z_loss(
        numpy_view(logits.contiguous()),
        _mask_view(mask),
        1.0 / count if count else 0.0,
        stats_view,
        get_num_threads(),
    )
    # scalar_tensor: a quarter of torch.tensor's host time for a Python number.
    return torch.scalar_tensor(total / count if count else 0.0, dtype=acc), stats


@_z_loss_op.register_fake
def _(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    acc = accumulator_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty((logits.shape[0], Z_LOSS_STATS), dtype=acc)


def _z_loss_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    ctx.save_for_backward(inputs[0], output[1])
    # The stats output is internal: no gradient flows into it.
    ctx.set_materialize_grads(False)


@_eager.custom_op("z_loss_backward", device_types="cpu")
def _z_loss_backward_op(logits: Tensor, stats: Tensor, grad: Tensor) -> Tensor:
    """``grad * d z_loss / d logits`` in the logits' dtype, recomputed from the logits and the
    forward's ``stats`` (the forward's ``exp``, so the same bits as a saved gradient would
    have), written by the Rust core into a reused buffer."""
    out, out_view = _memory.empty_with_view(tuple(logits.shape), logits.dtype)
    _core.z_loss_backward(
        numpy_view(logits.contiguous()), numpy_view(stats), float(grad), out_view, get_num_threads()
    )
    return out


@_z_loss_backward_op.register_fake
def _(logits: Tensor, stats: Tensor, grad: Tensor) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _z_loss_backward(ctx: Any, grad: Tensor | None, _grad_stats: Tensor | None) -> tuple[Any, ...]:
    if grad is None:  # only the (internal) stats output reached the loss
        return None, None
    logits, stats = ctx.saved_tensors
    return _eager.call("z_loss_backward", logits, stats, grad), None


_eager.register_autograd(_z_loss_op, _z_loss_backward, setup_context=_z_loss_setup_context)


# --- public API ----------------------------------------------------------------------------


def _check_mask(
    attention_mask: object, num_tokens: int, device: torch.device
) -> tuple[Tensor | None, int | None]:
    """The flattened uint8 mask and the sequence length it implies (``[B, S]`` or ``[T]``)."""
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask: expected a torch.Tensor [B, S], got {type(attention_mask).__name__}"
        )
    if attention_mask.dim() not in (1, 2) or attention_mask.numel() != num_tokens:
        raise ValueError(
            f"attention_mask: expected [B, S] (or [T]) with B * S = T = {num_tokens} tokens (the rows of "
            f"logits), got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != device:
        raise ValueError(
            f"attention_mask: expected a tensor on the device of logits ({device}), "
            f"got {attention_mask.device}"
        )
    seq_len = attention_mask.shape[1] if attention_mask.dim() == 2 else None
    return (attention_mask.reshape(-1) != 0).to(torch.uint8), seq_len


def load_balancing_loss(
    logits: Tensor,
    experts: Tensor,
    *,
    score: str = "softmax",
    scope: str = "batch",
    seq_len: int | None = None,
    attention_mask: Tensor | None = None,
    scale: str = "megatron",
) -> Tensor:
    """The Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e``, differentiable in ``logits``.

    ``P_e`` is the mean over tokens of the normalised score of expert ``e`` (softmax over the
    experts; for ``score="sigmoid"``, the sigmoids divided by their sum + 1e-20). ``f_e`` is
    the number of slots routed to ``e`` divided by ``T * k`` (``scale="megatron"``: a
    perfectly balanced router scores 1) or by ``T`` (``scale="switch"``: the form of Hugging
    Face's Mixtral loss, k times larger). ``f`` is a count and carries no gradient.

    Args:
        logits: ``[T, E]`` router logits.
        experts: ``[T, k]`` the experts chosen (-1 slots are not counted).
        score: "softmax" or "sigmoid".
        scope: "batch" (one loss over all tokens) or "sequence" (the loss of each sequence
            of ``seq_len`` consecutive tokens, averaged over sequences: DeepSeek-V3's
            sequence-wise balance loss).
        seq_len: tokens per sequence for ``scope="sequence"`` (taken from ``attention_mask``
            when that is ``[B, S]``).
        attention_mask: ``[B, S]`` (or ``[T]``), nonzero for real tokens: padding tokens are
            left out of both ``f`` and ``P``; a sequence without real tokens is left out of
            the mean.

    Returns:
        A float32 scalar (float64 for float64 logits).
    """
    logits = check_tensor(logits, "logits", ndim=2, layout="[T, E]", dtypes=FLOAT_DTYPES)
    experts = check_tensor(experts, "experts", ndim=2, layout="[T, k]", dtypes=INDEX_DTYPES)
    num_tokens, num_experts = logits.shape
    if experts.shape[0] != num_tokens or experts.shape[1] < 1:
        raise ValueError(
            f"experts: expected [T, k] with T = {num_tokens} (the rows of logits) and k >= 1, got "
            f"shape {tuple(experts.shape)}"
        )
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"score: expected one of {SCORE_FUNCTIONS}, got {score!r}")
    if scope not in LOSS_SCOPES:
        raise ValueError(f"scope: expected one of {LOSS_SCOPES}, got {scope!r}")
    if scale not in LOSS_SCALES:
        raise ValueError(f"scale: expected one of {LOSS_SCALES}, got {scale!r}")
    mask, mask_seq_len = _check_mask(attention_mask, num_tokens, logits.device)
    if scope == "sequence":
        if seq_len is None:
            seq_len = mask_seq_len
        if seq_len is None:
            raise ValueError('seq_len: expected the tokens per sequence for scope="sequence", got None')
        seq_len = check_int(seq_len, "seq_len", minimum=1)
        if num_tokens % seq_len:
            raise ValueError(f"seq_len: expected a divisor of T = {num_tokens}, got {seq_len}")
        group_size = seq_len
    else:
        group_size = max(num_tokens, 1)
    k = experts.shape[1]
    acc = accumulator_dtype(logits.dtype)
    sums = _eager.call("score_sums", logits, score, group_size, mask)
    counts = _eager.call("expert_counts", as_dtype(experts, torch.int64), num_experts, group_size, mask)
    groups = sums.shape[0]
    if mask is None:
        valid = torch.full((groups,), float(group_size), dtype=acc, device=logits.device)
        if groups:
            # A fill of a one-element slice: assigning a Python number to an element of a CUDA
            # tensor copies it from the host, which is not allowed inside CUDA graph capture.
            valid[-1:].fill_(float(num_tokens - group_size * (groups - 1)))
    else:
        padded = torch.zeros(groups * group_size, dtype=acc, device=logits.device)
        padded[:num_tokens] = mask.to(acc)
        valid = padded.view(groups, group_size).sum(dim=1)
    present = valid > 0
    denominator = valid.clamp_min(1.0)
    slots_per_token = k if scale == "megatron" else 1
    fraction = counts.to(acc) / (denominator * slots_per_token).unsqueeze(1)
    probability = sums / denominator.unsqueeze(1)
    per_group = num_experts * (fraction * probability).sum(dim=1)
    per_group = torch.where(present, per_group, torch.zeros_like(per_group))
    return per_group.sum() / present.sum().clamp_min(1).to(acc)


def z_loss(logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The router z-loss (ST-MoE): ``mean_t logsumexp(logits[t])^2`` over the tokens
    (unmasked ones, with ``attention_mask``), fused, differentiable in ``logits``. Returns a
    float32 scalar (float64 for float64 logits); multiply by the loss coefficient."""
    logits = check_tensor(logits, "logits", ndim=2, layout="[T, E]", dtypes=FLOAT_DTYPES)
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    mask, _ = _check_mask(attention_mask, logits.shape[0], logits.device)
    loss, _ = _eager.call("z_loss", logits, mask)
    result: Tensor = loss
    return result


class RoutingStats(NamedTuple):
    """Load statistics of one routing decision (see ``routing_stats``)."""

    tokens_per_expert: Tensor
    max_over_mean: float
    max_violation: float
    coefficient_of_variation: float
    entropy: float
    normalized_entropy: float
    dropped_fraction: float


def routing_stats(experts: Tensor, num_experts: int, plan: PermutePlan | None = None) -> RoutingStats:
    """How balanced a routing is.

    ``tokens_per_expert`` counts the slots routed to each expert (the demand, before any
    capacity drop). With ``mean`` its average and ``max`` its largest entry:
    ``max_over_mean``, ``max_violation = max / mean - 1`` (MaxVio, as in Loss-Free
    Balancing), ``coefficient_of_variation = std / mean`` (population std), ``entropy`` of
    the load distribution in nats and ``normalized_entropy = entropy / log(E)`` (1 for a
    uniform load), and ``dropped_fraction``: dropped slots / routed slots of ``plan`` (0
    without a plan). Ratios are 0 when nothing was routed.
    """
    experts = check_tensor(experts, "experts", ndim=2, layout="[T, k]", dtypes=INDEX_DTYPES)
    num_experts = check_int(num_experts, "num_experts", minimum=1)
    counts = _eager.call(
        "expert_counts", as_dtype(experts, torch.int64), num_experts, max(experts.shape[0], 1), None
    ).sum(dim=0)
    load = counts.to(torch.float64)
    total = float(load.sum())
    dropped = 0.0
    if plan is not None:
        dropped = float(plan.dropped.sum()) / total if total else 0.0
    if total == 0:
        return RoutingStats(counts, 0.0, 0.0, 0.0, 0.0, 0.0, dropped)
    mean = total / num_experts
    share = load / total
    entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
    return RoutingStats(
        tokens_per_expert=counts,
        max_over_mean=float(load.max()) / mean,
        max_violation=float(load.max()) / mean - 1.0,
        coefficient_of_variation=float(load.std(correction=0)) / mean,
        entropy=entropy,
        normalized_entropy=entropy / math.log(num_experts) if num_experts > 1 else 1.0,
        dropped_fraction=dropped,
    )


def update_expert_bias(bias: Tensor, tokens_per_expert: Tensor, rate: float) -> Tensor:
    """The auxiliary-loss-free balancing step (DeepSeek-V3, Megatron-Core's
    ``get_updated_expert_bias``): ``bias + rate * sign(mean(load) - load)`` in float32, a new
    tensor (the input is not modified). Overloaded experts lose selection bias, idle ones
    gain it; pass the result as ``topk_gating(..., expert_bias=...)``."""
    bias = check_tensor(bias, "bias", ndim=1, layout="[E]", dtypes=(torch.float32,))
    tokens_per_expert = check_tensor(
        tokens_per_expert, "tokens_per_expert", ndim=1, layout="[E]", dtypes=(*INDEX_DTYPES, *FLOAT_DTYPES)
    )
    if tokens_per_expert.shape != bias.shape:
        raise ValueError(
            f"tokens_per_expert: expected shape [E] = {list(bias.shape)} (the shape of bias), "
            f"got {list(tokens_per_expert.shape)}"
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise ValueError(f"rate: expected a finite float, got {rate!r}")
    load = tokens_per_expert.to(torch.float32)
    return bias + rate * torch.sign(load.mean() - load)


# --- sparseroute::sinkhorn -----------------------------------------------------------------


@_eager.custom_op("sinkhorn", device_types="cpu")
def _sinkhorn_op(logits: Tensor, iters: int | None, tol: float) -> Tensor:
    out = _memory.empty(tuple(logits.shape), torch.float32)
    _core.sinkhorn(numpy_view(logits.float().contiguous()), tol, iters, numpy_view(out), get_num_threads())
    return out


@_sinkhorn_op.register_fake
def _(logits: Tensor, iters: int | None, tol: float) -> Tensor:
    return logits.new_empty(logits.shape, dtype=torch.float32)


def sinkhorn(logits: Tensor, *, iters: int | None = None, tol: float = 1e-4) -> Tensor:
    """Sinkhorn-balanced routing scores, as Megatron-Core's ``sinkhorn`` computes them.

    In float32: ``cost = exp(logits)``; starting from ``d0 = d1 = 1``, repeat
    ``d0 = (1/T) / (cost @ d1 + 1e-8)`` and ``d1 = (1/E) / (d0 @ cost + 1e-8)`` until the
    mean absolute change of ``d1`` is at most ``tol`` (or ``iters`` iterations, when given);
    return ``d1 * cost * d0[:, None]``, whose columns each sum to about ``1/E``. For
    *selection* (``torch.topk`` or ``topk_gating`` on the result); take the weights from the
    plain scores (``torch.softmax(logits)`` or ``topk_gating``), as Megatron-Core's sinkhorn
    router does. Not differentiable: the input is detached.

    Batches of one or two tokens reach ``tol`` slowly: with normal logits (standard deviation
    2, ``tol=1e-4``) up to about 4e5 iterations for one token and 6e4 for two, against 10-35
    from three tokens on. Megatron-Core's router balances training batches only; for small
    batches pass ``iters``.

    Raises ``InvalidInputError`` for logits that are not finite or exceed 88 (``exp`` would
    overflow float32, which would make every score NaN).
    """
    logits = check_tensor(logits, "logits", ndim=2, layout="[T, E]", dtypes=FLOAT_DTYPES)
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    if iters is not None:
        iters = check_int(iters, "iters", minimum=1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol: expected a float >= 0, got {tol!r}")
    scores: Tensor = _eager.call("sinkhorn", logits.detach(), iters, float(tol))
    return scores
