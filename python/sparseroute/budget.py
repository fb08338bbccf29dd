"""How many tokens each layer keeps, under one compute budget for the whole model.

Token pruning and Mixture-of-Depths models process only a fraction of the tokens in each
layer. Layers differ both in what they cost and in how much the model suffers when they
keep fewer tokens, so a single global keep-ratio wastes compute: some layers can drop most
of their tokens almost for free while others cannot. ``sparsity_schedule`` picks one
keep-ratio per layer from a grid so that the summed loss increase is as small as possible
while the summed cost stays within a budget (a multiple-choice knapsack), either exactly
(dynamic programming over Pareto frontiers) or with a greedy heuristic.

This is a host-side planner run once per model or budget, not a ``torch.library`` op: it
reads tensor values and is neither traced by ``torch.compile`` nor differentiable.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Final, Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor

from sparseroute import _core
from sparseroute.ops._checks import check_int

__all__ = [
    "MAX_FRONTIER_STATES",
    "BudgetMeter",
    "BudgetReport",
    "SparsitySchedule",
    "sparsity_schedule",
]

MAX_FRONTIER_STATES: Final = 1 << 20
"""The default cap on the Pareto frontier of the exact method: states per layer (2**20).
Memory is about 40 bytes per state of the frontier being built plus 8 bytes per state kept
for every layer (back-pointers)."""

TensorLike: TypeAlias = Tensor | Sequence[float] | Sequence[Sequence[float]]
"""A tensor (any real dtype, any device) or a (nested) sequence of numbers."""


class SparsitySchedule(NamedTuple):
    """The result of ``sparsity_schedule``.

    Attributes:
        ratios: ``[L]`` float64, the keep-ratio chosen for each layer (``grid[choice]``).
        choice: ``[L]`` int64, the index of that ratio in the grid.
        cost: the total cost, ``sum_l cost[l, choice[l]]`` (float64, summed in layer order).
        loss: the total loss increase, ``sum_l layer_sensitivity[l, choice[l]]`` (likewise).
        exact: True when the exact method produced the schedule (it is then optimal under
            the tie rule); False for the greedy heuristic, including ``"auto"``'s fallback.
    """

    ratios: Tensor
    choice: Tensor
    cost: float
    loss: float
    exact: bool


def sparsity_schedule(
    layer_costs: TensorLike,
    layer_sensitivity: TensorLike,
    budget: float,
    *,
    ratios: TensorLike | None = None,
    min_keep: float | TensorLike = 0.0,
    max_keep: float | TensorLike = 1.0,
    method: Literal["auto", "exact", "greedy"] = "auto",
    max_states: int = MAX_FRONTIER_STATES,
) -> SparsitySchedule:
    """Choose one keep-ratio per layer minimising the total loss increase within ``budget``.

    Problem: pick one grid index ``j_l`` for every layer ``l`` minimising
    ``sum_l layer_sensitivity[l, j_l]`` subject to ``sum_l cost[l, j_l] <= budget``, where
    only indices with ``min_keep[l] <= ratios[j] <= max_keep[l]`` may be chosen. Both sums
    are float64, accumulated in layer order (``((0 + v_0) + v_1) + ...``); feasibility and
    every comparison use exactly these sums, and they are the returned ``cost`` and ``loss``.

    Tie rule: among feasible schedules of minimal loss, the one of lower cost; among those
    equal in both, the lexicographically smallest ``choice`` (compared from layer 0). The
    result does not depend on the thread count or the run.

    Args:
        layer_costs: ``[L]``: the compute cost of each layer when it keeps all its tokens;
            at keep-ratio ``r`` layer ``l`` costs ``layer_costs[l] * r`` (a float64
            product). Or ``[L, R]``: measured costs, ``cost[l, j]`` of layer ``l`` at grid
            ratio ``j``, used as given. Finite and non-negative, any unit.
        layer_sensitivity: ``[L, R]``: the loss increase when layer ``l`` keeps
            ``ratios[j]``; any finite real (a negative value is a gain).
        budget: the largest allowed total cost, in the units of ``layer_costs``;
            ``float("inf")`` means unconstrained.
        ratios: ``[R]``: the grid of keep-ratios, strictly increasing, in ``(0, 1]``.
            Default ``torch.arange(1, R + 1, dtype=torch.float64) / R``.
        min_keep, max_keep: the smallest and largest keep-ratio each layer may choose,
            in ``[0, 1]`` with ``min_keep <= max_keep``: a number for every layer or one
            value per layer (``[L]``).
        method: ``"exact"``: dynamic programming over Pareto frontiers of (cost, loss)
            partial schedules with back-pointers, pruned by the budget, by dominance and by
            a Lagrangian bound against the greedy schedule, all with margins for float64
            rounding; exact for real-valued costs (no discretisation). It raises when a
            frontier exceeds ``max_states``.
            ``"greedy"``: a heuristic, not exact: start every layer at its cheapest allowed
            ratio (equal costs: lower loss, then lower index), then repeatedly apply the
            single-layer change to any allowed ratio that decreases the loss with the best
            loss decrease per unit of cost increase and still fits the budget; stop when no
            loss-decreasing change fits. Changes that do not increase the cost come first
            (larger decrease, then larger saving); equal ratios go to the larger decrease;
            full ties to the lower layer, then the lower index.
            ``"auto"`` (default): exact, or greedy when a frontier exceeds ``max_states``.
        max_states: the largest Pareto frontier (states per layer) the exact method may
            build; default ``MAX_FRONTIER_STATES`` (2**20).

    Returns:
        ``SparsitySchedule(ratios, choice, cost, loss, exact)``. With ``L = 0`` layers the
        schedule is empty with cost 0.0 and loss 0.0 (a budget below 0 is infeasible).

    Raises:
        TypeError: an argument of the wrong type (a complex or bool tensor, a string).
        ValueError: shapes that disagree (``layer_sensitivity`` not ``[L, R]`` with
            ``R >= 1``, ``layer_costs`` neither ``[L]`` nor ``[L, R]``, ``ratios`` not
            ``[R]``, keep bounds not ``[L]``), an unknown ``method``, ``max_states < 1``.
        InvalidInputError: (a ``ValueError``) non-finite or negative costs, non-finite
            sensitivities, a grid not strictly increasing in ``(0, 1]``, keep bounds outside
            ``[0, 1]`` or crossed, a layer whose bounds allow no grid ratio, a NaN budget, a
            budget below the minimum achievable cost (named in the message), or
            ``method="exact"`` on a frontier larger than ``max_states``.
    """
    sensitivity = _float64(layer_sensitivity, "layer_sensitivity", "[L, R]")
    if sensitivity.dim() != 2 or sensitivity.shape[1] == 0:
        raise ValueError(
            "layer_sensitivity: expected a 2-D tensor [L, R] with R >= 1 ratios, "
            f"got shape {tuple(sensitivity.shape)}"
        )
    num_layers, width = sensitivity.shape
    costs = _float64(layer_costs, "layer_costs", "[L] or [L, R]")
    if tuple(costs.shape) not in ((num_layers,), (num_layers, width)):
        raise ValueError(
            f"layer_costs: expected [L] = ({num_layers},) or [L, R] = ({num_layers}, {width}) "
            f"(from layer_sensitivity), got shape {tuple(costs.shape)}"
        )
    if ratios is None:
        grid = torch.arange(1, width + 1, dtype=torch.float64) / width
    else:
        grid = _float64(ratios, "ratios", "[R]")
        if tuple(grid.shape) != (width,):
            raise ValueError(
                f"ratios: expected [R] = ({width},) (from layer_sensitivity), got shape {tuple(grid.shape)}"
            )
    low = _keep_bound(min_keep, "min_keep", num_layers)
    high = _keep_bound(max_keep, "max_keep", num_layers)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget: expected a real number, got {type(budget).__name__}")
    if method not in ("auto", "exact", "greedy"):
        raise ValueError(f'method: expected "auto", "exact" or "greedy", got {method!r}')
    check_int(max_states, "max_states", minimum=1)

    choice, cost, loss, exact = _core.sparsity_schedule(
        costs.numpy(),
        sensitivity.numpy(),
        grid.numpy(),
        low.numpy(),
        high.numpy(),
        float(budget),
        method,
        max_states,
    )
    chosen = torch.from_numpy(choice)
    return SparsitySchedule(ratios=grid[chosen], choice=chosen, cost=cost, loss=loss, exact=exact)


def _float64(value: object, name: str, layout: str) -> Tensor:
    """``value`` as a contiguous float64 CPU tensor; integer and floating dtypes convert."""
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name}: expected a real-valued tensor {layout}, got dtype {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.float64).contiguous()
    expected = f"{name}: expected a tensor or a (nested) sequence of numbers {layout}"
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{expected}, got {type(value).__name__}")
    try:
        return torch.as_tensor(value, dtype=torch.float64).contiguous()
    except ValueError as err:  # ragged nesting
        raise ValueError(f"{expected}, got {err}") from err
    except (TypeError, RuntimeError) as err:  # elements that are not numbers
        raise TypeError(f"{expected}, got {type(value).__name__} ({err})") from err


def _keep_bound(value: float | TensorLike, name: str, num_layers: int) -> Tensor:
    """A keep bound broadcast to ``[L]`` float64: a number (or 0-d tensor) applies to every layer."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.full((num_layers,), float(value), dtype=torch.float64)
    bound = _float64(value, name, "[L]")
    if bound.dim() == 0:
        return bound.expand(num_layers).contiguous()
    if tuple(bound.shape) != (num_layers,):
        raise ValueError(
            f"{name}: expected a number or [L] = ({num_layers},) values (from layer_sensitivity), "
            f"got shape {tuple(bound.shape)}"
        )
    return bound


