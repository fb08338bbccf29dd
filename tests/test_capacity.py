"""Capacity-constrained dispatch: expert_capacity, permute(capacity=...), drop policies,
the padded layout, and renormalisation after drops."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from reference import capacity_plan_reference, unpermute_reference

ops = torch.ops.sparseroute


def routing(num_tokens, num_experts, k, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if ties:
        logits = logits.round()  # many equal weights
    weights, experts = sparseroute.topk_gating(logits, k)
    return weights, experts


@given(
    num_tokens=st.integers(0, 40),
    num_experts=st.integers(1, 9),
    k=st.integers(1, 3),
    capacity=st.integers(0, 12),
    policy=st.sampled_from(["position", "probs"]),
    pad=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_plan_matches_reference(num_tokens, num_experts, k, capacity, policy, pad, ties, seed):
    k = min(k, num_experts)
    weights, experts = routing(num_tokens, num_experts, k, seed, ties)
    if ties:
        weights = weights.round(decimals=1)
    x = torch.randn(num_tokens, 5, generator=torch.Generator().manual_seed(seed))
    x_sorted, plan = sparseroute.permute(
        x, experts, num_experts, capacity=capacity, weights=weights, drop_policy=policy, pad_to_capacity=pad
    )
    expected = capacity_plan_reference(
        experts, num_experts, capacity, weights if policy == "probs" else None, pad
    )
    for name, value in expected.items():
        assert torch.equal(getattr(plan, name), value), name
    assert int(plan.tokens_per_expert.sum() + plan.dropped.sum()) == num_tokens * k
    assert (plan.tokens_per_expert <= capacity).all()
    rows = plan.row_to_slot
    assert torch.equal(x_sorted[rows >= 0], x[rows[rows >= 0] // k])
    assert torch.equal(x_sorted[rows < 0], torch.zeros_like(x_sorted[rows < 0]))
    y = sparseroute.unpermute(x_sorted, plan, weights)
    assert torch.equal(y, unpermute_reference(x_sorted, plan.slot_to_row, weights))


def test_capacity_at_least_the_demand_drops_nothing():
    _, experts = routing(50, 6, 2)
    x = torch.randn(50, 4)
    dropless, plan = sparseroute.permute(x, experts, 6)
    capped, capped_plan = sparseroute.permute(x, experts, 6, capacity=int(plan.tokens_per_expert.max()))
    assert torch.equal(capped, dropless)
    assert int(capped_plan.dropped.sum()) == 0


def test_all_tokens_to_one_expert():
    experts = torch.zeros(10, 1, dtype=torch.int64)
    weights = torch.linspace(0, 1, 10).unsqueeze(1)
    x = torch.arange(10.0).unsqueeze(1)
    x_sorted, plan = sparseroute.permute(x, experts, 3, capacity=4, weights=weights, drop_policy="probs")
    assert x_sorted.squeeze(1).tolist() == [6.0, 7.0, 8.0, 9.0]
    assert plan.dropped.tolist() == [6, 0, 0]
    x_sorted, plan = sparseroute.permute(x, experts, 3, capacity=4, pad_to_capacity=True)
    assert x_sorted.squeeze(1).tolist() == [0.0, 1.0, 2.0, 3.0] + [0.0] * 8
    assert plan.offsets.tolist() == [0, 4, 8, 12]


@pytest.mark.parametrize("pad", [False, True])
def test_gradients_skip_dropped_slots(generator, pad):
    weights, experts = routing(30, 4, 2, seed=3)
    weights = weights.double().requires_grad_()
    x = torch.randn(30, 6, generator=generator, dtype=torch.float64, requires_grad=True)

    def moe(x, w):
        x_sorted, plan = sparseroute.permute(
            x, experts, 4, capacity=5, weights=weights, drop_policy="probs", pad_to_capacity=pad
        )
        return sparseroute.unpermute(torch.tanh(x_sorted), plan, w), plan

    assert torch.autograd.gradcheck(lambda x, w: moe(x, w)[0], (x, weights))
    out, plan = moe(x, weights)
    dropped_tokens = (plan.slot_to_row < 0).all(dim=1)
    assert dropped_tokens.any()
    grad_x = torch.autograd.grad(out.sum(), x)[0]
    assert torch.equal(grad_x[dropped_tokens], torch.zeros_like(grad_x[dropped_tokens]))


def test_renormalize_after_drop():
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    experts = torch.tensor([[0, 1], [0, 1], [0, 2]])
    x = torch.ones(3, 2)
    x_sorted, plan = sparseroute.permute(x, experts, 3, capacity=2)
    renormalized = sparseroute.renormalize_kept(weights, plan)
    # token 2 lost expert 0 (full) and expert 2 kept it: its only kept weight becomes 1.
    torch.testing.assert_close(renormalized, torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.0, 1.0]]))
    y = sparseroute.unpermute(x_sorted, plan, weights, renormalize_after_drop=True)
    torch.testing.assert_close(y, torch.ones(3, 2))
    everything_dropped = sparseroute.permute(x, experts, 3, capacity=0)[1]
    assert torch.equal(sparseroute.renormalize_kept(weights, everything_dropped), torch.zeros(3, 2))


def megatron_get_capacity(num_tokens, num_experts, capacity_factor, min_capacity=None):
    """Megatron-Core 0.16's formula (moe_utils.get_capacity), restated."""
    capacity = math.ceil((num_tokens / num_experts) * capacity_factor)
    if min_capacity is not None and capacity < min_capacity:
        capacity = min_capacity
    return capacity


