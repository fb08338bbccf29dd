"""Budget accounting: what conditional layers actually processed against a budget."""

import pytest
import torch

import sparseroute
from sparseroute.budget import BudgetMeter, sparsity_schedule


def test_token_layers_against_a_schedule():
    costs = torch.tensor([4.0, 2.0, 1.0])
    sensitivity = torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.5, 0.0], [0.2, 0.1, 0.0]])
    schedule = sparsity_schedule(costs, sensitivity, 4.0, ratios=[0.25, 0.5, 1.0])
    meter = BudgetMeter(costs, schedule=schedule)
    assert meter.budget == pytest.approx(float((costs.double() * schedule.ratios).sum()))
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([64, 40])
    for _step in range(3):
        for layer in range(3):
            selection = sparseroute.select_tokens(
                torch.randn(2, 64, generator=g), float(schedule.ratios[layer]), lengths=lengths
            )
            meter.record_tokens(layer, selection, lengths)
    report = meter.report()
    # A fraction keeps ceil(f * length) of each sequence's valid tokens.
    for layer in range(3):
        f = float(schedule.ratios[layer])
        expected = sum(sparseroute.token_capacity(f, int(n)) for n in lengths) / int(lengths.sum())
        assert float(report.ratios[layer]) == pytest.approx(expected)
        assert float(report.offered[layer]) == 3 * 104
    assert report.cost == pytest.approx(float((costs.double() * report.ratios).sum()))
    assert torch.equal(report.planned, schedule.ratios)
    assert "| layer | kept | offered | ratio | planned | cost |" in str(report)
    assert report.over_budget == pytest.approx(report.cost - meter.budget)
    meter.reset()
    assert meter.report().cost == 0.0


def test_layer_plans_count_executions():
    meter = BudgetMeter([1.0, 1.0, 2.0], budget=3.0)
    plans = torch.tensor([[1, 0, 2], [1, 1, 0], [1, 2, 1], [1, 0, 1]])
    meter.record_plans(plans)
    report = meter.report()
    assert report.ratios.tolist() == [1.0, 0.75, 1.0]
    assert report.cost == pytest.approx(1.0 + 0.75 + 2.0)
    assert report.over_budget == pytest.approx(0.75)


def test_bad_input():
    with pytest.raises(ValueError, match=r"layer_costs: expected \[L\]"):
        BudgetMeter([[1.0]])
    with pytest.raises(ValueError, match="layer_costs: expected finite values >= 0"):
        BudgetMeter([1.0, -1.0])
    with pytest.raises(ValueError, match="budget: expected a number >= 0"):
        BudgetMeter([1.0], budget=-2.0)
    meter = BudgetMeter([1.0, 2.0])
    with pytest.raises(ValueError, match="layer: expected 0 <= layer <= 1"):
        meter.record(2, 1, 1)
    with pytest.raises(ValueError, match=r"plans: expected \[B, L\] with L = 2"):
        meter.record_plans(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask: expected a \[B, S\] bool tensor"):
        meter.record_tokens(0, torch.zeros(3, dtype=torch.bool))
    assert meter.report().budget is None
