"""The routing variants on the GPU: capacity dispatch (both drop policies, padded layout),
top-p gating, expert choice, Sinkhorn, the z-loss gradient and the grouped expert ops, each
against the CPU kernel and the pure-torch reference, with gradients, opcheck, torch.compile
and CUDA graph capture."""

import pytest
import torch
from gpu_helpers import DTYPES, random_experts, to_acc

import sparseroute

from kernel_inputs import random_logits
from reference import (
    capacity_plan_reference,
    expert_choice_reference,
    grouped_linear_reference,
    megatron_sinkhorn,
    topp_gating_reference,
)

ops = torch.ops.sparseroute
PLAN_FIELDS = ("tokens_per_expert", "offsets", "row_to_slot", "slot_to_row", "dropped")


# --- capacity dispatch --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "k", "num_experts", "capacity"),
    [(0, 2, 4, 3), (1, 1, 1, 0), (300, 2, 8, 40), (4096, 8, 64, 300), (1000, 6, 160, 7), (200, 2, 5, 10**6)],
)
@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("pad", [False, True])
def test_capacity_permute_is_the_cpu_permute(num_tokens, k, num_experts, capacity, policy, pad):
    g = torch.Generator().manual_seed(num_tokens + capacity)
    experts = random_experts(num_tokens, k, num_experts, seed=num_tokens)
    weights = torch.randint(0, 8, (num_tokens, k), generator=g).float() / 8  # many exact ties
    x = torch.randn(num_tokens, 16, generator=g).bfloat16()
    options = {"capacity": capacity, "drop_policy": policy, "pad_to_capacity": pad}
    if policy == "probs":
        options["weights"] = weights
    cpu_sorted, cpu_plan = sparseroute.permute(x, experts, num_experts, **options)
    if policy == "probs":
        options["weights"] = weights.cuda()
    gpu_sorted, gpu_plan = sparseroute.permute(x.cuda(), experts.cuda(), num_experts, **options)
    assert torch.equal(gpu_sorted.cpu(), cpu_sorted)
    for name in PLAN_FIELDS:
        assert torch.equal(getattr(gpu_plan, name).cpu(), getattr(cpu_plan, name)), name
    reference = capacity_plan_reference(
        experts, num_experts, min(capacity, num_tokens * k + 1), weights if policy == "probs" else None, pad
    )
    if not pad:
        for name in PLAN_FIELDS:
            assert torch.equal(getattr(gpu_plan, name).cpu(), reference[name]), name


def test_capacity_round_trip_and_gradients():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(256, 16, generator=g).cuda().requires_grad_()
    x = torch.randn(256, 32, generator=g).cuda().requires_grad_()
    weights, experts = sparseroute.topk_gating(logits, 2)
    capacity = sparseroute.expert_capacity(256, 16, 2, 1.0)
    x_sorted, plan = sparseroute.permute(
        x, experts, 16, capacity=capacity, weights=weights, drop_policy="probs", pad_to_capacity=True
    )
    assert x_sorted.shape == (16 * capacity, 32)
    y = sparseroute.unpermute(x_sorted * 2, plan, weights)
    y.square().sum().backward()
    cpu_logits = logits.detach().cpu().requires_grad_()
    cpu_x = x.detach().cpu().requires_grad_()
    cpu_weights, cpu_experts = sparseroute.topk_gating(cpu_logits, 2)
    cpu_sorted, cpu_plan = sparseroute.permute(
        cpu_x,
        cpu_experts,
        16,
        capacity=capacity,
        weights=cpu_weights,
        drop_policy="probs",
        pad_to_capacity=True,
    )
    cpu_y = sparseroute.unpermute(cpu_sorted * 2, cpu_plan, cpu_weights)
    cpu_y.square().sum().backward()
    torch.testing.assert_close(y.detach().cpu(), cpu_y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.cpu(), cpu_x.grad, rtol=1e-5, atol=1e-5)
    # The gating weights agree within a few float32 ulp (not bit for bit), and the loss scales
    # them up: compare the gradient relative to its size.
    torch.testing.assert_close(logits.grad.cpu(), cpu_logits.grad, rtol=1e-4, atol=1e-4)


def test_nan_drop_weights_are_counted_not_raised():
    experts = torch.zeros(4, 1, dtype=torch.int64, device="cuda")
    weights = torch.tensor([[0.5], [float("nan")], [0.25], [1.0]], device="cuda")
    sparseroute.permute(
        torch.zeros(4, 2, device="cuda"), experts, 1, capacity=2, weights=weights, drop_policy="probs"
    )
    with pytest.raises(sparseroute.InvalidInputError, match="NaN drop weights"):
        sparseroute.check_cuda_errors()