@given(
    num_tokens=st.integers(0, 100_000),
    num_experts=st.integers(1, 300),
    k=st.integers(1, 8),
    factor=st.floats(0.01, 8.0),
    min_capacity=st.integers(0, 64),
)
def test_expert_capacity_matches_megatron(num_tokens, num_experts, k, factor, min_capacity):
    k = min(k, num_experts)
    expected = megatron_get_capacity(num_tokens * k, num_experts, factor, min_capacity)
    assert (
        sparseroute.expert_capacity(num_tokens, num_experts, k, factor, min_capacity=min_capacity) == expected
    )
    aligned = sparseroute.expert_capacity(
        num_tokens, num_experts, k, factor, min_capacity=min_capacity, align=16
    )
    assert aligned % 16 == 0 and expected <= aligned < expected + 16


def test_megatron_probs_policy_selects_the_same_slots_without_ties():
    """Megatron's drop_policy="probs": per expert, torch.topk over tokens of the [T, E] map
    of routing probabilities (zero where not routed), and the routing map."""
    weights, experts = routing(64, 8, 2, seed=9)
    probs = torch.zeros(64, 8).scatter(1, experts, weights)
    routing_map = torch.zeros(64, 8, dtype=torch.bool).scatter(1, experts, True)
    capacity = megatron_get_capacity(64 * 2, 8, 0.75)
    top = torch.topk(probs, k=capacity, dim=0, sorted=False).indices
    capacity_mask = torch.zeros_like(routing_map).scatter(0, top, True)
    kept_megatron = routing_map & capacity_mask
    _, plan = sparseroute.permute(
        torch.zeros(64, 1), experts, 8, capacity=capacity, weights=weights, drop_policy="probs"
    )
    kept_ours = torch.zeros(64, 8, dtype=torch.bool)
    kept_ours.scatter_(1, experts, plan.slot_to_row >= 0)
    assert torch.equal(kept_ours, kept_megatron)


def test_opcheck_and_compile_with_capacity():
    weights, experts = routing(12, 4, 2)
    x = torch.randn(12, 3, requires_grad=True)
    for pad in (False, True):
        torch.library.opcheck(ops.permute, (x, experts, 4, None, 3, weights, pad))

    def moe(x):
        x_sorted, plan = sparseroute.permute(x, experts, 4, capacity=5, pad_to_capacity=True)
        return sparseroute.unpermute(x_sorted * 2, plan, weights, renormalize_after_drop=True)

    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), moe(x))


def test_bad_capacity_arguments_name_the_argument():
    weights, experts = routing(4, 4, 2)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="capacity: expected 0 <= capacity"):
        sparseroute.permute(x, experts, 4, capacity=-1)
    with pytest.raises(ValueError, match="drop_policy"):
        sparseroute.permute(x, experts, 4, capacity=2, drop_policy="random")
    with pytest.raises(ValueError, match=r"weights: expected the \[T, k\] routing weights"):
        sparseroute.permute(x, experts, 4, capacity=2, drop_policy="probs")
    with pytest.raises(ValueError, match="weights: expected shape"):
        sparseroute.permute(x, experts, 4, capacity=2, weights=weights[:, :1], drop_policy="probs")
    with pytest.raises(ValueError, match="pad_to_capacity: expected a capacity"):
        sparseroute.permute(x, experts, 4, pad_to_capacity=True)
    with pytest.raises(ValueError, match="num_rows: expected None with pad_to_capacity"):
        sparseroute.permute(x, experts, 4, capacity=2, pad_to_capacity=True, num_rows=8)
    with pytest.raises(sparseroute.InvalidInputError, match="weights"):
        sparseroute.permute(x, experts, 4, capacity=1, weights=weights * float("nan"), drop_policy="probs")
    with pytest.raises(ValueError, match="capacity_factor: expected a finite value > 0"):
        sparseroute.expert_capacity(8, 4, 2, 0.0)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= 4"):
        sparseroute.expert_capacity(8, 4, 5, 1.0)
    with pytest.raises(ValueError, match="renormalize_after_drop: expected weights"):
        x_sorted, plan = sparseroute.permute(x, experts, 4)
        sparseroute.unpermute(x_sorted, plan, None, renormalize_after_drop=True)
