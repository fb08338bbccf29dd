"""On CUDA tensors, the direct eager route (sparseroute.ops._eager) gives the dispatcher
route's bits, forward and backward, and skips the dispatcher in plain eager code."""

import pytest
import torch

import sparseroute
from sparseroute.ops import _eager


def _pipeline(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(300, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    x = torch.randn(300, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    gate_up = (torch.randn(64, 96, 128, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    down = (torch.randn(64, 128, 48, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    weights, experts = sparseroute.topk_gating(logits, 8)
    x_sorted, plan = sparseroute.permute(x, experts, 64, num_rows=300 * 8)
    rows = sparseroute.grouped_mlp(x_sorted, plan.offsets, gate_up, down)
    y = sparseroute.unpermute(rows, plan, weights)
    top_w, _ = sparseroute.topp_gating(logits, 0.8, max_k=6)
    choice = sparseroute.expert_choice(logits, 40)
    losses = sparseroute.load_balancing_loss(logits, experts) + sparseroute.z_loss(logits)
    outputs = [y, top_w, choice.gates, choice.indices, losses, experts, plan.offsets]
    loss = sum((o.double() * (i + 1.5)).sum() for i, o in enumerate(outputs) if o.requires_grad)
    grads = torch.autograd.grad(loss, [logits, x, gate_up, down])
    return outputs, grads


def test_direct_route_matches_dispatcher(monkeypatch):
    direct = _pipeline(seed=0)
    monkeypatch.setattr(_eager, "_DIRECT", False)
    dispatched = _pipeline(seed=0)
    for ours, theirs in zip([*direct[0], *direct[1]], [*dispatched[0], *dispatched[1]], strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert torch.equal(ours, theirs)


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    def refuse(*args):
        raise AssertionError("went through the dispatcher")

    for entry in _eager._OPS.values():
        monkeypatch.setattr(entry, "dispatcher", refuse)
    _pipeline(seed=1)
    with pytest.raises(AssertionError, match="dispatcher"), torch.device("cuda"):
        sparseroute.topk_gating(torch.randn(8, 6, device="cuda"), 2)
