"""Layer plans (skip / execute / repeat) and plan buckets: against the references, tie
rule, opcheck, torch.compile, edge cases and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute
from sparseroute.ops.layers import EXECUTE, REPEAT, SKIP

from reference import bucket_by_plan_reference, layer_plan_reference


@given(
    batch=st.integers(0, 6),
    layers=st.integers(0, 12),
    dtype=st.sampled_from((torch.float32, torch.bfloat16, torch.float16, torch.float64)),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_plan_matches_reference(batch, layers, dtype, ties, seed):
    logits = torch.randn(batch, layers, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if ties:
        logits = logits.round()  # small integers: exact in every dtype, many ties
    logits = logits.to(dtype)
    plans = sparseroute.layer_plan(logits)
    assert plans.shape == (batch, layers) and plans.dtype == torch.int64
    assert torch.equal(plans, layer_plan_reference(logits))


def test_tie_rule():
    logits = torch.tensor(
        [[1.0, 1.0, 1.0], [2.0, 1.0, 2.0], [0.0, 1.0, 1.0], [0.0, 1.0, 5.0], [2.0, 2.0, 0.0]]
    )
    assert sparseroute.layer_plan(logits).tolist() == [EXECUTE, SKIP, EXECUTE, REPEAT, EXECUTE]


def test_opcheck_and_compile():
    logits = torch.randn(4, 6, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.sparseroute.layer_plan, (logits.detach(),))
    torch._dynamo.reset()
    compiled = torch.compile(sparseroute.layer_plan, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits), sparseroute.layer_plan(logits))


@given(
    batch=st.integers(0, 30),
    layers=st.integers(0, 5),
    choices=st.integers(1, 3),
    max_batch=st.one_of(st.none(), st.integers(1, 8)),
    seed=st.integers(0, 2**16),
)
def test_bucket_by_plan_matches_reference(batch, layers, choices, max_batch, seed):
    plans = torch.randint(0, choices, (batch, layers), generator=torch.Generator().manual_seed(seed))
    buckets = sparseroute.bucket_by_plan(plans, max_batch=max_batch)
    expected = bucket_by_plan_reference(plans, max_batch)
    assert buckets.num_batches == len(expected)
    for i, (requests, plan) in enumerate(expected):
        got_requests, got_plan = buckets.batch(i)
        assert got_requests.tolist() == requests
        assert got_plan.tolist() == plan
        assert torch.equal(plans[got_requests], got_plan.expand(len(requests), -1))
    # Every request lands in exactly one batch.
    assert sorted(buckets.order.tolist()) == list(range(batch))
    assert buckets.plans.shape == (len({tuple(p) for p in plans.tolist()}), layers)


def test_layer_sequence_and_plans_from_layer_plan():
    assert sparseroute.layer_sequence(torch.tensor([EXECUTE, SKIP, REPEAT, EXECUTE])) == [0, 2, 2, 3]
    assert sparseroute.layer_sequence(torch.tensor([], dtype=torch.int64)) == []
    logits = torch.randn(10, 4, 3, generator=torch.Generator().manual_seed(0))
    buckets = sparseroute.bucket_by_plan(sparseroute.layer_plan(logits), max_batch=3)
    requests, plan = buckets.batch(0)
    assert requests[0] == 0 and len(requests) <= 3
    assert len(sparseroute.layer_sequence(plan)) == int(plan.sum())


def test_bad_input():
    with pytest.raises(sparseroute.InvalidInputError, match="logits: expected no NaN"):
        sparseroute.layer_plan(torch.tensor([[[0.0, float("nan"), 1.0]]]))
    with pytest.raises(ValueError, match=r"logits: expected \[B, L, 3\]"):
        sparseroute.layer_plan(torch.randn(2, 4, 2))
    with pytest.raises(TypeError, match="logits: expected dtype"):
        sparseroute.layer_plan(torch.ones(2, 4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"logits: expected a torch\.Tensor"):
        sparseroute.layer_plan([[0.0, 1.0, 2.0]])
    with pytest.raises(
        sparseroute.InvalidInputError, match=r"plans: expected values 0 \(skip\).*got 3 at request 1"
    ):
        sparseroute.bucket_by_plan(torch.tensor([[0, 1], [3, 1]]))
    with pytest.raises(ValueError, match="max_batch: expected 1 <= max_batch"):
        sparseroute.bucket_by_plan(torch.tensor([[0, 1]]), max_batch=0)
    with pytest.raises(ValueError, match=r"plans: expected a 2-D tensor \[B, L\]"):
        sparseroute.bucket_by_plan(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="plan: expected values 0"):
        sparseroute.layer_sequence(torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="i: expected 0 <= i <= 0"):
        sparseroute.bucket_by_plan(torch.tensor([[0, 1]])).batch(1)
