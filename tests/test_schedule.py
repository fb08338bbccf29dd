"""sparsity_schedule: the exact method against brute force, the greedy heuristic's guarantees,
argument handling and every error."""

import itertools
import math
import re
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute
import sparseroute.budget

schedule = sparseroute.budget.sparsity_schedule

# Value kinds: uniform reals; small integers (exact sums, many exact ties); ones and twos
# mixed with values below their rounding unit (sums that differ before rounding and tie after).
VALUE_KINDS = {
    "reals": lambda low, high: st.floats(low, high, allow_nan=False, allow_infinity=False),
    "integers": lambda low, high: st.integers(max(0, math.ceil(low)), 3).map(float),
    "absorbed": lambda low, high: st.sampled_from([0.0, 1e-17, 2e-17, 1.0, 2.0]),
}


@st.composite
def problems(draw):
    """Keyword arguments of a feasible problem with at most 4 layers and 4 ratios, and its
    expanded cost table [L][R] and allowed index ranges for the brute force."""
    num_layers = draw(st.integers(0, 4))
    width = draw(st.integers(1, 4))
    value = VALUE_KINDS[draw(st.sampled_from(sorted(VALUE_KINDS)))]
    if draw(st.booleans()):
        grid = [j / width for j in range(1, width + 1)]
        ratios = None
    else:
        points = draw(
            st.lists(st.floats(0.0, 1.0, exclude_min=True), min_size=width, max_size=width, unique=True)
        )
        grid = sorted(points)
        ratios = grid
    sensitivity = [[draw(value(-5.0, 5.0)) for _ in range(width)] for _ in range(num_layers)]
    if draw(st.booleans()):
        layer_costs = [draw(value(0.0, 10.0)) for _ in range(num_layers)]
        table = [[c * r for r in grid] for c in layer_costs]
    else:
        layer_costs = [[draw(value(0.0, 10.0)) for _ in range(width)] for _ in range(num_layers)]
        table = layer_costs
    bounds = [sorted(draw(st.tuples(st.integers(0, width - 1), st.integers(0, width - 1)))) for _ in table]
    if draw(st.booleans()):
        min_keep, max_keep = 0.0, 1.0
        allowed = [range(width)] * num_layers
    else:
        min_keep = [grid[a] for a, _ in bounds]
        max_keep = [grid[b] for _, b in bounds]
        allowed = [range(a, b + 1) for a, b in bounds]
    min_cost = 0.0
    for costs, indices in zip(table, allowed, strict=True):
        min_cost += min(costs[j] for j in indices)
    max_cost = sum(max(costs) for costs in table)
    budget = draw(
        st.one_of(
            st.just(min_cost),
            st.just(math.inf),
            st.floats(0.0, 1.0).map(lambda f: min_cost + f * (max_cost - min_cost)),
        )
    )
    kwargs = dict(
        layer_costs=torch.tensor(layer_costs, dtype=torch.float64),
        layer_sensitivity=torch.tensor(sensitivity, dtype=torch.float64).reshape(num_layers, width),
        budget=budget,
        ratios=ratios,
        min_keep=min_keep,
        max_keep=max_keep,
    )
    return kwargs, table, sensitivity, allowed


def brute_force(table, sensitivity, allowed, budget):
    """(choice, cost, loss) of the best schedule: every schedule in lexicographic order, sums in
    layer order, keeping the first of least (loss, cost), which is the tie rule."""
    best = None
    for choice in itertools.product(*allowed):
        cost = loss = 0.0
        for layer, j in enumerate(choice):
            cost += table[layer][j]
            loss += sensitivity[layer][j]
        if cost <= budget and (best is None or (loss, cost) < (best[2], best[1])):
            best = (list(choice), cost, loss)
    return best


@given(problem=problems())
def test_exact_matches_brute_force(problem):
    kwargs, table, sensitivity, allowed = problem
    expected_choice, expected_cost, expected_loss = brute_force(table, sensitivity, allowed, kwargs["budget"])
    for method in ("exact", "auto"):
        result = schedule(**kwargs, method=method)
        assert result.choice.tolist() == expected_choice
        assert (result.cost, result.loss, result.exact) == (expected_cost, expected_loss, True)


