"""Every op is a well-formed torch custom op: opcheck passes (schema, fake kernel, autograd
registration, AOT dispatch), and the whole routing pipeline runs under
torch.compile(fullgraph=True)."""

import pytest
import torch

import sparseroute

ops = torch.ops.sparseroute


def gating_args():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 12, generator=g, requires_grad=True)
    bias = torch.randn(12, generator=g) * 0.1
    return [
        (logits, 3, "softmax", True, None, None, None, 2, 1.0),
        (logits, 4, "sigmoid", True, bias, 4, 2, 2, 2.5),
        (logits, 4, "softmax", False, None, 4, 2, 1, 2.5),
        (logits.detach().double().requires_grad_(), 2, "softmax", False, None, None, None, 2, 1.0),
        (torch.randn(0, 5, requires_grad=True), 2, "softmax", True, None, None, None, 2, 1.0),
    ]


def dispatch_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g, requires_grad=True)
    experts = torch.rand(10, 5, generator=g).argsort(-1)[:, :2]
    experts[3, 1] = -1
    return x, experts


@pytest.mark.parametrize("args", gating_args())
def test_opcheck_topk_gating(args):
    torch.library.opcheck(ops.topk_gating, args)


def test_opcheck_topk_gating_backward():
    logits = torch.randn(9, 12)
    weights, experts = sparseroute.topk_gating(logits, 3)
    torch.library.opcheck(
        ops.topk_gating_backward, (logits, experts, torch.randn_like(weights), "softmax", True, 1.0)
    )


@pytest.mark.parametrize("num_rows", [None, 24])
@pytest.mark.parametrize("block_size", [1, 4])
def test_opcheck_permute(num_rows, block_size):
    x, experts = dispatch_inputs()
    num_rows = None if num_rows is None else sparseroute.max_permuted_rows(20, 5, block_size)
    torch.library.opcheck(ops.permute, (x, experts, 5, num_rows, None, None, False, block_size))


@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_unpermute_and_its_gradient_ops(weighted):
    x, experts = dispatch_inputs()
    x_sorted, plan = sparseroute.permute(x.detach(), experts, 5, num_rows=20)
    y_sorted = torch.randn_like(x_sorted, requires_grad=True)
    weights = torch.rand(10, 2, requires_grad=True) if weighted else None
    torch.library.opcheck(ops.unpermute, (y_sorted, plan.slot_to_row, plan.row_to_slot, weights))
    grad_y = torch.randn(10, 6)
    torch.library.opcheck(
        ops.gather_rows, (grad_y, plan.row_to_slot, 2, None if weights is None else weights.detach())
    )
    torch.library.opcheck(ops.slot_dots, (grad_y, x_sorted, plan.slot_to_row))


def moe_pipeline(logits, x, w, num_rows):
    weights, experts = sparseroute.topk_gating(logits, 2)
    x_sorted, plan = sparseroute.permute(x, experts, logits.shape[1], num_rows=num_rows)
    y_sorted = torch.tanh(x_sorted @ w)
    return sparseroute.unpermute(y_sorted, plan, weights)


def assert_compiles_to_eager(fn, inputs, backend, *options):
    """``fn(*inputs, *options)`` compiled with fullgraph=True gives the eager output and the
    eager gradients with respect to ``inputs``; returns the eager output (detached)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    expected = fn(*inputs, *options)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    actual = compiled(*inputs, *options)
    actual_grads = torch.autograd.grad(actual.square().sum(), inputs)
    torch.testing.assert_close(actual, expected)
    for a, b in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)
    return expected.detach()


@pytest.mark.parametrize("static_rows", [True, False])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_pipeline_compiles_without_graph_breaks(static_rows, backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(32, 8, generator=g, requires_grad=True)
    x = torch.randn(32, 16, generator=g, requires_grad=True)
    w = torch.randn(16, 16, generator=g, requires_grad=True)
    assert_compiles_to_eager(moe_pipeline, (logits, x, w), backend, 64 if static_rows else None)


def blocked_pipeline(logits, x, w):
    """The block-aligned layout as a block-sparse expert GEMM would take it: a static row
    count for any routing, and each block's expert."""
    weights, experts = sparseroute.topk_gating(logits, 2)
    num_rows = sparseroute.max_permuted_rows(experts.numel(), logits.shape[1], 8)
    x_sorted, plan = sparseroute.permute(x, experts, logits.shape[1], num_rows=num_rows, block_size=8)
    block_experts = plan.block_experts(8)
    # Each block through its expert's weight (blocks past the plan: expert 0, zero rows).
    per_block = w[block_experts.clamp(min=0)]
    blocks = x_sorted.view(-1, 8, x.shape[1])
    y_sorted = torch.tanh(torch.bmm(blocks, per_block)).view(-1, w.shape[2])
    return sparseroute.unpermute(y_sorted, plan, weights)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_block_aligned_pipeline_compiles_without_graph_breaks(backend):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(30, 4, generator=g, requires_grad=True)
    x = torch.randn(30, 16, generator=g, requires_grad=True)
    w = torch.randn(4, 16, 16, generator=g, requires_grad=True)
    expected = assert_compiles_to_eager(blocked_pipeline, (logits, x, w), backend)
    # The same as per-expert matmuls over the plain layout.
    weights, experts = sparseroute.topk_gating(logits.detach(), 2)
    x_sorted, plan = sparseroute.permute(x.detach(), experts, 4)
    rows = [torch.tanh(x_sorted[plan.offsets[e] : plan.offsets[e + 1]] @ w.detach()[e]) for e in range(4)]
    torch.testing.assert_close(expected, sparseroute.unpermute(torch.cat(rows), plan, weights))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_moe_align_block_size_compiles_without_graph_breaks(backend):
    experts = torch.rand(50, 8, generator=torch.Generator().manual_seed(6)).argsort(-1)[:, :2]
    torch._dynamo.reset()
    compiled = torch.compile(sparseroute.moe_align_block_size, fullgraph=True, backend=backend)
    for got, expected in zip(
        compiled(experts, 16, 8), sparseroute.moe_align_block_size(experts, 16, 8), strict=True
    ):
        assert torch.equal(got, expected)