def test_opcheck_capacity_permute():
    x = torch.randn(40, 8, device="cuda", requires_grad=True)
    experts = random_experts(40, 2, 6, seed=2).cuda()
    weights = torch.rand(40, 2, device="cuda")
    torch.library.opcheck(ops.permute, (x, experts, 6, None, 9, weights, True))
    torch.library.opcheck(ops.permute, (x, experts, 6, None, 9, None, False))


# --- top-p gating ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_experts", "p"), [(1, 0.5), (8, 0.6), (64, 0.9), (160, 0.75), (600, 0.5)])
@pytest.mark.parametrize(("min_k", "inclusive", "normalize"), [(1, True, False), (0, False, True)])
def test_topp_gating_is_the_cpu_routing(dtype, num_experts, p, min_k, inclusive, normalize):
    logits = random_logits(300, num_experts, dtype, seed=num_experts)
    max_k = min(num_experts, 8)
    options = {"min_k": min_k, "max_k": max_k, "inclusive": inclusive, "normalize": normalize}
    weights, experts = sparseroute.topp_gating(logits.cuda(), p, **options)
    cpu_weights, cpu_experts = sparseroute.topp_gating(logits, p, **options)
    assert torch.equal(experts.cpu(), cpu_experts)
    if dtype == torch.float64:
        torch.testing.assert_close(weights.cpu(), cpu_weights, rtol=1e-13, atol=1e-15)
    else:
        assert torch.equal(weights.cpu(), cpu_weights)  # the CPU's exp and sum order
    ref_weights, ref_experts = topp_gating_reference(logits[:40], p, min_k, max_k, inclusive, normalize)
    assert torch.equal(experts[:40].cpu(), ref_experts)
    torch.testing.assert_close(weights[:40].cpu(), ref_weights, rtol=1e-5, atol=1e-6)


def test_topp_gating_gradcheck_and_opcheck():
    logits = torch.randn(12, 10, device="cuda", dtype=torch.float64, requires_grad=True)
    for normalize in (False, True):
        torch.autograd.gradcheck(
            lambda v, n=normalize: sparseroute.topp_gating(v, 0.7, normalize=n)[0], (logits,)
        )
    torch.library.opcheck(ops.topp_gating, (logits.float().detach().requires_grad_(), 0.6, 1, 5, True, False))


def test_topp_gating_compiles_and_captures():
    sparseroute.warm_up_cuda()
    logits = torch.randn(64, 16, device="cuda")
    compiled = torch.compile(lambda v: sparseroute.topp_gating(v, 0.8, max_k=6), fullgraph=True)
    expected = sparseroute.topp_gating(logits, 0.8, max_k=6)
    for a, b in zip(compiled(logits), expected, strict=True):
        assert torch.equal(a, b)
    static = logits.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparseroute.topp_gating(static, 0.8, max_k=6)
    fresh = torch.randn(64, 16, device="cuda")
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, sparseroute.topp_gating(fresh, 0.8, max_k=6), strict=True):
        assert torch.equal(a, b)


