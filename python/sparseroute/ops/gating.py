"""Top-k gating: router logits -> (weights, experts), with autograd to the logits.

The exact semantics are written down in docs/semantics.md and in the docstring of
``topk_gating``; the Rust kernel (rust/core/src/gating/mod.rs) implements them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sparseroute import _core, _memory
from sparseroute._threads import get_num_threads
from sparseroute.ops import _eager
from sparseroute.ops._bridge import accumulator_dtype, as_dtype, numpy_view
from sparseroute.ops._checks import FLOAT_DTYPES, check_int, check_tensor

SCORE_FUNCTIONS = ("softmax", "sigmoid")


@_eager.custom_op("topk_gating", device_types="cpu")
def _topk_gating_op(
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
    logits = logits.contiguous()
    num_tokens = logits.shape[0]
    weights, weights_view = _memory.empty_with_view((num_tokens, k), accumulator_dtype(logits.dtype))
    experts, experts_view = _memory.empty_with_view((num_tokens, k), torch.int64)
    _core.topk_gating(
        numpy_view(logits),
        weights_view,
        experts_view,
        k,
        score,
        normalize,
        None if expert_bias is None else numpy_view(expert_bias.contiguous()),
        num_groups,
        topk_groups,
        group_score_k,
        scale,
        get_num_threads(),
    )
    return weights, experts


@_topk_gating_op.register_fake
def _(
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
    num_tokens = logits.shape[0]
    weights = logits.new_empty(num_tokens, k, dtype=accumulator_dtype(logits.dtype))
    experts = logits.new_empty(num_tokens, k, dtype=torch.int64)
    return weights, experts


@_eager.custom_op("topk_gating_backward", device_types="cpu")
def _topk_gating_backward_op(
    logits: Tensor, experts: Tensor, grad_weights: Tensor, score: str, normalize: bool, scale: float
) -> Tensor:
    logits = logits.contiguous()
    grad_logits = _memory.empty(tuple(logits.shape), logits.dtype)
    _core.topk_gating_backward(
        numpy_view(logits),
        numpy_view(experts.contiguous()),
        numpy_view(as_dtype(grad_weights.contiguous(), accumulator_dtype(logits.dtype))),
        numpy_view(grad_logits),
        score,
        normalize,
        scale,
        get_num_threads(),
    )
    return grad_logits


@_topk_gating_backward_op.register_fake
def _(
    logits: Tensor, experts: Tensor, grad_weights: Tensor, score: str, normalize: bool, scale: float
) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    logits, _k, score, normalize, _bias, _groups, _topk_groups, _group_score_k, scale = inputs
    _weights, experts = output
    ctx.save_for_backward(logits, experts)
    ctx.score, ctx.normalize, ctx.scale = score, normalize, scale
    # Integer outputs (expert ids, plans) take no gradient: without this, autograd would
    # fill a zero tensor as large as each of them on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, grad_weights: Tensor | None, _grad_experts: Tensor | None) -> tuple[Any, ...]:
    if grad_weights is None:
        return (None,) * 9
    logits, experts = ctx.saved_tensors
    grad_logits = _eager.call(
        "topk_gating_backward",
        logits,
        experts,
        grad_weights,
        ctx.score,
        ctx.normalize,
        ctx.scale,
    )
    return grad_logits, None, None, None, None, None, None, None, None


_eager.register_autograd(_topk_gating_op, _backward, setup_context=_setup_context)


def topk_gating(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    expert_bias: Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score_k: int = 2,
    scale: float = 1.0,
    jitter_eps: float = 0.0,
    gumbel_noise: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose ``k`` experts per token from router logits and weigh them.

    Args:
        logits: ``[T, E]`` router logits, float32, bfloat16 or float16 (float64 is accepted
            and computed in float64, for gradient checks). Must be finite.
        k: experts per token, ``1 <= k <= E``.
        score: ``"softmax"`` (over the E experts) or ``"sigmoid"`` (per expert). Scores are
            computed in float32.
        normalize: divide the k weights by their sum (sigmoid: by ``sum + 1e-20``).
        expert_bias: ``[E]`` added to the scores for *selection only* (DeepSeek-V3's
            auxiliary-loss-free balancing); the weights stay unbiased. No gradient.
        num_groups, topk_groups: group-limited routing. The experts form ``num_groups``
            equal consecutive groups; a group scores the sum of its ``group_score_k`` best
            selection scores (all of them when it has fewer); only the ``topk_groups`` best
            groups compete. Give both or neither.
        group_score_k: how many of a group's best selection scores make its score: 2
            (DeepSeek-V3, and vLLM's and SGLang's grouped top-k with a bias), 1 (the best
            one: DeepSeek-V2's ``group_limited_greedy``, vLLM's and SGLang's without a
            bias), or ``k // topk_groups`` (Megatron-Core). Used only with groups.
        scale: multiplies the weights after normalisation (``routed_scaling_factor``).
        jitter_eps: exploration noise: multiply the logits by ``U(1 - eps, 1 + eps)``, drawn
            per element (Switch Transformers applies this to the router's input; use
            ``sparseroute.jitter`` on the hidden states for that). Affects selection and
            weights.
        gumbel_noise: exploration noise: select on ``logits + Gumbel(0, 1)`` noise (per
            element) while the weights come from the noise-free logits.
        generator: the ``torch.Generator`` the noise is drawn from (default: torch's global
            one), so noisy runs are reproducible.

    Returns:
        ``(weights, experts)``: ``weights [T, k]`` float32 (float64 for float64 logits) and
        ``experts [T, k]`` int64, in descending order of selection score; equal scores go to
        the lower expert index. Without a bias or group limit the selection compares the
        logits themselves (both score functions are strictly increasing), so fp32 rounding
        of the scores never creates ties. Differentiable with respect to ``logits`` through
        ``weights``.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, shape, dtype, device
        or option; ``sparseroute.InvalidInputError`` (a ValueError) for NaN or infinite
        logits.
    """
    logits = check_tensor(logits, "logits", ndim=2, layout="[T, E]", dtypes=FLOAT_DTYPES)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError(f"logits: expected at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    k = check_int(k, "k", minimum=1, maximum=num_experts, maximum_name="number of experts E")
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"score: expected 'softmax' or 'sigmoid', got {score!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if expert_bias is not None:
        expert_bias = check_tensor(expert_bias, "expert_bias", ndim=1, layout="[E]", dtypes=FLOAT_DTYPES)
        if expert_bias.shape[0] != num_experts:
            raise ValueError(
                f"expert_bias: expected shape [E] = [{num_experts}], got {tuple(expert_bias.shape)}"
            )
        expert_bias = as_dtype(expert_bias.detach(), accumulator_dtype(logits.dtype))
    if (num_groups is None) != (topk_groups is None):
        missing = "topk_groups" if topk_groups is None else "num_groups"
        raise ValueError(f"{missing}: expected an int when the other group argument is given, got None")
    if num_groups is not None and topk_groups is not None:
        num_groups = check_int(num_groups, "num_groups", minimum=1, maximum=num_experts)
        if num_experts % num_groups != 0:
            raise ValueError(
                f"num_groups: expected a divisor of the number of experts E = {num_experts}, got {num_groups}"
            )
        topk_groups = check_int(topk_groups, "topk_groups", minimum=1, maximum=num_groups)
        group_score_k = check_int(group_score_k, "group_score_k", minimum=1)
        reachable = topk_groups * (num_experts // num_groups)
        if k > reachable:
            raise ValueError(
                f"k: expected at most topk_groups * E / num_groups = {reachable} experts, got {k}"
            )
    if isinstance(jitter_eps, bool) or not isinstance(jitter_eps, (int, float)) or not 0 <= jitter_eps < 1:
        raise ValueError(f"jitter_eps: expected a float in [0, 1), got {jitter_eps!r}")
    if not isinstance(gumbel_noise, bool):
        raise TypeError(f"gumbel_noise: expected a bool, got {type(gumbel_noise).__name__}")
    if jitter_eps:
        logits = jitter(logits, jitter_eps, generator=generator)
    if gumbel_noise:
        uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32, device=logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
        acc = accumulator_dtype(logits.dtype)
        noisy = logits.detach().to(acc) + gumbel.to(acc)
        args = (k, score, normalize, expert_bias, num_groups, topk_groups, group_score_k, 1.0)
        _, experts = _eager.call("topk_gating", noisy, *args)
        return _weights_of(logits, experts, score, normalize, float(scale)), experts
    weights, experts = _eager.call(
        "topk_gating",
        logits,
        k,
        score,
        normalize,
        expert_bias,
        num_groups,
        topk_groups,
        group_score_k,
        float(scale),
    )
    return weights, experts


def jitter(x: Tensor, eps: float, *, generator: torch.Generator | None = None) -> Tensor:
    """``x * U(1 - eps, 1 + eps)`` elementwise (Switch Transformers' router input jitter),
    noise drawn from ``generator``; differentiable with respect to ``x``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    noise = torch.empty(x.shape, dtype=x.dtype, device=x.device).uniform_(
        1.0 - eps, 1.0 + eps, generator=generator
    )
    return x * noise


def _weights_of(logits: Tensor, experts: Tensor, score: str, normalize: bool, scale: float) -> Tensor:
    """topk_gating's weights for experts chosen elsewhere (the Gumbel-noise path), in torch."""
    values = logits.to(accumulator_dtype(logits.dtype))
    scores = torch.softmax(values, dim=-1) if score == "softmax" else torch.sigmoid(values)
    weights = scores.gather(1, experts)
    if normalize:
        eps = 1e-20 if score == "sigmoid" else 0.0
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights * scale


# --- sparseroute::topp_gating ----------------------------------------------------------------


@_eager.custom_op("topp_gating", device_types="cpu")
def _topp_gating_op(
    logits: Tensor, p: float, min_k: int, max_k: int, inclusive: bool, normalize: bool
) -> tuple[Tensor, Tensor]:
    logits = logits.contiguous()
    num_tokens = logits.shape[0]
    weights = _memory.empty((num_tokens, max_k), accumulator_dtype(logits.dtype))
    experts = _memory.empty((num_tokens, max_k), torch.int64)
    _core.topp_gating(
        numpy_view(logits),
        numpy_view(weights),
        numpy_view(experts),
        p,
        min_k,
        max_k,
        inclusive,
        normalize,
        get_num_threads(),
    )
    return weights, experts


@_topp_gating_op.register_fake
def _(
    logits: Tensor, p: float, min_k: int, max_k: int, inclusive: bool, normalize: bool
) -> tuple[Tensor, Tensor]:
    num_tokens = logits.shape[0]
    return (
        logits.new_empty(num_tokens, max_k, dtype=accumulator_dtype(logits.dtype)),
        logits.new_empty(num_tokens, max_k, dtype=torch.int64),
    )


def _topp_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    logits, _p, _min_k, _max_k, _inclusive, normalize = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.normalize = normalize
    # Integer outputs (expert ids, plans) take no gradient: without this, autograd would
    # fill a zero tensor as large as each of them on every backward.
    ctx.set_materialize_grads(False)


def _topp_backward(ctx: Any, grad_weights: Tensor | None, _grad_experts: Tensor | None) -> tuple[Any, ...]:
    if grad_weights is None:
        return (None,) * 6
    logits, experts = ctx.saved_tensors
    # The weights are softmax probabilities of the kept experts (renormalised or not): the
    # top-k gradient, whose -1 slots drop out, is exactly theirs.
    grad_logits = _eager.call(
        "topk_gating_backward", logits, experts, grad_weights, "softmax", ctx.normalize, 1.0
    )
    return grad_logits, None, None, None, None, None


_eager.register_autograd(_topp_gating_op, _topp_backward, setup_context=_topp_setup_context)


def topp_gating(
    logits: Tensor,
    p: float,
    *,
    min_k: int = 1,
    max_k: int | None = None,
    inclusive: bool = True,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Dynamic-k (top-p) gating: each token keeps its most probable experts until their
    cumulative softmax probability reaches ``p``.

    Experts are ranked by logit (ties to the lower index) and their float32 softmax
    probabilities summed in that order. ``inclusive=True`` keeps the smallest prefix whose
    sum is ``>= p`` (the expert that crosses ``p`` is kept: XMoE's rule, and top-p routing as
    in Huang et al., "Harder Tasks Need More Experts", 2024); ``inclusive=False`` keeps only
    the prefix whose sum stays ``<= p`` (the crossing expert is dropped: with ``min_k=1``,
    BALM's Top-P router). Then at least ``min_k`` and at most ``max_k`` experts are kept.
    docs/semantics.md cites both conventions and where their code differs at ``sum == p``.

    Args:
        logits: ``[T, E]`` router logits (float32, bfloat16, float16; float64 for checks).
        p: the cumulative probability, ``0 < p <= 1``.
        min_k: experts kept regardless of ``p`` (``0 <= min_k <= max_k``).
        max_k: the most experts kept and the width of the outputs (default E).
        inclusive: whether the expert that crosses ``p`` is kept.
        normalize: renormalise the kept probabilities to sum to 1.

    Returns:
        ``(weights, experts)``, both ``[T, max_k]`` in the layout of ``topk_gating``: kept
        experts first (descending probability), then ``-1`` with weight 0. ``permute`` and
        ``unpermute`` skip the ``-1`` slots. Differentiable with respect to ``logits``.
    """
    logits = check_tensor(logits, "logits", ndim=2, layout="[T, E]", dtypes=FLOAT_DTYPES)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError(f"logits: expected at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p: expected a float, got {type(p).__name__}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p: expected a probability in (0, 1], got {p}")
    max_k = num_experts if max_k is None else max_k
    max_k = check_int(max_k, "max_k", minimum=1, maximum=num_experts, maximum_name="number of experts E")
    min_k = check_int(min_k, "min_k", minimum=0, maximum=max_k, maximum_name="max_k")
    if not isinstance(inclusive, bool) or not isinstance(normalize, bool):
        raise TypeError("inclusive, normalize: expected bools")
    weights, experts = _eager.call("topp_gating", logits, float(p), min_k, max_k, inclusive, normalize)
    return weights, experts


# --- sparseroute::expert_choice --------------------------------------------------------------


@_eager.custom_op("expert_choice", device_types="cpu")
def _expert_choice_op(logits: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """``(gates [E, C], indices [E, C])`` (gates first: a float output leads)."""
    num_experts = logits.shape[1]
    indices = torch.empty(num_experts, capacity, dtype=torch.int64)
    gates = torch.empty(num_experts, capacity, dtype=accumulator_dtype(logits.dtype))
    # Working memory for the [E, T] probabilities, from the buffer cache: fresh pages cost
    # more to fill than the softmax itself, and their faults serialise the threads.
    scores = _memory.empty((num_experts, logits.shape[0]), gates.dtype)
    _core.expert_choice(
        numpy_view(logits.contiguous()),
        capacity,
        numpy_view(indices),
        numpy_view(gates),
        numpy_view(scores),
        get_num_threads(),
    )
    return gates, indices


@_expert_choice_op.register_fake
def _(logits: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    num_experts = logits.shape[1]
    return (
        logits.new_empty(num_experts, capacity, dtype=accumulator_dtype(logits.dtype)),
        logits.new_empty(num_experts, capacity, dtype=torch.int64),
    )


def _expert_choice_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    ctx.save_for_backward(inputs[0], output[1])
    # Integer outputs (expert ids, plans) take no gradient: without this, autograd would
    # fill a zero tensor as large as each of them on every backward.
    ctx.set_materialize_grads(False)


@_eager.custom_op("expert_choice_backward", device_types="cpu")
def _expert_choice_backward_op(logits: Tensor, indices: Tensor, grad_gates: Tensor) -> Tensor:
    """``gates[e, c] = p[indices[e, c], e]`` with ``p`` the softmax over experts: with ``G``
    the gates' gradient placed at ``[indices[e, c], e]``, ``dL/dl_t = p_t * (G_t - <p_t, G_t>)``."""
    logits = logits.contiguous()
    grad_logits = _memory.empty(tuple(logits.shape), logits.dtype)
    _core.expert_choice_backward(
        numpy_view(logits),
        numpy_view(indices.contiguous()),
        numpy_view(as_dtype(grad_gates.contiguous(), accumulator_dtype(logits.dtype))),
        numpy_view(grad_logits),
        get_num_threads(),
    )
    return grad_logits


@_expert_choice_backward_op.register_fake
def _(logits: Tensor, indices: Tensor, grad_gates: Tensor) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _expert_choice_backward(
    ctx: Any, grad_gates: Tensor | None, _grad_indices: Tensor | None
) -> tuple[Any, ...]:
    if grad_gates is None:
        return None, None
    logits, indices = ctx.saved_tensors
    return _eager.call("expert_choice_backward", logits, indices, grad_gates), None


_eager.register_autograd(
    _expert_choice_op, _expert_choice_backward, setup_context=_expert_choice_setup_context
)


@_eager.custom_op("expert_choice_slots", device_types="cpu")
def _expert_choice_slots_op(indices: Tensor, gates: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """``[E, C]`` choices as the ``[T, E]`` slot layout of ``permute``: ``(weights,
    experts)``, slot ``(t, e)`` holding ``e`` (weight ``gates[e, c]``) when expert ``e``
    chose token ``t``, else -1 (weight 0)."""
    num_experts = indices.shape[0]
    experts = _memory.empty((num_tokens, num_experts), torch.int64)
    weights = _memory.empty((num_tokens, num_experts), gates.dtype)
    _core.expert_choice_slots(
        numpy_view(indices.contiguous()),
        numpy_view(gates.contiguous()),
        numpy_view(experts),
        numpy_view(weights),
        get_num_threads(),
    )
    return weights, experts


@_expert_choice_slots_op.register_fake
def _(indices: Tensor, gates: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    num_experts = indices.shape[0]
    return (
        gates.new_empty(num_tokens, num_experts),
        indices.new_empty(num_tokens, num_experts),
    )


def _expert_choice_slots_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    ctx.save_for_backward(inputs[0])
    # Integer outputs (expert ids, plans) take no gradient: without this, autograd would
    # fill a zero tensor as large as each of them on every backward.
    ctx.set_materialize_grads(False)


def _expert_choice_slots_backward(
    ctx: Any, grad_weights: Tensor | None, _grad_experts: Tensor | None
) -> tuple[Any, ...]:
    if grad_weights is None:
        return None, None, None
    (indices,) = ctx.saved_tensors
    # weights[indices[e, c], e] = gates[e, c]: gather the gradient back. (Indices outside
    # [0, T) were refused on the CPU and counted on the GPU; clamped here so that the
    # gather stays in bounds.)
    safe = indices.clamp(0, max(grad_weights.shape[0] - 1, 0))
    return None, grad_weights.t().gather(1, safe), None


_eager.register_autograd(
    _expert_choice_slots_op, _expert_choice_slots_backward, setup_context=_expert_choice_slots_setup_context
)


class ExpertChoice:
    """The routing decision of ``expert_choice``.

    Attributes:
        indices: ``[E, C]`` int64, the tokens each expert chose, ascending.
        gates: ``[E, C]`` their softmax probabilities (differentiable).
        experts: ``[T, E]`` int64 slot layout for ``permute``: ``e`` where expert ``e`` chose
            the token, else -1. A token appears in 0 to E slots.
        weights: ``[T, E]`` the gates in that layout (0 elsewhere), for ``unpermute``
            (differentiable).

    ``experts`` and ``weights`` are built together on first access and kept: the layout takes
    12 bytes per (token, expert) pair, and code that gathers each expert's tokens with
    ``indices`` and scales them by ``gates`` never needs it. ``weights`` is differentiable
    through ``gates``, so take it before a backward pass frees the graph of ``gates`` (as a
    model does, which dispatches before its loss). The object unpacks like the tuple
    ``(indices, gates, experts, weights)``.
    """

    def __init__(self, indices: Tensor, gates: Tensor, num_tokens: int) -> None:
        self.indices = indices
        self.gates = gates
        self._num_tokens = num_tokens
        self._layout: tuple[Tensor, Tensor] | None = None

    def _slots(self) -> tuple[Tensor, Tensor]:
        if self._layout is None:
            weights, experts = _eager.call("expert_choice_slots", self.indices, self.gates, self._num_tokens)
            self._layout = (experts, weights)
        return self._layout

    @property
    def experts(self) -> Tensor:
        return self._slots()[0]

    @property
    def weights(self) -> Tensor:
        return self._slots()[1]

    def _fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.indices, self.gates, self.experts, self.weights)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._fields())

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Tensor:
        return self._fields()[index]

    def __repr__(self) -> str:
        layout = "built" if self._layout is not None else "not built yet"
        return (
            f"ExpertChoice(indices={self.indices!r}, gates={self.gates!r}, "
            f"num_tokens={self._num_tokens}, slot layout {layout})"
        )


def expert_choice(logits: Tensor, capacity: int) -> ExpertChoice:
    """Expert-choice routing (Zhou et al., 2022): each expert takes the ``capacity`` tokens
    with the highest softmax-over-experts probability for it.

    Scores are the float32 softmax over the E experts of each token; expert ``e`` keeps the
    ``capacity`` largest ``p[t, e]``, equal probabilities going to the lower token index, and
    lists them in ascending token order. ``permute(x, choice.experts, E)`` then gives each
    expert's rows in token order (exactly ``capacity`` per expert), and
    ``unpermute(y_sorted, plan, choice.weights)`` combines them: a token receives 0 to E
    experts. Differentiable with respect to ``logits`` through ``gates`` / ``weights``.

    Args:
        logits: ``[T, E]`` router logits (float32, bfloat16, float16; float64 for checks).
        capacity: tokens per expert, ``0 <= capacity <= T`` (e.g. ``T * capacity_factor / E``).
    """
    logits = check_tensor(logits, "logits", ndim=2, layout="[T, E]", dtypes=FLOAT_DTYPES)
    num_tokens, num_experts = logits.shape
    if num_experts < 1:
        raise ValueError(f"logits: expected at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    capacity = check_int(capacity, "capacity", minimum=0, maximum=num_tokens, maximum_name="tokens T")
    gates, indices = _eager.call("expert_choice", logits, capacity)
    return ExpertChoice(indices, gates, num_tokens)
