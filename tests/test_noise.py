"""Exploration noise in topk_gating: reproducible with a generator, and exactly the
documented computation."""

import pytest
import torch

import sparseroute

from reference import topk_gating_reference


def test_jitter_is_reproducible_and_multiplicative():
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    a = sparseroute.topk_gating(logits, 2, jitter_eps=0.1, generator=torch.Generator().manual_seed(7))
    b = sparseroute.topk_gating(logits, 2, jitter_eps=0.1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    noise = torch.empty(32, 8).uniform_(0.9, 1.1, generator=torch.Generator().manual_seed(7))
    expected = sparseroute.topk_gating(logits * noise, 2)
    assert torch.equal(a[1], expected[1])
    torch.testing.assert_close(a[0], expected[0])
    assert ((noise >= 0.9) & (noise <= 1.1)).all()
    a[0].sum().backward()
    assert logits.grad is not None
    x = torch.ones(4, 3)
    jittered = sparseroute.jitter(x, 0.2, generator=torch.Generator().manual_seed(1))
    assert ((jittered >= 0.8) & (jittered <= 1.2)).all() and not torch.equal(jittered, x)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gumbel_noise_selects_on_noisy_logits_and_weighs_clean_ones(score):
    logits = torch.randn(
        64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True
    )
    weights, experts = sparseroute.topk_gating(
        logits, 2, score=score, gumbel_noise=True, scale=2.0, generator=torch.Generator().manual_seed(3)
    )
    uniform = torch.rand(64, 8, generator=torch.Generator().manual_seed(3))
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    _, expected_experts = topk_gating_reference(logits.detach() + gumbel.double(), 2, score=score)
    assert torch.equal(experts, expected_experts)
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    picked = scores.gather(1, experts)
    eps = 1e-20 if score == "sigmoid" else 0.0
    torch.testing.assert_close(weights, 2.0 * picked / (picked.sum(-1, keepdim=True) + eps))
    # Noise changes some choices relative to the noise-free router.
    assert not torch.equal(experts, sparseroute.topk_gating(logits, 2, score=score)[1])
    assert torch.autograd.gradcheck(
        lambda z: sparseroute.topk_gating(
            z, 2, score=score, gumbel_noise=True, generator=torch.Generator().manual_seed(3)
        )[0],
        (logits,),
    )


def test_bad_noise_arguments():
    logits = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"jitter_eps: expected a float in \[0, 1\)"):
        sparseroute.topk_gating(logits, 2, jitter_eps=1.5)
    with pytest.raises(TypeError, match="gumbel_noise: expected a bool"):
        sparseroute.topk_gating(logits, 2, gumbel_noise=1)
