"""Sinkhorn balancing against Megatron-Core's formula."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from reference import megatron_sinkhorn


@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 12),
    tol=st.sampled_from([1e-2, 1e-4, 1e-6]),
    seed=st.integers(0, 2**16),
)
def test_matches_megatron(num_tokens, num_experts, tol, seed):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    expected = megatron_sinkhorn(logits.double(), tol=tol)
    actual = sparseroute.sinkhorn(logits, tol=tol)
    assert actual.dtype == torch.float32
    # float32 against a float64 run of the same iteration: the stopping point may differ by
    # one iteration at the tolerance boundary, which moves values by about tol.
    torch.testing.assert_close(actual.double(), expected, rtol=1e-3, atol=max(10 * tol, 1e-5) / num_tokens)


def test_columns_balance_and_selection_spreads_load():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(512, 8, generator=g)
    logits[:, 0] += 3.0  # a router that prefers expert 0
    scores = sparseroute.sinkhorn(logits, tol=1e-6)
    torch.testing.assert_close(scores.sum(0), torch.full((8,), 1 / 8), rtol=1e-3, atol=1e-5)
    plain = torch.bincount(logits.argmax(-1), minlength=8)
    balanced = torch.bincount(scores.argmax(-1), minlength=8)
    assert balanced.max() < plain.max()


def test_iteration_cap_and_opcheck():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        sparseroute.sinkhorn(logits, iters=2, tol=0.0),
        megatron_sinkhorn(logits, tol=0.0, iters=2),
        rtol=1e-5,
        atol=1e-7,
    )
    torch.library.opcheck(torch.ops.sparseroute.sinkhorn, (logits, 3, 1e-4))
    torch.library.opcheck(torch.ops.sparseroute.sinkhorn, (logits.bfloat16(), None, 1e-4))


def test_edge_cases_and_errors():
    assert sparseroute.sinkhorn(torch.zeros(0, 4)).shape == (0, 4)
    torch.testing.assert_close(
        sparseroute.sinkhorn(torch.zeros(3, 1)), torch.full((3, 1), 1 / 3), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(sparseroute.InvalidInputError, match="exp\\(logits\\) must not overflow"):
        sparseroute.sinkhorn(torch.full((2, 2), 100.0))
    with pytest.raises(ValueError, match="iters: expected 1 <= iters"):
        sparseroute.sinkhorn(torch.zeros(2, 2), iters=0)
    with pytest.raises(ValueError, match="tol"):
        sparseroute.sinkhorn(torch.zeros(2, 2), tol=-1.0)