# --- budget accounting ---------------------------------------------------------------------


class BudgetReport(NamedTuple):
    """Realised compute of conditional layers against a budget (see ``BudgetMeter``).

    Attributes:
        kept: ``[L]`` float64, the tokens (or layer executions) each layer processed.
        offered: ``[L]`` float64, the tokens (or requests) each layer could have processed.
        ratios: ``[L]`` float64, ``kept / offered`` (0 where nothing was offered): the
            realised keep-ratio (for layer plans, executions per request, up to 2).
        planned: ``[L]`` float64, the planned keep-ratios, or None without a schedule.
        costs: ``[L]`` float64, ``layer_costs * ratios``: the realised cost per layer.
        cost: ``costs.sum()``, the realised total (layer order).
        budget: the budget compared against, or None.
    """

    kept: Tensor
    offered: Tensor
    ratios: Tensor
    planned: Tensor | None
    costs: Tensor
    cost: float
    budget: float | None

    @property
    def over_budget(self) -> float:
        """``cost - budget`` (negative: under budget); NaN without a budget."""
        return float("nan") if self.budget is None else self.cost - self.budget

    def __str__(self) -> str:
        header = "| layer | kept | offered | ratio | planned | cost |"
        lines = [header, "|---|---|---|---|---|---|"]
        for layer in range(self.kept.shape[0]):
            planned = "" if self.planned is None else f"{float(self.planned[layer]):.3f}"
            lines.append(
                f"| {layer} | {float(self.kept[layer]):g} | {float(self.offered[layer]):g} | "
                f"{float(self.ratios[layer]):.3f} | {planned} | {float(self.costs[layer]):.4g} |"
            )
        total = f"realised cost {self.cost:.6g}"
        if self.budget is not None:
            total += f" of budget {self.budget:.6g} ({self.cost / self.budget:.1%})" if self.budget else ""
        return "\n".join([*lines, total])