@given(problem=problems())
def test_greedy_fits_the_budget_and_never_beats_exact(problem):
    kwargs, table, sensitivity, allowed = problem
    greedy = schedule(**kwargs, method="greedy")
    exact = schedule(**kwargs, method="exact")
    assert not greedy.exact
    assert greedy.cost <= kwargs["budget"]
    assert greedy.loss >= exact.loss
    # The reported totals are those of the reported choice, and every choice is allowed.
    cost = loss = 0.0
    for layer, j in enumerate(greedy.choice.tolist()):
        assert j in allowed[layer]
        cost += table[layer][j]
        loss += sensitivity[layer][j]
    assert (greedy.cost, greedy.loss) == (cost, loss)


def test_worked_example():
    # The example of docs/budget.md: half of the full cost, on the default grid
    # (0.25, 0.5, 0.75, 1). Layer 1 gains nothing until it keeps every token.
    costs = torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    sensitivity = torch.tensor(
        [
            [0.4, 0.2, 0.0, 0.0],
            [0.6, 0.6, 0.5, 0.0],
            [0.3, 0.2, 0.0, 0.0],
            [0.7, 0.2, 0.2, 0.0],
        ],
        dtype=torch.float64,
    )
    exact = schedule(costs, sensitivity, 3.0)
    assert exact.ratios.tolist() == [0.5, 1.0, 0.25, 0.5]
    assert exact.choice.tolist() == [1, 3, 0, 1]
    assert (exact.cost, exact.loss, exact.exact) == (3.0, 0.7, True)
    # Greedy's steps are each the most efficient, but never reach layer 1's single big one.
    greedy = schedule(costs, sensitivity, 3.0, method="greedy")
    assert greedy.ratios.tolist() == [0.75, 0.75, 0.25, 0.5]
    assert (greedy.cost, greedy.loss, greedy.exact) == (3.0, 1.0, False)


def test_result_types_and_default_grid():
    result = schedule([1.0, 2.0], [[1.0, 0.5, 0.0], [4.0, 1.0, 0.0]], 2.0)
    assert isinstance(result, sparseroute.budget.SparsitySchedule)
    assert result.ratios.dtype == torch.float64 and result.ratios.shape == (2,)
    assert result.choice.dtype == torch.int64 and result.choice.shape == (2,)
    assert type(result.cost) is float and type(result.loss) is float and type(result.exact) is bool
    grid = torch.arange(1, 4, dtype=torch.float64) / 3
    assert torch.equal(result.ratios, grid[result.choice])


def test_tie_rule_prefers_lower_cost_then_the_lexicographically_smallest_choice():
    # Layer 0: indices 0 and 1 lose the same, index 1 is cheaper. Layer 1: both identical.
    result = schedule([[2.0, 1.0], [1.0, 1.0]], [[3.0, 3.0], [1.0, 1.0]], 10.0)
    assert result.choice.tolist() == [1, 0]
    # Layer 0's index 1 is strictly better (loss 0 < 1e-20), but adding 1.0 rounds both totals
    # to 1.0: a tie in float64, which goes to the lexicographically smaller [0, 0].
    result = schedule([[1.0, 1.0], [1.0, 1.0]], [[1e-20, 0.0], [1.0, 1.0]], 2.0)
    assert result.choice.tolist() == [0, 0] and result.loss == 1.0


def test_scaled_costs_equal_the_measured_table_they_imply():
    generator = torch.Generator().manual_seed(5)
    costs = torch.rand(12, generator=generator, dtype=torch.float64) + 0.5
    sensitivity = torch.rand(12, 6, generator=generator, dtype=torch.float64).sort(dim=1, descending=True)[0]
    grid = torch.arange(1, 7, dtype=torch.float64) / 6
    budget = 0.4 * costs.sum().item()
    for method in ("exact", "greedy"):
        scaled = schedule(costs, sensitivity, budget, method=method)
        measured = schedule(costs[:, None] * grid, sensitivity, budget, method=method)
        assert torch.equal(scaled.choice, measured.choice)
        assert (scaled.cost, scaled.loss) == (measured.cost, measured.loss)


