"""Expert-choice routing: selection, gradient, and dispatch/combine through permute."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from reference import expert_choice_reference


@given(
    num_tokens=st.integers(1, 30),
    num_experts=st.integers(1, 10),
    capacity_share=st.floats(0.0, 1.0),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(num_tokens, num_experts, capacity_share, ties, seed):
    capacity = round(capacity_share * num_tokens)
    logits = torch.randn(
        num_tokens, num_experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    if ties:
        # Identical rows: every token ties with every other for each expert, and both
        # implementations compute identical rows identically (rows that are only equal in
        # exact arithmetic, such as permutations, may differ in the last bit).
        logits = logits[:1].round().expand(num_tokens, num_experts).clone()
    logits.requires_grad_()
    choice = sparseroute.expert_choice(logits, capacity)
    indices, gates = expert_choice_reference(logits, capacity)
    assert torch.equal(choice.indices, indices)
    torch.testing.assert_close(choice.gates, gates)
    if capacity:
        grad = torch.randn_like(gates)
        torch.testing.assert_close(
            torch.autograd.grad(choice.gates, logits, grad)[0], torch.autograd.grad(gates, logits, grad)[0]
        )
    # The slot layout: every expert appears exactly `capacity` times.
    assert torch.equal((choice.experts >= 0).sum(0), torch.full((num_experts,), capacity))


def test_dispatch_and_combine_through_permute():
    g = torch.Generator().manual_seed(1)
    num_tokens, num_experts, capacity, hidden = 12, 4, 5, 6
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(num_tokens, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(num_experts, hidden, hidden, generator=g, dtype=torch.float64)

    def layer(logits, x):
        choice = sparseroute.expert_choice(logits, capacity)
        x_sorted, plan = sparseroute.permute(x, choice.experts, num_experts)
        assert plan.tokens_per_expert.tolist() == [capacity] * num_experts
        y_sorted = torch.cat(
            [torch.tanh(x_sorted[e * capacity : (e + 1) * capacity] @ w[e]) for e in range(num_experts)]
        )
        return sparseroute.unpermute(y_sorted, plan, choice.weights), choice

    y, choice = layer(logits, x)
    expected = torch.zeros_like(x)
    for e in range(num_experts):
        for c in range(capacity):
            t = int(choice.indices[e, c])
            expected[t] += choice.gates[e, c] * torch.tanh(x[t] @ w[e])
    torch.testing.assert_close(y, expected)
    # Tokens nobody chose get zeros.
    unchosen = (choice.experts < 0).all(dim=1)
    assert torch.equal(y[unchosen], torch.zeros_like(y[unchosen]))
    assert torch.autograd.gradcheck(lambda z, x: layer(z, x)[0], (logits, x))


def test_opcheck_compile_and_dtypes():
    logits = torch.randn(16, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.sparseroute.expert_choice, (logits, 6))
    gates, indices = torch.ops.sparseroute.expert_choice(logits.detach(), 6)
    torch.library.opcheck(torch.ops.sparseroute.expert_choice_slots, (indices, gates.requires_grad_(), 16))
    torch.library.opcheck(
        torch.ops.sparseroute.expert_choice_backward, (logits.detach(), indices, torch.randn(4, 6))
    )
    with pytest.raises(ValueError, match="indices"):
        torch.ops.sparseroute.expert_choice_slots(indices, gates.detach(), 3)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda z: sparseroute.expert_choice(z, 6).weights, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(logits), sparseroute.expert_choice(logits, 6).weights)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.detach().to(dtype)
        choice = sparseroute.expert_choice(low, 6)
        indices, gates = expert_choice_reference(low.float(), 6)
        assert torch.equal(choice.indices, indices)
        torch.testing.assert_close(choice.gates, gates)
    probs = F.softmax(logits.detach(), -1)
    full = sparseroute.expert_choice(logits, 16)
    torch.testing.assert_close(full.weights, probs)


def test_slot_layout_is_built_on_first_access_and_kept():
    logits = torch.randn(20, 4, requires_grad=True)
    choice = sparseroute.expert_choice(logits, 5)
    assert "not built yet" in repr(choice)
    choice.gates.sum().backward(retain_graph=True)  # gates alone: no layout needed
    assert "not built yet" in repr(choice)
    experts = choice.experts
    assert "slot layout built" in repr(choice)
    assert choice.experts is experts and choice.weights is choice.weights
    indices, gates, experts_again, weights = choice
    assert indices is choice.indices and gates is choice.gates and experts_again is experts
    assert len(choice) == 4 and choice[3] is weights and list(choice)[1] is gates
    # The layout is the gates scattered to [T, E]; its gradient reaches the logits.
    expected = torch.zeros(20, 4).scatter(0, choice.indices.T, choice.gates.detach().T)
    assert torch.equal(weights.detach(), expected)
    (grad,) = torch.autograd.grad(weights.sum(), logits)
    assert grad.shape == logits.shape


def test_edge_cases_and_errors():
    empty = sparseroute.expert_choice(torch.randn(5, 3), 0)
    assert empty.indices.shape == (3, 0) and bool((empty.experts == -1).all())
    one = sparseroute.expert_choice(torch.randn(1, 1), 1)
    assert one.indices.tolist() == [[0]] and one.gates.tolist() == [[1.0]]
    with pytest.raises(ValueError, match="capacity: expected 0 <= capacity <= 5"):
        sparseroute.expert_choice(torch.randn(5, 3), 6)
    with pytest.raises(sparseroute.InvalidInputError, match="logits"):
        sparseroute.expert_choice(torch.full((4, 2), float("nan")), 2)
