"""The load-balancing ops (score_sums and its gradient, expert_counts, z_loss) and layer_plan on
a GPU: against the CPU kernels and tests/reference.py, opcheck, torch.compile(fullgraph=True),
CUDA graph capture after warm-up, invalid input counted."""

import pytest
import torch
from gpu_helpers import DTYPES, random_experts

import sparseroute
from sparseroute import InvalidInputError

from reference import layer_plan_reference, normalized_scores_reference

ops = torch.ops.sparseroute


def logits_for(num_tokens, num_experts, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, num_experts, generator=g) * 3).to(dtype)


def tolerance(dtype):
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    if dtype == torch.float32:
        return {"rtol": 2e-5, "atol": 2e-5}
    return {"rtol": 1e-2, "atol": 1e-2}  # the gradient is rounded into bfloat16 / float16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "group_size"),
    # Totals added by warps (64 and 313 segments a group), by threads, and tiny groups.
    [(4096, 64, 4096), (20000, 16, 20000), (3000, 8, 500), (33, 300, 4)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_score_sums_match_the_cpu(dtype, score, num_tokens, num_experts, group_size, masked):
    logits = logits_for(num_tokens, num_experts, dtype, seed=num_experts)
    g = torch.Generator().manual_seed(group_size)
    mask = (torch.rand(num_tokens, generator=g) > 0.3).to(torch.uint8) if masked else None
    gpu_mask = None if mask is None else mask.cuda()
    sums = ops.score_sums(logits.cuda(), score, group_size, gpu_mask)
    cpu = ops.score_sums(logits, score, group_size, mask)
    torch.testing.assert_close(
        sums.cpu(), cpu, **tolerance(torch.float32 if dtype != torch.float64 else dtype)
    )
    if not masked and group_size == num_tokens:
        reference = normalized_scores_reference(logits, score).sum(dim=0, keepdim=True)
        torch.testing.assert_close(sums.cpu().double(), reference.double(), rtol=1e-4, atol=1e-3)
    grad_sums = torch.randn(cpu.shape, generator=g, dtype=torch.float64).to(cpu.dtype)
    grad = ops.score_sums_backward(logits.cuda(), score, group_size, gpu_mask, grad_sums.cuda())
    cpu_grad = ops.score_sums_backward(logits, score, group_size, mask, grad_sums)
    torch.testing.assert_close(grad.cpu(), cpu_grad, **tolerance(dtype))


@pytest.mark.parametrize(
    ("num_tokens", "k", "num_experts", "group_size"), [(10000, 8, 256, 10000), (999, 2, 7, 100)]
)
def test_expert_counts_are_exact(num_tokens, k, num_experts, group_size):
    experts = random_experts(num_tokens, k, num_experts, seed=k)
    mask = (torch.arange(num_tokens) % 5 != 0).to(torch.uint8)
    for m in (None, mask):
        gpu = ops.expert_counts(experts.cuda(), num_experts, group_size, None if m is None else m.cuda())
        assert torch.equal(gpu.cpu(), ops.expert_counts(experts, num_experts, group_size, m))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_matches_the_cpu_and_torch(dtype, masked):
    logits = logits_for(5000, 64, dtype, seed=3)
    mask = (torch.arange(5000) % 7 != 3).to(torch.uint8) if masked else None
    loss, stats = ops.z_loss(logits.cuda(), None if mask is None else mask.cuda())
    cpu_loss, cpu_stats = ops.z_loss(logits, mask)
    tol = tolerance(torch.float32 if dtype != torch.float64 else dtype)
    torch.testing.assert_close(loss.cpu(), cpu_loss, **tol)
    assert torch.equal(stats.cpu()[:, 0], cpu_stats[:, 0])  # the row maxima are exact
    torch.testing.assert_close(stats.cpu(), cpu_stats, **tol)
    grad = torch.tensor(1.5, dtype=loss.dtype)
    grad_logits = ops.z_loss_backward(logits.cuda(), stats, grad.cuda())
    cpu_grad_logits = ops.z_loss_backward(logits, cpu_stats, grad)
    torch.testing.assert_close(grad_logits.cpu().float(), cpu_grad_logits.float(), **tol)
    rows = logits.double() if mask is None else logits.double()[mask.bool()]
    torch.testing.assert_close(
        loss.cpu().double(), torch.logsumexp(rows, dim=1).square().mean(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_plan_is_exact(dtype):
    logits = torch.randint(-1, 2, (64, 40, 3), generator=torch.Generator().manual_seed(1)).to(dtype)
    plans = sparseroute.layer_plan(logits.cuda())
    assert torch.equal(plans.cpu(), sparseroute.layer_plan(logits))
    assert torch.equal(plans.cpu(), layer_plan_reference(logits))


def test_invalid_input_is_counted():
    logits = torch.randn(4, 8, device="cuda")
    logits[2, 1] = float("nan")
    _, stats = ops.z_loss(logits, None)
    assert not stats[2].any()
    with pytest.raises(InvalidInputError, match="NaN"):
        sparseroute.check_cuda_errors()
    counts = ops.expert_counts(torch.tensor([[0, 9]], device="cuda"), 4, 1, None)
    assert counts.tolist() == [[1, 0, 0, 0]]
    with pytest.raises(InvalidInputError, match="expert ids"):
        sparseroute.check_cuda_errors()
    plans = sparseroute.layer_plan(torch.tensor([[float("nan"), 0.0, 0.0]], device="cuda"))
    assert plans.tolist() == [-1]
    with pytest.raises(InvalidInputError, match="layer_plan"):
        sparseroute.check_cuda_errors()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_balance_ops(dtype):
    logits = logits_for(24, 6, dtype, seed=1).cuda().requires_grad_()
    mask = (torch.arange(24, device="cuda") % 5 != 0).to(torch.uint8)
    for score in ("softmax", "sigmoid"):
        torch.library.opcheck(ops.score_sums, (logits, score, 8, None))
        torch.library.opcheck(ops.score_sums, (logits, score, 5, mask))
        sums = ops.score_sums(logits.detach(), score, 8, None)
        torch.library.opcheck(
            ops.score_sums_backward, (logits.detach(), score, 8, mask, torch.randn_like(sums))
        )
    experts = random_experts(24, 2, 6, seed=2).cuda()
    torch.library.opcheck(ops.expert_counts, (experts, 6, 8, None))
    torch.library.opcheck(ops.expert_counts, (experts, 6, 5, mask))
    torch.library.opcheck(ops.z_loss, (logits, None))
    torch.library.opcheck(ops.z_loss, (logits, mask))
    torch.library.opcheck(ops.layer_plan, (logits.detach().reshape(4, 12, 3),))


def balance_losses(logits, experts):
    sums = ops.score_sums(logits, "softmax", 64, None)
    counts = ops.expert_counts(experts, logits.shape[1], 64, None)
    balance = logits.shape[1] * (counts.to(sums.dtype) / 128 * sums / 64).sum()
    return balance + sparseroute.z_loss(logits)


def balance_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(256, 16, generator=g).cuda().requires_grad_()
    experts = random_experts(256, 2, 16, seed=seed, empty=0.0).cuda()
    return logits, experts


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_losses_compile_without_graph_breaks(backend):
    logits, experts = balance_inputs(1)
    torch._dynamo.reset()
    compiled = torch.compile(balance_losses, fullgraph=True, backend=backend)
    expected = balance_losses(logits, experts)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    actual = compiled(logits, experts)
    (actual_grad,) = torch.autograd.grad(actual, logits)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)


def test_losses_cuda_graph_capture_and_replay():
    sparseroute.warm_up_cuda()
    logits, experts = (t.detach().clone() for t in balance_inputs(2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            balance_losses(logits, experts)
            sparseroute.layer_plan(logits.reshape(-1, 4, 4)[..., :3])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = balance_losses(logits, experts)
        static_plan = sparseroute.layer_plan(logits.reshape(-1, 4, 4)[..., :3])
    for seed in (3, 4):
        fresh_logits, fresh_experts = (t.detach() for t in balance_inputs(seed))
        logits.copy_(fresh_logits)
        experts.copy_(fresh_experts)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(
            static_loss, balance_losses(fresh_logits, fresh_experts), rtol=1e-6, atol=1e-6
        )
        assert torch.equal(static_plan, sparseroute.layer_plan(fresh_logits.reshape(-1, 4, 4)[..., :3]))
