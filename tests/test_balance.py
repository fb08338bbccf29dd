"""Load-balancing losses, the z-loss, routing statistics and the expert-bias controller."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from reference import (
    hf_mixtral_load_balancing_loss,
    load_balancing_loss_reference,
    megatron_sequence_loss,
    megatron_switch_loss,
    normalized_scores_reference,
)

ops = torch.ops.sparseroute


def routed(num_tokens, num_experts, k, seed=0, dtype=torch.float32, score="softmax"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64).to(dtype)
    _, experts = sparseroute.topk_gating(logits, k, score=score)
    return logits, experts


@given(
    batch=st.integers(1, 4),
    seq_len=st.integers(1, 9),
    num_experts=st.integers(1, 12),
    k=st.integers(1, 4),
    score=st.sampled_from(["softmax", "sigmoid"]),
    scope=st.sampled_from(["batch", "sequence"]),
    scale=st.sampled_from(["megatron", "switch"]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_loss_matches_reference(batch, seq_len, num_experts, k, score, scope, scale, masked, seed):
    k = min(k, num_experts)
    logits, experts = routed(batch * seq_len, num_experts, k, seed, torch.float64, score)
    mask = None
    if masked:
        mask = torch.rand(batch, seq_len, generator=torch.Generator().manual_seed(seed)) > 0.3
    logits.requires_grad_()
    actual = sparseroute.load_balancing_loss(
        logits, experts, score=score, scope=scope, seq_len=seq_len, attention_mask=mask, scale=scale
    )
    expected = load_balancing_loss_reference(
        logits, experts, score=score, seq_len=seq_len if scope == "sequence" else None, mask=mask, scale=scale
    )
    torch.testing.assert_close(actual, expected)
    if expected.requires_grad:
        torch.testing.assert_close(
            torch.autograd.grad(actual, logits)[0], torch.autograd.grad(expected, logits)[0]
        )


@pytest.mark.parametrize("masked", [False, True])
def test_switch_scale_equals_hugging_face_mixtral_loss(masked):
    batch, seq_len, num_experts, k = 3, 10, 8, 2
    logits, _ = routed(batch * seq_len, num_experts, k, seed=1)
    _, experts = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    mask = (torch.arange(seq_len) < torch.tensor([[10], [7], [3]])).long() if masked else None
    actual = sparseroute.load_balancing_loss(logits, experts, attention_mask=mask, scale="switch")
    torch.testing.assert_close(actual, hf_mixtral_load_balancing_loss(logits, k, mask))


def test_megatron_scale_equals_megatron_switch_and_sequence_losses():
    batch, seq_len, num_experts, k = 4, 16, 8, 2
    logits, experts = routed(batch * seq_len, num_experts, k, seed=2)
    probs = torch.softmax(logits, dim=-1)
    routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, experts, True)
    counts = routing_map.sum(dim=0).float()
    torch.testing.assert_close(
        sparseroute.load_balancing_loss(logits, experts),
        megatron_switch_loss(probs, counts, batch * seq_len, k),
    )
    torch.testing.assert_close(
        sparseroute.load_balancing_loss(logits, experts, scope="sequence", seq_len=seq_len),
        megatron_sequence_loss(probs, routing_map, batch, seq_len, k),
    )


def test_balanced_router_scores_one():
    logits = torch.zeros(8, 4)
    experts = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(sparseroute.load_balancing_loss(logits, experts), torch.tensor(1.0))
    torch.testing.assert_close(
        sparseroute.load_balancing_loss(logits, experts, scale="switch"), torch.tensor(2.0)
    )


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gradcheck_and_opcheck(score):
    logits, experts = routed(12, 5, 2, seed=3, dtype=torch.float64, score=score)
    logits.requires_grad_()
    mask = torch.tensor([1, 1, 0, 1] * 3).view(3, 4)
    assert torch.autograd.gradcheck(
        lambda x: sparseroute.load_balancing_loss(
            x, experts, score=score, scope="sequence", attention_mask=mask
        ),
        (logits,),
    )
    assert torch.autograd.gradcheck(lambda x: sparseroute.z_loss(x, mask), (logits,))
    flat_mask = mask.reshape(-1).to(torch.uint8)
    torch.library.opcheck(ops.score_sums, (logits, score, 4, flat_mask))
    torch.library.opcheck(
        ops.score_sums_backward, (logits.detach(), score, 4, None, torch.randn(3, 5, dtype=torch.float64))
    )
    torch.library.opcheck(ops.expert_counts, (experts, 5, 4, flat_mask))
    torch.library.opcheck(ops.z_loss, (logits, flat_mask))
    torch.library.opcheck(ops.z_loss, (logits, None))
    _, stats = ops.z_loss(logits.detach(), flat_mask)
    torch.library.opcheck(
        ops.z_loss_backward, (logits.detach(), stats, torch.tensor(0.5, dtype=torch.float64))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_z_loss_gradient_in_the_logits_dtype(dtype):
    logits = (torch.randn(40, 7) * 3).to(dtype).requires_grad_()
    (2.5 * sparseroute.z_loss(logits)).backward()
    reference = logits.detach().float().requires_grad_()
    (2.5 * torch.logsumexp(reference, dim=-1).square().mean()).backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad, reference.grad.to(dtype), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    logits, experts = routed(64, 8, 2, seed=4, dtype=dtype)
    expected = load_balancing_loss_reference(logits.float(), experts)
    actual = sparseroute.load_balancing_loss(logits, experts)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    z = torch.logsumexp(logits.float(), dim=-1).square().mean()
    torch.testing.assert_close(sparseroute.z_loss(logits), z, rtol=1e-5, atol=1e-6)


def test_z_loss_matches_reference_and_masks():
    logits, _ = routed(20, 6, 1, seed=5, dtype=torch.float64)
    logits.requires_grad_()
    mask = torch.arange(20) % 3 != 0
    expected = torch.logsumexp(logits[mask], dim=-1).square().mean()
    actual = sparseroute.z_loss(logits, mask)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(
        torch.autograd.grad(actual, logits)[0], torch.autograd.grad(expected, logits)[0]
    )


@given(
    num_tokens=st.integers(0, 40),
    num_experts=st.integers(1, 70),
    spread=st.sampled_from([0.1, 3.0, 30.0]),
    masked=st.booleans(),
    upstream=st.floats(-4.0, 4.0),
    seed=st.integers(0, 2**16),
)
def test_z_loss_and_its_gradient_match_torch(num_tokens, num_experts, spread, masked, upstream, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, num_experts, generator=g) * spread).requires_grad_()
    mask = torch.rand(num_tokens, generator=g) > 0.3 if masked else None
    loss = sparseroute.z_loss(logits, mask)
    (upstream * loss).backward()
    reference = logits.detach().double().requires_grad_()
    rows = reference if mask is None else reference[mask]
    expected = torch.logsumexp(rows, dim=-1).square().mean() if rows.shape[0] else reference.sum() * 0
    (upstream * expected).backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-5, atol=1e-6)


def test_z_loss_backward_keeps_two_numbers_per_token():
    logits = torch.randn(64, 32, requires_grad=True)
    loss = sparseroute.z_loss(logits)
    extra = [t for t in loss.grad_fn.saved_tensors if t.data_ptr() != logits.data_ptr()]
    assert [tuple(t.shape) for t in extra] == [(64, 2)]  # not a [T, E] gradient
    loss.backward()
    expected = torch.autograd.grad(torch.logsumexp(logits, dim=-1).square().mean(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)


def test_z_loss_ignores_what_masked_tokens_hold():
    logits = torch.randn(6, 5)
    logits[1] = float("nan")
    logits[4, 2] = float("inf")
    logits.requires_grad_()
    mask = torch.tensor([1, 0, 1, 1, 0, 1])
    loss = sparseroute.z_loss(logits, mask)
    loss.backward()
    kept = mask.bool()
    expected = torch.logsumexp(logits.detach()[kept], dim=-1).square().mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert logits.grad[kept].isfinite().all() and not logits.grad[~kept].any()


def test_edge_cases():
    logits = torch.zeros(0, 4, requires_grad=True)
    experts = torch.zeros(0, 2, dtype=torch.int64)
    loss = sparseroute.load_balancing_loss(logits, experts)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert float(sparseroute.z_loss(torch.zeros(0, 4))) == 0.0
    all_masked = torch.zeros(2, 3)
    logits, experts = routed(6, 4, 2)
    assert float(sparseroute.load_balancing_loss(logits, experts, attention_mask=all_masked)) == 0.0
    one_expert = sparseroute.load_balancing_loss(torch.randn(5, 1), torch.zeros(5, 1, dtype=torch.int64))
    torch.testing.assert_close(one_expert, torch.tensor(1.0))
    with_empty_slots = torch.tensor([[0, -1], [1, -1]])
    assert float(sparseroute.load_balancing_loss(torch.zeros(2, 2), with_empty_slots)) == pytest.approx(0.5)


def test_compiles_without_graph_breaks():
    logits, experts = routed(32, 8, 2, seed=6)
    logits.requires_grad_()
    mask = torch.ones(4, 8)

    def losses(logits):
        balance = sparseroute.load_balancing_loss(logits, experts, scope="sequence", attention_mask=mask)
        return balance + 1e-3 * sparseroute.z_loss(logits, mask)

    torch._dynamo.reset()
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits), losses(logits))


def test_routing_stats():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])
    stats = sparseroute.routing_stats(experts, 4)
    assert stats.tokens_per_expert.tolist() == [4, 2, 1, 1]
    assert stats.max_over_mean == pytest.approx(2.0)
    assert stats.max_violation == pytest.approx(1.0)
    load = torch.tensor([4.0, 2, 1, 1])
    assert stats.coefficient_of_variation == pytest.approx(float(load.std(correction=0) / 2))
    share = load / 8
    entropy = float(-(share * share.log()).sum())
    assert stats.entropy == pytest.approx(entropy)
    assert stats.normalized_entropy == pytest.approx(entropy / math.log(4))
    assert stats.dropped_fraction == 0.0
    _, plan = sparseroute.permute(torch.zeros(4, 1), experts, 4, capacity=2)
    assert sparseroute.routing_stats(experts, 4, plan).dropped_fraction == pytest.approx(2 / 8)
    uniform = sparseroute.routing_stats(torch.tensor([[0], [1], [2]]), 3)
    assert uniform.normalized_entropy == pytest.approx(1.0) and uniform.max_violation == pytest.approx(0.0)
    empty = sparseroute.routing_stats(torch.zeros(0, 2, dtype=torch.int64), 3)
    assert empty.max_over_mean == 0.0 and empty.tokens_per_expert.tolist() == [0, 0, 0]


def test_update_expert_bias():
    bias = torch.zeros(4)
    updated = sparseroute.update_expert_bias(bias, torch.tensor([8, 2, 5, 5]), 0.01)
    torch.testing.assert_close(updated, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert torch.equal(bias, torch.zeros(4))
    _, experts = sparseroute.topk_gating(torch.randn(16, 4), 1, expert_bias=updated)
    assert experts.shape == (16, 1)


def test_bad_inputs_name_the_argument():
    logits, experts = routed(8, 4, 2)
    with pytest.raises(ValueError, match="scope"):
        sparseroute.load_balancing_loss(logits, experts, scope="token")
    with pytest.raises(ValueError, match="scale"):
        sparseroute.load_balancing_loss(logits, experts, scale="gshard")
    with pytest.raises(ValueError, match="seq_len: expected the tokens per sequence"):
        sparseroute.load_balancing_loss(logits, experts, scope="sequence")
    with pytest.raises(ValueError, match="seq_len: expected a divisor of T = 8"):
        sparseroute.load_balancing_loss(logits, experts, scope="sequence", seq_len=3)
    with pytest.raises(ValueError, match=r"attention_mask: expected \[B, S\]"):
        sparseroute.load_balancing_loss(logits, experts, attention_mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="experts: expected"):
        sparseroute.load_balancing_loss(logits, experts[:4])
    with pytest.raises(sparseroute.InvalidInputError, match="experts"):
        sparseroute.load_balancing_loss(logits, experts + 4)
    with pytest.raises(sparseroute.InvalidInputError, match="logits"):
        sparseroute.z_loss(logits * float("nan"))
    with pytest.raises(ValueError, match="tokens_per_expert: expected shape"):
        sparseroute.update_expert_bias(torch.zeros(4), torch.zeros(3), 0.1)
    with pytest.raises(TypeError, match="bias: expected dtype float32"):
        sparseroute.update_expert_bias(torch.zeros(4, dtype=torch.float64), torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="rate"):
        sparseroute.update_expert_bias(torch.zeros(4), torch.zeros(4), float("nan"))


def test_normalized_sigmoid_scores_sum_to_one():
    logits, _ = routed(5, 7, 1)
    torch.testing.assert_close(normalized_scores_reference(logits, "sigmoid").sum(-1), torch.ones(5))