def test_keep_bounds_per_layer_as_scalars_sequences_and_tensors():
    costs = [1.0, 1.0, 1.0]
    sensitivity = [[3.0, 2.0, 1.0, 0.0]] * 3
    unbounded = schedule(costs, sensitivity, 3.0)
    assert unbounded.ratios.tolist() == [1.0, 1.0, 1.0]
    capped = schedule(costs, sensitivity, 3.0, max_keep=[0.5, 1.0, 0.75])
    assert capped.ratios.tolist() == [0.5, 1.0, 0.75]
    floored = schedule(costs, sensitivity, 0.75, min_keep=torch.tensor([0.25, 0.25, 0.25]))
    assert floored.ratios.tolist() == [0.25, 0.25, 0.25]
    both = schedule(costs, sensitivity, 3.0, min_keep=0.5, max_keep=torch.tensor(0.5))
    assert both.ratios.tolist() == [0.5, 0.5, 0.5]
    # A floor above the cheapest ratio raises the minimum achievable cost.
    with pytest.raises(sparseroute.InvalidInputError, match=re.escape("minimum achievable cost 1.5")):
        schedule(costs, sensitivity, 1.0, min_keep=0.5)


def test_inputs_of_any_real_dtype_and_container():
    expected = schedule([1.0, 2.0], [[1.0, 0.0], [2.0, 0.0]], 2.0)
    for costs, sensitivity in [
        (torch.tensor([1, 2]), torch.tensor([[1, 0], [2, 0]])),
        (torch.tensor([1.0, 2.0], dtype=torch.float32), torch.tensor([[1.0, 0.0], [2.0, 0.0]]).bfloat16()),
        (np.array([1.0, 2.0]), np.array([[1.0, 0.0], [2.0, 0.0]])),
        ((1, 2), ((1, 0), (2, 0))),
    ]:
        result = schedule(costs, sensitivity, 2)
        assert torch.equal(result.choice, expected.choice) and result.cost == expected.cost


def test_no_layers_is_an_empty_schedule():
    for method in ("auto", "exact", "greedy"):
        result = schedule([], torch.empty(0, 4), 0.0, method=method)
        assert result.choice.shape == (0,) and result.ratios.shape == (0,)
        assert (result.cost, result.loss, result.exact) == (0.0, 0.0, method != "greedy")
    with pytest.raises(sparseroute.InvalidInputError, match=re.escape("minimum achievable cost 0.0")):
        schedule([], torch.empty(0, 4), -1.0)


def test_state_cap_stops_exact_and_auto_falls_back_to_greedy():
    # Layer l either pays w = l + 1 or loses w: no partial schedule dominates another, so
    # the frontier holds every reachable cost.
    weights = torch.arange(1, 13, dtype=torch.float64)
    costs = torch.stack([torch.zeros(12, dtype=torch.float64), weights], dim=1)
    sensitivity = costs.flip(1)
    message = 'max_states = 4 states for method "exact"'
    with pytest.raises(sparseroute.InvalidInputError, match=re.escape(message)):
        schedule(costs, sensitivity, 39.0, method="exact", max_states=4)
    fallback = schedule(costs, sensitivity, 39.0, max_states=4)
    greedy = schedule(costs, sensitivity, 39.0, method="greedy")
    assert not fallback.exact and torch.equal(fallback.choice, greedy.choice)
    exact = schedule(costs, sensitivity, 39.0)
    assert exact.exact and (exact.cost, exact.loss) == (39.0, 39.0)


def _model_sized(num_layers, width, seed):
    generator = torch.Generator().manual_seed(seed)
    costs = 1.0 + torch.rand(num_layers, generator=generator, dtype=torch.float64)
    grid = torch.arange(1, width + 1, dtype=torch.float64) / width
    weight = torch.rand(num_layers, 1, generator=generator, dtype=torch.float64)
    noise = torch.rand(num_layers, width, generator=generator, dtype=torch.float64)
    return costs, weight * (1 - grid) ** 2 + 0.01 * noise, 0.5 * costs.sum().item()


def test_model_sized_problems_solve_exactly_and_quickly():
    costs, sensitivity, budget = _model_sized(61, 8, seed=0)
    start = time.perf_counter()
    exact = schedule(costs, sensitivity, budget, method="exact")
    assert time.perf_counter() - start < 2.0
    greedy = schedule(costs, sensitivity, budget, method="greedy")
    assert exact.exact and exact.cost <= budget and exact.loss <= greedy.loss
    costs, sensitivity, budget = _model_sized(128, 16, seed=1)
    exact = schedule(costs, sensitivity, budget)
    greedy = schedule(costs, sensitivity, budget, method="greedy")
    assert exact.exact and exact.cost <= budget and greedy.cost <= budget and exact.loss <= greedy.loss


def test_same_result_on_any_thread_count():
    costs, sensitivity, budget = _model_sized(40, 8, seed=2)
    sparseroute.set_num_threads(1)
    one = schedule(costs, sensitivity, budget)
    sparseroute.set_num_threads(4)
    four = schedule(costs, sensitivity, budget)
    assert torch.equal(one.choice, four.choice) and (one.cost, one.loss) == (four.cost, four.loss)


