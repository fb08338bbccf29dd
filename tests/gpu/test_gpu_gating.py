"""topk_gating on the GPU: the CPU kernel's expert choices bit for bit, its weights and
gradients within a few ulp, the reference's semantics, gradcheck in float64."""

import pytest
import torch
from gpu_helpers import DTYPES, WEIGHT_TOLERANCE, group_bias

import sparseroute
from sparseroute import _cuda_ops

from kernel_inputs import tie_heavy_logits
from reference import topk_gating_reference


def route_both(logits, k, **options):
    """(GPU result, CPU result) of the public op."""
    cpu_options = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in options.items()}
    gpu = sparseroute.topk_gating(logits.cuda(), k, **options)
    cpu = sparseroute.topk_gating(logits.cpu(), k, **cpu_options)
    return gpu, cpu


def assert_same_routing(gpu, cpu, dtype):
    (weights, experts), (cpu_weights, cpu_experts) = gpu, cpu
    assert experts.device.type == weights.device.type == "cuda"
    assert weights.dtype == cpu_weights.dtype and experts.dtype == torch.int64
    assert torch.equal(experts.cpu(), cpu_experts)
    torch.testing.assert_close(weights.cpu(), cpu_weights, **WEIGHT_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_experts", "k"),
    [(1, 1), (2, 2), (8, 2), (60, 4), (64, 8), (160, 16), (600, 6), (2000, 8), (300, 300)],
)
@pytest.mark.parametrize(
    ("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)]
)
def test_matches_the_cpu_kernel_and_the_reference(dtype, num_experts, k, score, normalize):
    logits = tie_heavy_logits(37, num_experts, dtype, seed=num_experts * 31 + k)
    options = {"score": score, "normalize": normalize, "scale": 2.5}
    gpu, cpu = route_both(logits, k, **options)
    assert_same_routing(gpu, cpu, dtype)
    ref_weights, ref_experts = topk_gating_reference(logits, k, **options)
    assert torch.equal(gpu[1].cpu(), ref_experts)
    torch.testing.assert_close(gpu[0].cpu(), ref_weights, **WEIGHT_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_experts", "k"), [(8, 2), (60, 4), (64, 8), (160, 16)])
@pytest.mark.parametrize(("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_warp_kernel_matches_the_lane_team_kernel(monkeypatch, dtype, num_experts, k, score, normalize):
    """The plain-selection cases run a lane team per token; the warp kernel (which the bias and
    group-limit cases use) must route them identically."""
    logits = tie_heavy_logits(53, num_experts, dtype, seed=num_experts + k).cuda()
    options = {"score": score, "normalize": normalize, "scale": 1.5}
    thread = sparseroute.topk_gating(logits, k, **options)
    monkeypatch.setattr(_cuda_ops, "LANE_TEAM_MAX_K", 0)
    warp = sparseroute.topk_gating(logits, k, **options)
    assert torch.equal(thread[1], warp[1])
    torch.testing.assert_close(thread[0], warp[0], **WEIGHT_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts_per_lane", [1, 4, 16, 10_000])
@pytest.mark.parametrize(("num_experts", "k"), [(8, 2), (60, 4), (64, 8), (256, 8), (512, 16), (2000, 2)])
@pytest.mark.parametrize(("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_every_lane_team_width_routes_as_the_cpu(
    monkeypatch, dtype, experts_per_lane, num_experts, k, score, normalize
):
    """1 to 32 lanes per token, several teams per warp and a last warp partly used (1001
    tokens): the CPU's experts bit for bit, its weights within tolerance."""
    monkeypatch.setattr(_cuda_ops, "GATING_TARGET_THREADS", 1 << 30)
    monkeypatch.setattr(_cuda_ops, "GATING_MIN_EXPERTS_PER_LANE", experts_per_lane)
    logits = tie_heavy_logits(1001, num_experts, dtype, seed=num_experts + experts_per_lane)
    gpu, cpu = route_both(logits, k, score=score, normalize=normalize, scale=0.5)
    assert_same_routing(gpu, cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_experts", "num_groups", "topk_groups", "k"),
    [(12, 4, 2, 3), (64, 8, 3, 8), (256, 8, 4, 8), (160, 160, 8, 8), (1024, 16, 4, 8)],
)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_and_group_limit(dtype, num_experts, num_groups, topk_groups, k, score, with_bias):
    logits = tie_heavy_logits(29, num_experts, dtype, seed=num_groups + k)
    options = {"score": score, "num_groups": num_groups, "topk_groups": topk_groups, "scale": 1.5}
    if with_bias:
        options["expert_bias"] = group_bias(num_experts, num_groups, seed=k).cuda()
    gpu, cpu = route_both(logits, k, **options)
    assert_same_routing(gpu, cpu, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_experts", "num_groups", "topk_groups", "k"), [(12, 4, 2, 3), (256, 8, 4, 8)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("group_score_k", [1, 3])
def test_groups_scored_by_one_or_three_keys(
    dtype, num_experts, num_groups, topk_groups, k, score, group_score_k
):
    """A group's score from its best key (DeepSeek-V2's group-limited greedy routing) or its
    three best (one pass per key in the kernel; all of a three-expert group)."""
    logits = tie_heavy_logits(29, num_experts, dtype, seed=num_groups + k + group_score_k)
    options = {
        "score": score,
        "num_groups": num_groups,
        "topk_groups": topk_groups,
        "group_score_k": group_score_k,
        "expert_bias": group_bias(num_experts, num_groups, seed=k).cuda(),
    }
    gpu, cpu = route_both(logits, k, **options)
    assert_same_routing(gpu, cpu, dtype)


def test_bias_without_groups():
    logits = tie_heavy_logits(50, 64, torch.float32, seed=4)
    bias = (torch.arange(64) % 3).float() * 10
    gpu, cpu = route_both(logits, 6, score="sigmoid", expert_bias=bias.cuda())
    assert_same_routing(gpu, cpu, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts_per_lane", [1, 4, 16, 10_000])
@pytest.mark.parametrize(("num_experts", "k"), [(8, 2), (64, 8), (160, 8), (384, 8), (512, 16)])
@pytest.mark.parametrize(("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_every_keyed_lane_team_width_routes_as_the_cpu(
    monkeypatch, dtype, experts_per_lane, num_experts, k, score, normalize
):
    """A selection bias without groups (GLM-4.5, MiniMax-M2, Kimi-K2's one group): keyed lane
    teams of 1 to 32 lanes, the CPU's experts bit for bit, negative keys included."""
    monkeypatch.setattr(_cuda_ops, "GATING_TARGET_THREADS", 1 << 30)
    monkeypatch.setattr(_cuda_ops, "GATING_MIN_EXPERTS_PER_LANE", experts_per_lane)
    logits = tie_heavy_logits(1001, num_experts, dtype, seed=num_experts + experts_per_lane)
    g = torch.Generator().manual_seed(num_experts + k)
    bias = torch.randint(0, 3, (num_experts,), generator=g).float() * 10 - 25
    gpu, cpu = route_both(logits, k, score=score, normalize=normalize, expert_bias=bias.cuda(), scale=0.5)
    assert_same_routing(gpu, cpu, dtype)


def test_deepseek_v3_style_routing_in_float64():
    """Random logits, a small bias, group limit, sigmoid, normalisation and scaling together.
    float64: GPU and CPU keys agree to ~1e-16, so no near-tie can split them."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(512, 256, generator=g, dtype=torch.float64)
    bias = torch.randn(256, generator=g, dtype=torch.float64) * 0.01
    options = {"score": "sigmoid", "num_groups": 8, "topk_groups": 4, "scale": 2.5}
    gpu, cpu = route_both(logits, 8, expert_bias=bias.cuda(), **options)
    assert_same_routing(gpu, cpu, torch.float64)
    assert all(len(set((row // 32).tolist())) <= 4 for row in gpu[1].cpu())


def test_random_logits_select_the_cpu_experts():
    """float32 random logits without bias or groups: selection compares the logits themselves,
    so the GPU picks the CPU's experts exactly, whatever exp rounds to."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4096, 128, generator=g)
    for k in (1, 2, 8):
        gpu, cpu = route_both(logits, k)
        assert_same_routing(gpu, cpu, torch.float32)


def test_subnormal_scores_route_as_on_the_cpu():
    """Scores 4.8e-43 and 3.0e-39 (subnormal) as keys under a group limit: the GPU's expf and
    the CPU's exp both keep them apart and in order."""
    logits = torch.tensor([[97.3613, -0.0744, 8.6539]])
    options = {"normalize": False, "num_groups": 1, "topk_groups": 1, "group_score_k": 1}
    gpu, cpu = route_both(logits, 2, **options)
    assert gpu[1].tolist() == cpu[1].tolist() == [[0, 2]]


def test_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [-0.0, 0.0, -0.0, 0.0, 1.0]])
    _, experts = sparseroute.topk_gating(logits.cuda(), 3)
    assert experts.tolist() == [[1, 2, 4], [0, 1, 2], [4, 0, 1]]


@pytest.mark.parametrize(("num_tokens", "num_experts", "k"), [(0, 8, 2), (1, 1, 1), (5, 7, 7), (3, 700, 16)])
def test_edge_shapes(num_tokens, num_experts, k):
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    weights, experts = sparseroute.topk_gating(logits, k)
    assert weights.shape == experts.shape == (num_tokens, k)
    if num_tokens:
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens, device="cuda"))
        if k == num_experts:
            assert torch.equal(experts.sort(-1).values.cpu(), torch.arange(k).expand(num_tokens, k))


def test_results_are_deterministic_and_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(5)
    for num_experts in (16, 1000):
        logits = torch.randn(300, num_experts, generator=g).cuda()
        weights, experts = sparseroute.topk_gating(logits, 4, score="sigmoid")
        again = sparseroute.topk_gating(logits, 4, score="sigmoid")
        assert torch.equal(weights, again[0]) and torch.equal(experts, again[1])
        part = sparseroute.topk_gating(logits[17:201], 4, score="sigmoid")
        assert torch.equal(part[0], weights[17:201]) and torch.equal(part[1], experts[17:201])


def test_non_finite_rows_are_not_routed_and_reported_on_request():
    logits = torch.randn(6, 8, device="cuda")
    logits[1, 3] = float("nan")
    logits[4, 0] = float("-inf")
    weights, experts = sparseroute.topk_gating(logits, 2)
    assert experts[[1, 4]].tolist() == [[-1, -1], [-1, -1]]
    assert weights[[1, 4]].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    good = [0, 2, 3, 5]
    cpu_weights, cpu_experts = sparseroute.topk_gating(logits[good].cpu(), 2)
    assert torch.equal(experts[good].cpu(), cpu_experts)
    torch.testing.assert_close(weights[good].cpu(), cpu_weights, **WEIGHT_TOLERANCE[torch.float32])
    with pytest.raises(sparseroute.InvalidInputError, match="2 rows of logits holding NaN"):
        sparseroute.check_cuda_errors()
    sparseroute.check_cuda_errors()  # cleared


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts", [10, 700])
@pytest.mark.parametrize(
    ("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)]
)
def test_gradient_matches_the_cpu_kernel(dtype, num_experts, score, normalize):
    g = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(33, num_experts, generator=g).to(dtype)
    grad_out = torch.randn(33, 4, generator=g)
    grads = []
    for device in ("cuda", "cpu"):
        leaf = logits.to(device).requires_grad_()
        weights, _ = sparseroute.topk_gating(leaf, 4, score=score, normalize=normalize, scale=1.7)
        (weights * grad_out.to(device, weights.dtype)).sum().backward()
        grads.append(leaf.grad.cpu())
    assert grads[0].dtype == dtype
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(grads[0], grads[1], rtol=tolerance, atol=tolerance)


def test_gradient_of_top_p_layouts_with_empty_slots():
    """topk_gating_backward with -1 slots (the layout top-p gating produces)."""
    logits = torch.randn(9, 12, dtype=torch.float64)
    _, experts = sparseroute.topk_gating(logits, 4)
    experts[2, 3] = -1
    experts[5, 1:] = -1
    grad = torch.randn(9, 4, dtype=torch.float64)
    for normalize in (True, False):
        args = (experts, grad, "softmax", normalize, 1.0)
        gpu = torch.ops.sparseroute.topk_gating_backward(
            logits.cuda(), *(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        )
        cpu = torch.ops.sparseroute.topk_gating_backward(logits, *args)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_experts", [10, 600])
def test_gradcheck_float64(score, normalize, with_bias, num_experts):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, num_experts, dtype=torch.float64, generator=g).cuda().requires_grad_()
    bias = (torch.randn(num_experts, dtype=torch.float64, generator=g) * 0.01).cuda() if with_bias else None

    def weights_of(logits):
        options = {"score": score, "normalize": normalize, "expert_bias": bias, "scale": 1.5}
        return sparseroute.topk_gating(logits, 3, **options)[0]

    assert torch.autograd.gradcheck(weights_of, (logits,), fast_mode=num_experts > 100)
