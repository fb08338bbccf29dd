"""sparseroute.nn.SparseMoE against a per-token pure-torch MoE."""

import pytest
import torch
import torch.nn.functional as F

import sparseroute
from sparseroute.nn import SparseMoE

from reference import topk_gating_reference


def per_token_reference(layer: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Every token through each of its experts' MLPs, one at a time."""
    flat = x.reshape(-1, layer.hidden_size)
    logits = flat @ layer.router.weight.T
    weights, experts = topk_gating_reference(
        logits,
        layer.k,
        score=layer.score,
        normalize=layer.normalize,
        expert_bias=layer.expert_bias,
        num_groups=layer.num_groups,
        topk_groups=layer.topk_groups,
        group_score_k=layer.group_score_k,
        scale=layer.scale,
    )
    rows = []
    for t in range(flat.shape[0]):
        y = torch.zeros_like(flat[t])
        for j in range(layer.k):
            e = int(experts[t, j])
            h = layer.gate_up_proj[e] @ flat[t]
            h = F.silu(h[: layer.ffn_size]) * h[layer.ffn_size :] if layer.gated else F.silu(h)
            y = y + weights[t, j].to(y.dtype) * (layer.down_proj[e] @ h)
        if layer.shared_expert is not None:
            y = y + layer._shared(flat[t : t + 1])[0]
        rows.append(y)
    return torch.stack(rows).reshape(x.shape) if rows else torch.zeros_like(x)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(score="sigmoid", expert_bias=True, num_groups=4, topk_groups=2, scale=2.5),
        dict(num_groups=4, topk_groups=2, group_score_k=1),
        dict(gated=False, normalize=False),
        dict(shared_expert_size=12),
    ],
)
def test_sparse_moe_matches_per_token_reference(options):
    torch.manual_seed(0)
    layer = SparseMoE(16, 8, 8, 2, **options).double()
    if layer.expert_bias is not None:
        layer.expert_bias.normal_(0, 0.1)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    expected = per_token_reference(layer, x)
    torch.testing.assert_close(out.output, expected)
    assert out.output.shape == x.shape
    assert int(out.tokens_per_expert.sum()) == 15 * 2
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(out.output.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_sparse_moe_gradcheck():
    torch.manual_seed(1)
    layer = SparseMoE(6, 4, 4, 2, shared_expert_size=3).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x).output, (x,))


def test_load_balancing_loss_is_one_when_balanced_and_differentiable():
    logits = torch.zeros(8, 4, requires_grad=True)
    experts = torch.tensor([[0, 1], [2, 3]] * 4)
    output = sparseroute.nn.MoEOutput(torch.zeros(8, 2), logits, experts, torch.full((4,), 4), torch.zeros(4))
    loss = output.load_balancing_loss()
    torch.testing.assert_close(loss, torch.tensor(1.0))
    loss.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_layer_runs_and_tracks_float32(dtype):
    torch.manual_seed(2)
    layer = SparseMoE(32, 16, 8, 2)
    x = torch.randn(64, 32)
    expected = layer(x).output
    actual = layer.to(dtype)(x.to(dtype)).output
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, rtol=5e-2, atol=5e-2)


def test_edge_cases():
    layer = SparseMoE(8, 4, 1, 1)
    assert layer(torch.randn(0, 8)).output.shape == (0, 8)
    out = layer(torch.randn(1, 8))
    assert out.tokens_per_expert.tolist() == [1]
    layer = SparseMoE(8, 4, 5, 5)  # k = E
    assert sorted(layer(torch.randn(2, 8)).experts[0].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("capacity", [{}, {"capacity_factor": 1.0, "pad_to_capacity": True}])
def test_compiles_without_graph_breaks(capacity):
    torch.manual_seed(3)
    layer = SparseMoE(16, 8, 8, 2, shared_expert_size=8, **capacity)
    x = torch.randn(24, 16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: layer(x).output, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x).output)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="k: expected k <= num_experts = 4"):
        SparseMoE(8, 4, 4, 5)
    with pytest.raises(ValueError, match="score"):
        SparseMoE(8, 4, 4, 2, score="tanh")
    with pytest.raises(ValueError, match="hidden_size"):
        SparseMoE(0, 4, 4, 2)
    with pytest.raises(ValueError, match="x: expected last dimension H = 8"):
        SparseMoE(8, 4, 4, 2)(torch.randn(3, 7))


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
def test_capacity_factor_drops_like_the_reference(policy, pad):
    torch.manual_seed(4)
    layer = SparseMoE(16, 8, 4, 2, capacity_factor=0.5, drop_policy=policy, pad_to_capacity=pad).double()
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    capacity = sparseroute.expert_capacity(20, 4, 2, 0.5)
    assert capacity == 5
    assert (out.tokens_per_expert <= capacity).all()
    assert int(out.tokens_per_expert.sum() + out.dropped.sum()) == 40
    # Reference: the dropless layer with the dropped slots' weights set to zero.
    logits = x @ layer.router.weight.T
    weights, experts = topk_gating_reference(logits, 2)
    _, plan = sparseroute.permute(
        x.detach(), experts, 4, capacity=capacity, weights=weights, drop_policy=policy
    )
    kept = (plan.slot_to_row >= 0).to(torch.float64)
    rows = []
    for t in range(20):
        y = torch.zeros(16, dtype=torch.float64)
        for j in range(2):
            e = int(experts[t, j])
            h = layer.gate_up_proj[e] @ x[t]
            y = y + weights[t, j] * kept[t, j] * (layer.down_proj[e] @ (F.silu(h[:8]) * h[8:]))
        rows.append(y)
    torch.testing.assert_close(out.output, torch.stack(rows))
    assert torch.autograd.gradcheck(lambda x: layer(x).output, (x,))