GOOD = dict(layer_costs=[1.0, 1.0], layer_sensitivity=[[1.0, 0.0], [1.0, 0.0]], budget=2.0)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (dict(layer_sensitivity=[1.0, 0.0]), ValueError, "layer_sensitivity: expected a 2-D tensor [L, R]"),
        (dict(layer_sensitivity=torch.empty(2, 0)), ValueError, "with R >= 1 ratios, got shape (2, 0)"),
        (
            dict(layer_costs=[1.0, 1.0, 1.0]),
            ValueError,
            "layer_costs: expected [L] = (2,) or [L, R] = (2, 2)",
        ),
        (dict(layer_costs=[[1.0, 1.0]]), ValueError, "got shape (1, 2)"),
        (
            dict(layer_costs=[-1.0, 1.0]),
            ValueError,
            "layer_costs: expected finite non-negative costs, got -1.0",
        ),
        (
            dict(layer_costs=[[1.0, 1.0], [math.nan, 1.0]]),
            ValueError,
            "layer_costs: expected finite non-negative costs, got NaN at layer 1, ratio index 0",
        ),
        (
            dict(layer_sensitivity=[[1.0, math.inf], [1.0, 0.0]]),
            ValueError,
            "layer_sensitivity: expected finite values, got inf at layer 0, ratio index 1",
        ),
        (dict(ratios=[0.5]), ValueError, "ratios: expected [R] = (2,)"),
        (dict(ratios=[0.0, 1.0]), ValueError, "ratios: expected keep-ratios in (0, 1], got 0.0 at index 0"),
        (dict(ratios=[0.5, 1.5]), ValueError, "ratios: expected keep-ratios in (0, 1], got 1.5 at index 1"),
        (
            dict(ratios=[1.0, 0.5]),
            ValueError,
            "ratios: expected a strictly increasing grid, got 1.0 then 0.5",
        ),
        (dict(min_keep=-0.1), ValueError, "min_keep: expected values in [0, 1], got -0.1 for layer 0"),
        (dict(max_keep=[1.0, 2.0]), ValueError, "max_keep: expected values in [0, 1], got 2.0 for layer 1"),
        (dict(min_keep=0.8, max_keep=0.6), ValueError, "max_keep: expected max_keep >= min_keep"),
        (
            dict(min_keep=[0.0, 0.6], max_keep=[1.0, 0.9]),
            ValueError,
            "min_keep, max_keep: expected at least one grid ratio r with min_keep <= r <= max_keep in every "
            "layer, got none in [0.6, 0.9] for layer 1",
        ),
        (dict(min_keep=[0.0, 0.5, 1.0]), ValueError, "min_keep: expected a number or [L] = (2,) values"),
        (
            dict(budget=0.5),
            ValueError,
            "budget: expected at least the minimum achievable cost 1.0 (every layer at its cheapest allowed "
            "ratio), got 0.5",
        ),
        (dict(budget=math.nan), ValueError, "budget: expected a number, got NaN"),
        (dict(budget="2"), TypeError, "budget: expected a real number, got str"),
        (dict(budget=True), TypeError, "budget: expected a real number, got bool"),
        (dict(method="fast"), ValueError, 'method: expected "auto", "exact" or "greedy", got \'fast\''),
        (dict(max_states=0), ValueError, "max_states: expected 1 <= max_states, got 0"),
        (
            dict(layer_costs=torch.tensor([True, False])),
            TypeError,
            "layer_costs: expected a real-valued tensor",
        ),
        (dict(layer_costs="cheap"), TypeError, "layer_costs: expected a tensor or a (nested) sequence"),
        (dict(layer_sensitivity=[[1.0, 0.0], [1.0]]), ValueError, "layer_sensitivity: expected a tensor"),
        (
            dict(layer_sensitivity=[[1e308, 0.0], [1e308, 0.0]]),
            ValueError,
            "layer_sensitivity: expected magnitudes whose sum over layers stays far from float64 overflow",
        ),
    ],
)
def test_errors_name_the_argument(changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        schedule(**{**GOOD, **changes})


def test_value_errors_are_invalid_input_errors():
    with pytest.raises(sparseroute.InvalidInputError):
        schedule(**{**GOOD, "budget": 0.5})
