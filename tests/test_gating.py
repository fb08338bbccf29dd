"""topk_gating against the pure-torch reference: choices exactly, weights and gradients
within tolerance, over shapes, options and dtypes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from kernel_inputs import tie_heavy_logits
from reference import WEIGHT_TOLERANCE, topk_gating_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@st.composite
def gating_cases(draw):
    num_experts = draw(st.sampled_from([1, 2, 3, 8, 60, 64, 160, 256, 300]) | st.integers(1, 300))
    num_tokens = draw(st.sampled_from([0, 1, 7]) | st.integers(0, 300))
    k = draw(st.integers(1, min(num_experts, 16)))
    options = {
        "score": draw(st.sampled_from(["softmax", "sigmoid"])),
        "normalize": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 2.5])),
    }
    divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0]
    if draw(st.booleans()):
        num_groups = draw(st.sampled_from(divisors))
        group_size = num_experts // num_groups
        min_groups = -(-k // group_size)
        options["num_groups"] = num_groups
        options["topk_groups"] = draw(st.integers(min_groups, num_groups))
        options["group_score_k"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        # Multiples of 10: a bias class never ties with another (scores lie in [0, 1]).
        # With groups, one bias per group: otherwise two groups can hold the same keys
        # summed in a different order ((20 + s_a) + (10 + s_b) against
        # (20 + s_b) + (10 + s_a)), a tie in exact arithmetic that float rounding splits
        # differently depending on the last bit of each implementation's exp.
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        groups = options.get("num_groups", num_experts)
        classes = torch.randint(0, 3, (groups,), generator=g).float() * 10
        options["expert_bias"] = classes.repeat_interleave(num_experts // groups)
    dtype = draw(st.sampled_from(DTYPES))
    logits = tie_heavy_logits(num_tokens, num_experts, dtype, draw(st.integers(0, 2**31)))
    return logits, k, options


@given(gating_cases())
def test_matches_reference(case):
    logits, k, options = case
    weights, experts = sparseroute.topk_gating(logits, k, **options)
    ref_weights, ref_experts = topk_gating_reference(logits, k, **options)
    assert experts.dtype == torch.int64
    assert weights.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOLERANCE[logits.dtype])


@given(gating_cases())
def test_gradient_matches_reference(case):
    logits, k, options = case
    logits = logits.float() if logits.dtype != torch.float64 else logits
    grad_out = torch.randn(logits.shape[0], k, dtype=logits.dtype)
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    (sparseroute.topk_gating(ours, k, **options)[0] * grad_out).sum().backward()
    (topk_gating_reference(theirs, k, **options)[0] * grad_out).sum().backward()
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-6} if logits.dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    )
    torch.testing.assert_close(ours.grad, theirs.grad, **tolerance)


@pytest.mark.parametrize("num_experts,k", [(8, 2), (60, 4), (64, 8), (160, 6), (256, 8)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_continuous_logits(num_experts, k, score, generator):
    logits = torch.randn(513, num_experts, generator=generator) * 3
    bias = torch.randn(num_experts, generator=generator) * 0.1
    for options in ({}, {"expert_bias": bias}, {"normalize": False}):
        weights, experts = sparseroute.topk_gating(logits, k, score=score, **options)
        ref_weights, ref_experts = topk_gating_reference(logits, k, score=score, **options)
        assert torch.equal(experts, ref_experts)
        torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)


def test_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    _, experts = sparseroute.topk_gating(logits, 3)
    assert experts.tolist() == [[1, 2, 4], [0, 1, 2]]


def test_deepseek_v3_style_routing():
    """Sigmoid scores, selection bias, group limit, normalisation and scaling together."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 256, generator=g)
    bias = torch.randn(256, generator=g) * 0.01
    options = {
        "score": "sigmoid",
        "expert_bias": bias,
        "num_groups": 8,
        "topk_groups": 4,
        "scale": 2.5,
    }
    weights, experts = sparseroute.topk_gating(logits, 8, **options)
    ref_weights, ref_experts = topk_gating_reference(logits, 8, **options)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 2.5))
    groups_used = (experts // 32).unique(dim=None)
    assert all(len(set((row // 32).tolist())) <= 4 for row in experts)
    assert groups_used.numel() <= 8


@pytest.mark.parametrize("num_tokens,num_experts,k", [(0, 8, 2), (1, 1, 1), (5, 7, 7), (3, 160, 16)])
def test_edge_shapes(num_tokens, num_experts, k, generator):
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    weights, experts = sparseroute.topk_gating(logits, k)
    assert weights.shape == experts.shape == (num_tokens, k)
    if num_tokens:
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens))
        # k = E: every expert exactly once per token.
        if k == num_experts:
            assert torch.equal(experts.sort(-1).values, torch.arange(k).expand(num_tokens, k))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(score, normalize, with_bias, generator):
    logits = torch.randn(6, 10, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, generator=generator) * 0.01 if with_bias else None

    def weights_of(logits):
        options = {"score": score, "normalize": normalize, "expert_bias": bias, "scale": 1.5}
        return sparseroute.topk_gating(logits, 3, **options)[0]

    assert torch.autograd.gradcheck(weights_of, (logits,))


def test_bf16_and_fp16_logits_give_float32_weights(generator):
    logits = torch.randn(33, 16, generator=generator)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        weights, experts = sparseroute.topk_gating(low, 4)
        ref_weights, ref_experts = topk_gating_reference(low, 4)
        assert weights.dtype == torch.float32
        assert torch.equal(experts, ref_experts)
        torch.testing.assert_close(weights, ref_weights)
        low.requires_grad_()
        sparseroute.topk_gating(low, 4)[0].sum().backward()
        assert low.grad is not None and low.grad.dtype == dtype


@pytest.mark.parametrize("num_experts,k", [(8, 2), (8, 8), (16, 4), (64, 8)])
@pytest.mark.parametrize("score,normalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_results_do_not_depend_on_the_batch(num_experts, k, score, normalize, generator):
    """A token's experts and weights are the same bits whatever batch it is routed in
    (several token-parallel lanes or alone), for every block layout."""
    logits = torch.randn(37, num_experts, generator=generator)
    weights, experts = sparseroute.topk_gating(logits, k, score=score, normalize=normalize)
    for t in (0, 7, 8, 31, 36):
        w, e = sparseroute.topk_gating(logits[t : t + 1], k, score=score, normalize=normalize)
        assert torch.equal(e[0], experts[t])
        assert torch.equal(w[0], weights[t])
    w, e = sparseroute.topk_gating(logits[5:29], k, score=score, normalize=normalize)
    assert torch.equal(e, experts[5:29])
    assert torch.equal(w, weights[5:29])


@pytest.mark.parametrize("expert_bias", [None, torch.zeros(3)])
def test_subnormal_scores_keep_their_order(expert_bias):
    """Experts 1 and 2 are 97.4 and 88.7 below the best logit: exact scores 4.8e-43 and
    3.0e-39, both subnormal, so expert 2 ranks second by score (the key under a group limit
    or a bias), with the subnormal weight torch's softmax gives it, within one step."""
    logits = torch.tensor([[97.3613, -0.0744, 8.6539]])
    probs = torch.softmax(logits, dim=-1)
    assert probs[0, 2] > probs[0, 1] > 0
    weights, experts = sparseroute.topk_gating(
        logits, 2, normalize=False, expert_bias=expert_bias, num_groups=1, topk_groups=1, group_score_k=1
    )
    assert experts.tolist() == [[0, 2]]
    smallest_subnormal = torch.finfo(torch.float32).smallest_normal * 2.0**-23
    assert abs(weights[0, 1].item() - probs[0, 2].item()) <= smallest_subnormal
    # Without the group limit the logits are the keys: the same order, whatever the scores.
    _, experts = sparseroute.topk_gating(logits, 3, normalize=False)
    assert experts.tolist() == [[0, 2, 1]]