# --- expert choice ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "capacity"),
    # The last: 1024-thread select blocks, several steps per digit.
    [(0, 3, 0), (1, 1, 1), (512, 8, 128), (4096, 60, 100), (16384, 64, 2048)],
)
def test_expert_choice_is_the_cpu_choice(dtype, num_tokens, num_experts, capacity):
    logits = random_logits(num_tokens, num_experts, dtype, seed=capacity)
    gpu = sparseroute.expert_choice(logits.cuda(), capacity)
    cpu = sparseroute.expert_choice(logits, capacity)
    assert torch.equal(gpu.indices.cpu(), cpu.indices) and torch.equal(gpu.experts.cpu(), cpu.experts)
    tolerance = {"rtol": 1e-13, "atol": 1e-15} if dtype == torch.float64 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(gpu.gates.cpu(), cpu.gates, **tolerance)
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, **tolerance)
    if num_tokens:
        ref_indices, ref_gates = expert_choice_reference(logits[: min(num_tokens, 600)], min(capacity, 600))
        small = sparseroute.expert_choice(logits[:600].cuda(), min(capacity, 600))
        assert torch.equal(small.indices.cpu(), ref_indices)
        torch.testing.assert_close(small.gates.cpu(), ref_gates.to(to_acc(dtype)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_choice_gradient_is_the_cpu_gradient(dtype):
    """The CPU's probabilities, dot products and roundings: bit for bit below float64."""
    logits = random_logits(4096, 60, dtype, seed=8)
    gates, indices = ops.expert_choice(logits, 100)
    grad_gates = torch.randn(gates.shape, generator=torch.Generator().manual_seed(9)).to(gates.dtype)
    gpu = ops.expert_choice_backward(logits.cuda(), indices.cuda(), grad_gates.cuda()).cpu()
    cpu = ops.expert_choice_backward(logits, indices, grad_gates)
    if dtype == torch.float64:
        torch.testing.assert_close(gpu, cpu, rtol=1e-12, atol=1e-14)
    else:
        assert torch.equal(gpu, cpu)


def test_expert_choice_with_ties_across_many_tokens_is_the_cpu_choice():
    """Tie-heavy logits (five values): the ties at each expert's threshold span the runs of
    many warps, and go to the lower tokens."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 5, (20000, 4), generator=g).to(torch.float32)
    gpu = sparseroute.expert_choice(logits.cuda(), 5000)
    cpu = sparseroute.expert_choice(logits, 5000)
    assert torch.equal(gpu.indices.cpu(), cpu.indices) and torch.equal(gpu.gates.cpu(), cpu.gates)


def test_expert_choice_gradients_and_dispatch():
    logits = torch.randn(40, 6, device="cuda", dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: sparseroute.expert_choice(v, 9).gates, (logits,))
    torch.autograd.gradcheck(lambda v: sparseroute.expert_choice(v, 9).weights, (logits,))
    x = torch.randn(40, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    choice = sparseroute.expert_choice(logits, 9)
    x_sorted, plan = sparseroute.permute(x, choice.experts, 6)
    y = sparseroute.unpermute(x_sorted, plan, choice.weights)
    assert x_sorted.shape == (6 * 9, 8)
    expected = (choice.weights.sum(dim=1, keepdim=True) * x).detach()
    torch.testing.assert_close(y.detach(), expected)
    logits32 = logits.detach().float()
    gates, indices = ops.expert_choice(logits32, 9)
    torch.library.opcheck(ops.expert_choice, (logits32.requires_grad_(), 9))
    torch.library.opcheck(ops.expert_choice_backward, (logits32.detach(), indices, torch.randn_like(gates)))
    torch.library.opcheck(ops.expert_choice_slots, (indices, gates.detach().requires_grad_(), 40))


# --- Sinkhorn ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "iters"), [(1, 1, None), (300, 8, None), (16384, 64, None), (5000, 160, 4)]
)
def test_sinkhorn_is_the_cpu_sinkhorn(num_tokens, num_experts, iters):
    logits = random_logits(num_tokens, num_experts, torch.float32, seed=num_tokens)
    gpu = sparseroute.sinkhorn(logits.cuda(), iters=iters)
    cpu = sparseroute.sinkhorn(logits, iters=iters)
    assert torch.equal(gpu.cpu(), cpu)  # the CPU's exp and sum orders
    if num_tokens <= 300:  # a fixed number of iterations: the same stopping point
        three = sparseroute.sinkhorn(logits.cuda(), iters=3, tol=0.0)
        torch.testing.assert_close(
            three.cpu(), megatron_sinkhorn(logits, tol=0.0, iters=3), rtol=1e-5, atol=1e-7
        )


def test_subnormal_probabilities_and_costs_are_the_cpu_bits():
    """Rows spread over 120 below their maximum: probabilities and Sinkhorn costs down
    through the subnormals and to 0, where the GPU's copy of the CPU's exp scales by 2^n in
    two factors (no flush to zero)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.rand(2000, 24, generator=g) * -120.0
    logits[:, 0] = 0.0
    gpu_weights, gpu_experts = sparseroute.topp_gating(logits.cuda(), 1.0, max_k=24)
    cpu_weights, cpu_experts = sparseroute.topp_gating(logits, 1.0, max_k=24)
    assert torch.equal(gpu_experts.cpu(), cpu_experts) and torch.equal(gpu_weights.cpu(), cpu_weights)
    subnormal = (cpu_weights > 0) & (cpu_weights < torch.finfo(torch.float32).smallest_normal)
    assert subnormal.any()
    gpu = sparseroute.expert_choice(logits.cuda(), 2000)
    cpu = sparseroute.expert_choice(logits, 2000)
    assert torch.equal(gpu.indices.cpu(), cpu.indices) and torch.equal(gpu.gates.cpu(), cpu.gates)
    costs = torch.linspace(-110.0, 80.0, 24).expand(300, 24).contiguous()
    gpu_scores = sparseroute.sinkhorn(costs.cuda(), iters=2)
    assert torch.equal(gpu_scores.cpu(), sparseroute.sinkhorn(costs, iters=2))


def test_sinkhorn_with_iters_is_sync_free():
    sparseroute.warm_up_cuda()
    logits = torch.randn(600, 8, device="cuda")
    static = logits.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparseroute.sinkhorn(static, iters=5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sparseroute.sinkhorn(logits, iters=5))


# --- z-loss gradient, grouped experts ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_gradient_op(dtype):
    logits = random_logits(64, 16, dtype, seed=1).cuda().requires_grad_()
    sparseroute.z_loss(logits).backward()
    cpu_logits = logits.detach().cpu().requires_grad_()
    sparseroute.z_loss(cpu_logits).backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.cpu().float(), cpu_logits.grad.float(), rtol=1e-2, atol=1e-5)
    _, stats = ops.z_loss(logits.detach(), None)
    torch.library.opcheck(ops.z_loss_backward, (logits.detach(), stats, torch.tensor(0.5, device="cuda")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mlp_on_cuda(dtype, transposed):
    g = torch.Generator().manual_seed(7)
    experts = random_experts(128, 2, 8, seed=4)
    x = torch.randn(128, 32, generator=g).to(dtype)
    x_sorted, plan = sparseroute.permute(x, experts, 8)
    gate_up = (
        torch.randn(8, 32, 128, generator=g) if transposed else torch.randn(8, 128, 32, generator=g)
    ) * 0.1
    down = (torch.randn(8, 64, 32, generator=g) if transposed else torch.randn(8, 32, 64, generator=g)) * 0.1
    inputs = [t.to(dtype) for t in (x_sorted, gate_up, down)]
    cpu = sparseroute.grouped_mlp(inputs[0], plan.offsets, inputs[1], inputs[2], transposed=transposed)
    gpu_inputs = [t.cuda().requires_grad_() for t in inputs]
    gpu = sparseroute.grouped_mlp(gpu_inputs[0], plan.offsets.cuda(), *gpu_inputs[1:], transposed=transposed)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(gpu.detach().cpu(), cpu, **tolerance)
    gpu.square().sum().backward()
    assert all(t.grad is not None and t.grad.device.type == "cuda" for t in gpu_inputs)
    first = sparseroute.grouped_linear(
        gpu_inputs[0].detach(), plan.offsets.cuda(), gpu_inputs[1].detach(), transposed=transposed
    )
    reference = grouped_linear_reference(inputs[0].float(), plan.offsets, inputs[1].float(), None, transposed)
    torch.testing.assert_close(first.cpu().float(), reference, **tolerance)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_grouped_linear_runs_the_grouped_gemm_without_a_sync(transposed, bias):
    from sparseroute.ops.experts import uses_grouped_mm

    g = torch.Generator().manual_seed(9)
    counts = [5, 0, 9, 3, 0, 7]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    rows = int(offsets[-1]) + 4
    x = torch.randn(rows, 16, generator=g).bfloat16()
    weight = (torch.randn((6, 16, 24) if transposed else (6, 24, 16), generator=g) * 0.3).bfloat16()
    b = (torch.randn(6, 24, generator=g) * 0.3).bfloat16() if bias else None
    assert uses_grouped_mm(x.cuda(), weight.cuda())
    probe = torch.randn(rows, 24, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        leaves = (x, weight, b) if bias else (x, weight)
        inputs = [t.detach().clone().to(device).requires_grad_() for t in leaves]
        y = sparseroute.grouped_linear(
            inputs[0], offsets.to(device), inputs[1], inputs[2] if bias else None, transposed=transposed
        )
        (y.float() * probe.to(device)).sum().backward()
        results.append([y.detach().cpu().float()] + [t.grad.cpu().float() for t in inputs])
    for gpu, cpu in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=5e-2)
    # Sync-free: it captures in a CUDA graph.
    static_x, static_w, static_offsets = x.cuda(), weight.cuda(), offsets.cuda()
    static_b = None if b is None else b.cuda()
    expected = sparseroute.grouped_linear(static_x, static_offsets, static_w, static_b, transposed=transposed)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparseroute.grouped_linear(static_x, static_offsets, static_w, static_b, transposed=transposed)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    # The graph computes the group layout itself: refilled offsets are followed on replay.
    static_offsets.copy_(torch.tensor([0, 2, 9, 9, 20, 24, 27], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    refilled = sparseroute.grouped_linear(
        static_x, static_offsets.clone(), static_w, static_b, transposed=transposed
    )
    assert torch.equal(out, refilled)
