"""Dynamic-k (top-p) gating against its reference, and through permute/unpermute."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from reference import topp_gating_reference

ops = torch.ops.sparseroute


@given(
    num_tokens=st.integers(0, 20),
    num_experts=st.integers(1, 16),
    # p = 1 exactly is a knife edge (probabilities sum to 1 up to rounding): tested by value below.
    p=st.floats(0.01, 0.999),
    min_k=st.integers(0, 4),
    max_k=st.integers(1, 16),
    inclusive=st.booleans(),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(num_tokens, num_experts, p, min_k, max_k, inclusive, normalize, seed):
    max_k = min(max_k, num_experts)
    min_k = min(min_k, max_k)
    logits = torch.randn(
        num_tokens, num_experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    logits = logits.float().requires_grad_()
    weights, experts = sparseroute.topp_gating(
        logits, p, min_k=min_k, max_k=max_k, inclusive=inclusive, normalize=normalize
    )
    expected_weights, expected_experts = topp_gating_reference(logits, p, min_k, max_k, inclusive, normalize)
    assert torch.equal(experts, expected_experts)
    torch.testing.assert_close(weights, expected_weights, rtol=2e-6, atol=1e-7)
    kept = (experts >= 0).sum(dim=1)
    assert ((kept >= min_k) & (kept <= max_k)).all()
    if expected_weights.requires_grad:
        grad = torch.randn_like(weights)
        torch.testing.assert_close(
            torch.autograd.grad(weights, logits, grad)[0],
            torch.autograd.grad(expected_weights, logits, grad)[0],
            rtol=1e-5,
            atol=1e-6,
        )


def test_known_values():
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()
    assert sparseroute.topp_gating(logits, 0.6)[1].tolist() == [[1, 2, -1]]
    assert sparseroute.topp_gating(logits, 0.6, inclusive=False)[1].tolist() == [[1, -1, -1]]
    assert sparseroute.topp_gating(logits, 0.5, inclusive=False)[1].tolist() == [[1, -1, -1]]
    assert sparseroute.topp_gating(logits, 0.3, min_k=2)[1].tolist() == [[1, 2, -1]]
    assert sparseroute.topp_gating(logits, 1.0, max_k=2)[1].tolist() == [[1, 2]]
    weights, _ = sparseroute.topp_gating(logits, 0.6, normalize=True)
    torch.testing.assert_close(weights, torch.tensor([[0.625, 0.375, 0.0]]))


@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_and_dispatch_skip_empty_slots(normalize):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: sparseroute.topp_gating(x, 0.7, normalize=normalize)[0], (logits,)
    )
    weights, experts = sparseroute.topp_gating(logits, 0.7, normalize=normalize, max_k=4)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    x_sorted, plan = sparseroute.permute(x, experts, 6)
    assert x_sorted.shape[0] == int((experts >= 0).sum())
    y = sparseroute.unpermute(x_sorted, plan, weights)
    expected = (weights.unsqueeze(-1) * torch.where(experts.unsqueeze(-1) >= 0, x.unsqueeze(1), 0)).sum(1)
    torch.testing.assert_close(y, expected)


def test_opcheck_and_compile():
    logits = torch.randn(12, 8, requires_grad=True)
    for args in [(logits, 0.5, 1, 8, True, False), (logits, 0.9, 2, 4, False, True)]:
        torch.library.opcheck(ops.topp_gating, args)

    def route(logits):
        weights, _ = sparseroute.topp_gating(logits, 0.8, max_k=4, normalize=True)
        return weights

    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits), route(logits))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    weights, experts = sparseroute.topp_gating(logits, 0.7)
    expected_weights, expected_experts = topp_gating_reference(logits.float(), 0.7, 1, 8, True, False)
    assert torch.equal(experts, expected_experts)
    torch.testing.assert_close(weights, expected_weights)


def test_bad_arguments_name_the_argument():
    logits = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"p: expected a probability in \(0, 1\]"):
        sparseroute.topp_gating(logits, 0.0)
    with pytest.raises(ValueError, match=r"p: expected a probability in \(0, 1\]"):
        sparseroute.topp_gating(logits, 1.5)
    with pytest.raises(ValueError, match="min_k: expected 0 <= min_k <= 2"):
        sparseroute.topp_gating(logits, 0.5, min_k=3, max_k=2)
    with pytest.raises(ValueError, match="max_k: expected 1 <= max_k <= 6"):
        sparseroute.topp_gating(logits, 0.5, max_k=7)
    with pytest.raises(sparseroute.InvalidInputError, match="logits"):
        sparseroute.topp_gating(logits * float("nan"), 0.5)