class BudgetMeter:
    """Accumulates what conditional layers actually processed, to compare with a budget.

    ``layer_costs[l]`` is the cost of layer ``l`` when it processes every token (the ``[L]``
    form of ``sparsity_schedule``'s ``layer_costs``); a layer that processes a fraction
    ``r`` of its tokens costs ``layer_costs[l] * r``. Counts are kept as tensors on the
    device they arrive on, so recording never synchronises; ``report()`` does, once.

        meter = BudgetMeter(costs, schedule=schedule)        # or budget=...
        meter.record_tokens(layer, selection, lengths)        # per MoD layer and step
        meter.record_plans(plans)                             # or: layer plans [B, L]
        print(meter.report())
    """

    def __init__(
        self,
        layer_costs: TensorLike,
        *,
        budget: float | None = None,
        schedule: SparsitySchedule | None = None,
    ) -> None:
        costs = _float64(layer_costs, "layer_costs", "[L]")
        if costs.dim() != 1:
            raise ValueError(
                f"layer_costs: expected [L] (the cost of each layer at full keep), got {tuple(costs.shape)}"
            )
        if not bool(torch.isfinite(costs).all()) or bool((costs < 0).any()):
            raise ValueError("layer_costs: expected finite values >= 0")
        if schedule is not None and schedule.ratios.shape != costs.shape:
            raise ValueError(
                f"schedule: expected ratios for L = {costs.shape[0]} layers, "
                f"got {tuple(schedule.ratios.shape)}"
            )
        if budget is None and schedule is not None:
            budget = float((costs * schedule.ratios).sum())
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not float(budget) >= 0
        ):
            raise ValueError(f"budget: expected a number >= 0 or None, got {budget!r}")
        self.layer_costs = costs
        self.budget = None if budget is None else float(budget)
        self.schedule = schedule
        self._kept: list[Tensor | float] = [0.0] * costs.shape[0]
        self._offered: list[Tensor | float] = [0.0] * costs.shape[0]

    @property
    def num_layers(self) -> int:
        return int(self.layer_costs.shape[0])

    def _layer(self, layer: int) -> int:
        return check_int(layer, "layer", minimum=0, maximum=self.num_layers - 1)

    def record(self, layer: int, kept: Tensor | float, offered: Tensor | float) -> None:
        """Add ``kept`` processed tokens out of ``offered`` to ``layer``'s counts."""
        layer = self._layer(layer)
        self._kept[layer] = self._kept[layer] + kept
        self._offered[layer] = self._offered[layer] + offered

    def record_tokens(self, layer: int, mask: Tensor, lengths: Tensor | None = None) -> None:
        """Record one step of a token-selecting layer: ``mask`` ``[B, S]`` bool (a
        ``TokenSelection``'s ``mask``, or the selection itself) of the positions it kept, out
        of ``lengths.sum()`` valid positions (all ``B * S`` without ``lengths``)."""
        mask = getattr(mask, "mask", mask)
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            raise ValueError("mask: expected a [B, S] bool tensor (or a TokenSelection)")
        offered: Tensor | float = float(mask.numel()) if lengths is None else lengths.sum()
        self.record(layer, mask.sum(), offered)

    def record_plans(self, plans: Tensor) -> None:
        """Record one step of layer plans ``[B, L]`` (0 skip, 1 execute, 2 repeat): layer
        ``l`` ran ``plans[:, l].sum()`` times for ``B`` requests."""
        if not isinstance(plans, Tensor) or plans.dim() != 2 or plans.shape[1] != self.num_layers:
            raise ValueError(f"plans: expected [B, L] with L = {self.num_layers}")
        executions = plans.sum(dim=0)
        for layer in range(self.num_layers):
            self.record(layer, executions[layer], float(plans.shape[0]))

    def reset(self) -> None:
        self._kept = [0.0] * self.num_layers
        self._offered = [0.0] * self.num_layers

    def report(self) -> BudgetReport:
        """The counts so far against the budget (one host synchronisation)."""
        kept = torch.tensor([float(v) for v in self._kept], dtype=torch.float64)
        offered = torch.tensor([float(v) for v in self._offered], dtype=torch.float64)
        ratios = torch.where(offered > 0, kept / offered.clamp_min(1e-300), torch.zeros_like(kept))
        costs = self.layer_costs * ratios
        total = sum(costs.tolist())  # in layer order, as sparsity_schedule sums its costs
        planned = None if self.schedule is None else self.schedule.ratios.to(torch.float64)
        return BudgetReport(kept, offered, ratios, planned, costs, float(total), self.budget)
