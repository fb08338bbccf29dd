"""The CUDA kernels, run on the CPU by the host emulation in cuda_emulation.h, against the
CPU kernels: the same expert choices and permutation plans bit for bit, the combine, the
weighted gather and the slot dot products bit for bit, gating weights and gradients within
float tolerance (the GPU reduces in a different order than the Rust kernels).

This checks the kernel sources and the launch glue (argument widths and order, grid sizes,
workspaces) without a GPU; tests/gpu checks the same on a real device. Skipped without a C++20
compiler.
"""

import pytest
import torch

import invalid_input_cases
from cuda_emulation import compiler, emulated_cuda
from sparseroute import _cuda_ops
from sparseroute.ops._bridge import accumulator_dtype

from kernel_inputs import balance_logits, balance_tolerance, random_logits, tie_heavy_logits
from reference import assert_weights_close, permute_reference, topk_gating_reference, unpermute_reference

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler for the CUDA emulation")

ops = torch.ops.sparseroute
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture
def gpu(monkeypatch):
    with emulated_cuda(monkeypatch) as launcher:
        yield launcher


def gating_args(
    logits,
    k,
    score="softmax",
    normalize=True,
    bias=None,
    groups=None,
    topk_groups=None,
    scale=1.0,
    group_score_k=2,
):
    return (logits, k, score, normalize, bias, groups, topk_groups, group_score_k, scale)


# --- top-k gating --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_experts", "k"), [(1, 1), (5, 5), (8, 2), (24, 12), (64, 6), (600, 4)], ids=lambda v: str(v)
)
@pytest.mark.parametrize(("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True)])
@pytest.mark.parametrize("team", ["lanes", "warp"])
def test_gating_matches_the_cpu_kernel(gpu, monkeypatch, dtype, num_experts, k, score, normalize, team):
    if team == "warp":
        monkeypatch.setattr(_cuda_ops, "LANE_TEAM_MAX_K", 0)
    logits = tie_heavy_logits(9, num_experts, dtype, seed=num_experts + k)
    args = gating_args(logits, k, score, normalize, scale=2.5)
    weights, experts = _cuda_ops.topk_gating_cuda(*args)
    cpu_weights, cpu_experts = ops.topk_gating(*args)
    assert torch.equal(experts, cpu_experts)
    assert weights.dtype == cpu_weights.dtype
    assert_weights_close(weights, cpu_weights, dtype)
    ref_weights, ref_experts = topk_gating_reference(logits, k, score=score, normalize=normalize, scale=2.5)
    assert torch.equal(experts, ref_experts)
    assert_weights_close(weights, ref_weights, dtype)
    assert not gpu.errors.any()
    if team == "lanes":
        expected_kernel = f"sr_topk_gating_team{next(m for m in (2, 4, 8, 16) if m >= k)}"
    elif num_experts > _cuda_ops.WARP_TEAM_MAX_EXPERTS:
        expected_kernel = "sr_topk_gating_block"
    else:
        expected_kernel = "sr_topk_gating_warp"
    assert gpu.launches[-1][0] == expected_kernel


def lane_team_logits(monkeypatch, experts_per_lane, num_experts, dtype, seed):
    """37 rows of logits for the lane-team tests (a last warp only partly used), routed with as
    many lanes per token as leave each lane ``experts_per_lane`` experts: negative logits,
    ties, row 7 zeros of both signs (-0 and +0 tie: lower expert first), row 5 holding a NaN."""
    monkeypatch.setattr(_cuda_ops, "GATING_TARGET_THREADS", 1 << 30)
    monkeypatch.setattr(_cuda_ops, "GATING_MIN_EXPERTS_PER_LANE", experts_per_lane)
    logits = tie_heavy_logits(37, num_experts, dtype, seed=seed) - 2
    logits[7] = 0.0
    logits[7, ::3] = -0.0
    logits[5, num_experts // 2] = float("nan")
    return logits


def finite_rows_after_the_nan_row(gpu, weights, experts, k):
    """Checks that row 5 of lane_team_logits (its NaN) was counted once and not routed;
    returns the mask of the other rows."""
    assert gpu.errors[0].item() == 1
    assert torch.equal(experts[5], torch.full((k,), -1)) and not weights[5].any()
    finite = torch.ones(experts.shape[0], dtype=torch.bool)
    finite[5] = False
    return finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts_per_lane", [1, 3, 8])
@pytest.mark.parametrize(("num_experts", "k"), [(8, 8), (24, 5), (64, 8), (60, 16)], ids=lambda v: str(v))
@pytest.mark.parametrize(("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", False)])
def test_gating_lane_teams_route_as_the_cpu(
    gpu, monkeypatch, dtype, experts_per_lane, num_experts, k, score, normalize
):
    """Every team width routes like the CPU: 2 to 32 lanes per token, several teams per warp,
    a last warp only partly used (37 tokens), and a non-finite row among finite ones."""
    logits = lane_team_logits(monkeypatch, experts_per_lane, num_experts, dtype, seed=num_experts * 7 + k)
    args = gating_args(logits, k, score, normalize, scale=2.5)
    weights, experts = _cuda_ops.topk_gating_cuda(*args)
    lanes = _cuda_ops.gating_lanes(37, num_experts)
    assert lanes == min(32, 1 << (num_experts // experts_per_lane).bit_length() - 1)
    assert gpu.launches[-1][0] == f"sr_topk_gating_team{next(m for m in (2, 4, 8, 16) if m >= k)}"
    finite = finite_rows_after_the_nan_row(gpu, weights, experts, k)
    ref_weights, ref_experts = topk_gating_reference(
        logits[finite], k, score=score, normalize=normalize, scale=2.5
    )
    assert torch.equal(experts[finite], ref_experts)
    assert_weights_close(weights[finite], ref_weights, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("num_experts", "groups", "topk_groups", "k"), [(12, 4, 2, 3), (64, 8, 3, 8), (640, 8, 4, 8)]
)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("group_score_k", [1, 2, 3])
def test_bias_and_group_limit(gpu, dtype, num_experts, groups, topk_groups, k, score, group_score_k):
    """Groups scored by their best one, two or three keys (three: one pass per key, and all
    of a three-expert group), with and without a bias."""
    logits = tie_heavy_logits(7, num_experts, dtype, seed=groups)
    g = torch.Generator().manual_seed(k)
    # One bias class (a multiple of 10) per group: no near-ties between groups (see test_gating).
    bias = (torch.randint(0, 3, (groups,), generator=g).double() * 10).repeat_interleave(
        num_experts // groups
    )
    for expert_bias in (bias.to(dtype), None):
        args = gating_args(logits, k, score, True, expert_bias, groups, topk_groups, 1.5, group_score_k)
        weights, experts = _cuda_ops.topk_gating_cuda(*args)
        cpu_weights, cpu_experts = ops.topk_gating(*args)
        assert torch.equal(experts, cpu_experts)
        assert_weights_close(weights, cpu_weights, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    ("num_experts", "groups", "topk_groups", "k"),
    [
        (6, 2, 1, 3),  # 16 lanes per group, more than the group has experts
        (60, 4, 2, 16),  # 8 lanes per group; 16 pairs per lane
        (256, 8, 4, 8),  # DeepSeek-V3: 4 lanes per group
        (96, 16, 4, 20),  # 2 lanes per group; k > 16: the selection rounds over masked keys
        (32, 32, 6, 5),  # more groups than 16: a lane per group; groups of one expert
        (160, None, None, 1),  # a bias alone (GLM-4.5's width): 2 pairs per lane
        (24, None, None, 17),  # a bias alone, k > 16
    ],
    ids=str,
)
@pytest.mark.parametrize("group_score_k", [1, 2, 3])
def test_the_warp_routes_cached_keys_as_the_cpu(
    gpu, monkeypatch, dtype, num_experts, groups, topk_groups, k, group_score_k
):
    """The warp kernel's cached keys: group scores from several lanes per group, excluded
    groups' keys -inf, selection from the lanes' sorted pairs (k <= 16) or by rounds, with
    negative keys (a bias below minus the scores), exact ties within groups and across them.
    (A bias alone goes to the keyed lane teams unless they are switched off, as here.)"""
    monkeypatch.setattr(_cuda_ops, "LANE_TEAM_MAX_K", 0)
    logits = tie_heavy_logits(9, num_experts, dtype, seed=num_experts + k)
    g = torch.Generator().manual_seed(num_experts)
    classes = groups or num_experts
    # Negative keys of one class (a multiple of 10) per group: ties between groups are exact.
    bias = (torch.randint(0, 3, (classes,), generator=g).double() * 10 - 35).repeat_interleave(
        num_experts // classes
    )
    expert_bias = bias.to(accumulator_dtype(dtype))
    args = gating_args(logits, k, "sigmoid", True, expert_bias, groups, topk_groups, 1.5, group_score_k)
    weights, experts = _cuda_ops.topk_gating_cuda(*args)
    cpu_weights, cpu_experts = ops.topk_gating(*args)
    assert gpu.launches[-1][0] == "sr_topk_gating_warp"
    assert torch.equal(experts, cpu_experts)
    assert_weights_close(weights, cpu_weights, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts_per_lane", [1, 3, 8])
@pytest.mark.parametrize(("num_experts", "k"), [(8, 8), (24, 5), (160, 8), (60, 16)], ids=str)
@pytest.mark.parametrize(
    ("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)]
)
def test_keyed_lane_teams_route_as_the_cpu(
    gpu, monkeypatch, dtype, experts_per_lane, num_experts, k, score, normalize
):
    """A selection bias without groups: every keyed team width (1 to 32 lanes, several teams
    per warp, a last warp partly used) routes like the CPU, with negative keys, exact ties
    of keys, a zero row of both signs and a non-finite row among finite ones."""
    logits = lane_team_logits(monkeypatch, experts_per_lane, num_experts, dtype, seed=num_experts * 5 + k)
    g = torch.Generator().manual_seed(num_experts + k)
    # Classes 10 apart, below minus the scores: negative keys, ties only between equal logits.
    bias = (torch.randint(0, 3, (num_experts,), generator=g).double() * 10 - 35).to(accumulator_dtype(dtype))
    args = gating_args(logits, k, score, normalize, bias, scale=2.5)
    weights, experts = _cuda_ops.topk_gating_cuda(*args)
    width = next(m for m in (2, 4, 8, 16) if m >= k)
    assert gpu.launches[-1][0] == f"sr_topk_gating_keyed_team{width}"
    finite = finite_rows_after_the_nan_row(gpu, weights, experts, k)
    cpu_weights, cpu_experts = ops.topk_gating(
        *gating_args(logits[finite], k, score, normalize, bias, scale=2.5)
    )
    assert torch.equal(experts[finite], cpu_experts)
    assert_weights_close(weights[finite], cpu_weights, dtype)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_one_group_routes_by_score_in_a_keyed_team(gpu, score):
    """One group (and no bias) selects by score, not by logit: distinct logits whose scores
    round to the same value tie, and the lower expert goes first, as on the CPU."""
    logits = torch.tensor([[30.0, 30.5, 31.0, -5.0], [20.0, 21.0, 22.0, 23.0]])
    args = gating_args(logits, 2, score, True, None, 1, 1, 1.0)
    weights, experts = _cuda_ops.topk_gating_cuda(*args)
    assert gpu.launches[-1][0] == "sr_topk_gating_keyed_team2"
    cpu_weights, cpu_experts = ops.topk_gating(*args)
    assert torch.equal(experts, cpu_experts)
    assert_weights_close(weights, cpu_weights, torch.float32)


def test_keyed_softmax_weights_are_stable_when_the_bias_picks_a_small_logit(gpu):
    """The bias puts a small logit first: the softmax over the chosen logits must still be
    taken from their largest (exp(100) overflows float32)."""
    logits = torch.tensor([[0.0, 100.0, 50.0, 1.0]])
    bias = torch.tensor([1000.0, 0.0, 0.0, 0.0])
    args = gating_args(logits, 2, "softmax", True, bias)
    weights, experts = _cuda_ops.topk_gating_cuda(*args)
    assert gpu.launches[-1][0] == "sr_topk_gating_keyed_team2"
    assert experts.tolist() == [[0, 1]]
    assert torch.isfinite(weights).all()
    assert_weights_close(weights, ops.topk_gating(*args)[0], torch.float32)


def test_a_non_finite_bias_leaves_every_row_unrouted(gpu):
    logits = random_logits(6, 16, torch.float32, seed=4)
    bias = torch.zeros(16)
    bias[3] = float("inf")
    weights, experts = _cuda_ops.topk_gating_cuda(*gating_args(logits, 4, "sigmoid", True, bias))
    assert gpu.launches[-1][0] == "sr_topk_gating_keyed_team4"
    assert (experts == -1).all() and not weights.any()
    assert gpu.errors[0].item() == 6


def test_groups_scored_by_more_keys_than_they_have(gpu):
    """A group_score_k beyond any int32 (every key of a group) reaches the kernel in range."""
    logits = random_logits(9, 12, torch.float32, seed=3)
    args = gating_args(logits, 3, "softmax", True, None, 4, 2, 1.0, 2**40)
    weights, experts = _cuda_ops.topk_gating_cuda(*args)
    cpu_weights, cpu_experts = ops.topk_gating(*args)
    assert torch.equal(experts, cpu_experts)
    every_key = gating_args(logits, 3, "softmax", True, None, 4, 2, 1.0, 3)
    assert torch.equal(experts, ops.topk_gating(*every_key)[1])
    assert_weights_close(weights, cpu_weights, torch.float32)


def test_deepseek_v3_style_routing(gpu):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(16, 256, generator=g)
    bias = torch.randn(256, generator=g) * 0.01
    args = gating_args(logits, 8, "sigmoid", True, bias, 8, 4, 2.5)
    weights, experts = _cuda_ops.topk_gating_cuda(*args)
    cpu_weights, cpu_experts = ops.topk_gating(*args)
    assert torch.equal(experts, cpu_experts)
    torch.testing.assert_close(weights, cpu_weights)


def test_non_finite_rows_are_counted_not_routed(gpu):
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    logits[1, 4] = float("nan")
    logits[3, 0] = float("inf")
    weights, experts = _cuda_ops.topk_gating_cuda(*gating_args(logits, 2))
    assert experts[1].tolist() == [-1, -1] and experts[3].tolist() == [-1, -1]
    assert weights[1].tolist() == [0.0, 0.0] and weights[3].tolist() == [0.0, 0.0]
    good = [0, 2, 4]
    cpu_weights, cpu_experts = ops.topk_gating(*gating_args(logits[good], 2))
    assert torch.equal(experts[good], cpu_experts)
    torch.testing.assert_close(weights[good], cpu_weights)
    assert gpu.errors.tolist() == [2, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("num_experts", [6, 700])
@pytest.mark.parametrize(
    ("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)]
)
def test_gating_backward_matches_the_cpu_kernel(gpu, dtype, num_experts, score, normalize):
    g = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(5, num_experts, generator=g).to(dtype)
    k = 3
    _, experts = ops.topk_gating(logits, k, score, normalize, None, None, None, 2, 1.0)
    experts[2, 1] = -1  # an empty slot (top-p layouts have them)
    grad_weights = torch.randn(5, k, generator=g, dtype=torch.float64).to(accumulator_dtype(dtype))
    args = (logits, experts, grad_weights, score, normalize, 1.7)
    grad = _cuda_ops.topk_gating_backward_cuda(*args)
    cpu_grad = ops.topk_gating_backward(*args)
    assert grad.dtype == cpu_grad.dtype == dtype
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(grad, cpu_grad, rtol=tolerance, atol=tolerance)


def test_gating_empty_batch(gpu):
    weights, experts = _cuda_ops.topk_gating_cuda(*gating_args(torch.empty(0, 8), 2))
    assert weights.shape == experts.shape == (0, 2)
    assert gpu.launches == []


def test_gating_checks_its_arguments(gpu):
    with pytest.raises(ValueError, match="k: expected 1 <= k <= E = 4"):
        _cuda_ops.topk_gating_cuda(*gating_args(torch.zeros(2, 4), 5))
    with pytest.raises(ValueError, match="num_groups"):
        _cuda_ops.topk_gating_cuda(*gating_args(torch.zeros(2, 6), 2, groups=4, topk_groups=1))


def test_gating_launch_is_chosen_once_per_call_signature(gpu, monkeypatch):
    """The kernel and the launch shape are chosen, and the arguments checked, on a call
    signature's first call; its later calls reuse them, while what may differ from call to call
    (the alignment of the logits, the scale) is read on each, and invalid arguments raise on
    every call."""
    monkeypatch.setattr(_cuda_ops, "_gating_launches", {})
    chosen = []
    choose = _cuda_ops._gating_launch
    monkeypatch.setattr(_cuda_ops, "_gating_launch", lambda *args: chosen.append(args[1:]) or choose(*args))
    launched = []
    launch = type(gpu).__call__
    monkeypatch.setattr(
        type(gpu), "__call__", lambda self, *args: launched.append(args[5]) or launch(self, *args)
    )
    logits = tie_heavy_logits(9, 64, torch.bfloat16, seed=1)
    unaligned = torch.empty(9 * 64 + 1, dtype=torch.bfloat16)[1:].view(9, 64)  # 2 bytes past a word
    unaligned.copy_(logits)
    for x, scale in [(logits, 1.0), (unaligned, 2.5), (logits, 2.5)]:
        weights, experts = _cuda_ops.topk_gating_cuda(*gating_args(x, 8, scale=scale))
        cpu_weights, cpu_experts = ops.topk_gating(*gating_args(x, 8, scale=scale))
        assert torch.equal(experts, cpu_experts)
        assert_weights_close(weights, cpu_weights, torch.bfloat16)
    assert len(chosen) == 1
    # sr_topk_gating_team8's arguments after the row's six: the scale, then words or pairs.
    assert [(args[6], args[7]) for args in launched] == [(1.0, True), (2.5, False), (2.5, True)]
    with pytest.raises(ValueError, match="scale: expected a finite number"):
        _cuda_ops.topk_gating_cuda(*gating_args(logits, 8, scale=float("nan")))
    _cuda_ops.topk_gating_cuda(*gating_args(logits[:5], 8))  # another shape: chosen again
    assert len(chosen) == 2
    for _ in range(2):
        with pytest.raises(ValueError, match="k: expected 1 <= k <= E = 64"):
            _cuda_ops.topk_gating_cuda(*gating_args(logits, 65))
    assert len(chosen) == 4 and len(_cuda_ops._gating_launches) == 2


def test_gating_launches_kept_are_bounded(gpu, monkeypatch):
    monkeypatch.setattr(_cuda_ops, "_gating_launches", {})
    monkeypatch.setattr(_cuda_ops, "MAX_CACHED_LAUNCHES", 3)
    for num_tokens in range(1, 8):
        logits = tie_heavy_logits(num_tokens, 16, torch.float32, seed=num_tokens)
        _, experts = _cuda_ops.topk_gating_cuda(*gating_args(logits, 2))
        assert torch.equal(experts, ops.topk_gating(*gating_args(logits, 2))[1])
        assert 1 <= len(_cuda_ops._gating_launches) <= 3


# --- permute ------------------------------------------------------------------------------------


def random_experts(num_tokens, k, num_experts, seed, empty=0.1):
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, num_experts, (num_tokens, k), generator=g)
    holes = torch.rand(num_tokens, k, generator=g) < empty
    return experts.masked_fill(holes, -1)


def permute_on_both(args):
    """permute's CUDA glue (emulated) and CPU op on the same arguments: every output, the
    plan included, must be the same, dtype, shape and bits; returns the CUDA outputs."""
    ours = _cuda_ops.permute_cuda(*args)
    cpu = ops.permute(*args)
    names = ["x_sorted", "tokens_per_expert", "offsets", "row_to_slot", "slot_to_row", "dropped"]
    for name, a, b in zip(names, ours, cpu, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    return ours


@pytest.mark.parametrize(
    ("num_tokens", "k", "num_experts"), [(0, 2, 4), (1, 1, 1), (37, 2, 3), (300, 4, 64), (200, 3, 1000)]
)
@pytest.mark.parametrize("static_rows", [False, True])
@pytest.mark.parametrize("kernels", ["one block", "chunked"])
def test_permute_plan_is_the_cpu_plan(gpu, monkeypatch, num_tokens, k, num_experts, static_rows, kernels):
    if kernels == "chunked":
        monkeypatch.setattr(_cuda_ops, "SMALL_PLAN_MAX_SLOTS", -1)
    experts = random_experts(num_tokens, k, num_experts, seed=num_tokens)
    x = torch.randn(num_tokens, 8, generator=torch.Generator().manual_seed(1))
    num_rows = num_tokens * k + 3 if static_rows else None
    args = (x, experts, num_experts, num_rows, None, None, False)
    ours = permute_on_both(args)
    if not static_rows:
        ref_sorted, plan = permute_reference(x, experts, num_experts)
        assert torch.equal(ours[0], ref_sorted)
        assert torch.equal(ours[3], plan["row_to_slot"])
    assert not gpu.errors.any()
    names = [launch[0] for launch in gpu.launches]
    if kernels == "one block" and num_experts <= _cuda_ops.SMALL_PLAN_MAX_EXPERTS:
        assert "sr_plan_small" in names and "sr_plan_scan" not in names
    else:
        assert "sr_plan_small" not in names and "sr_plan_scan" in names


@pytest.mark.parametrize(("num_tokens", "k", "num_experts"), [(1, 1, 1), (37, 2, 3), (300, 4, 64)])
@pytest.mark.parametrize("block_size", [2, 16])
@pytest.mark.parametrize("kernels", ["one block", "chunked"])
def test_block_aligned_plan_is_the_cpu_plan(
    gpu, monkeypatch, num_tokens, k, num_experts, block_size, kernels
):
    """Each expert's rows in whole blocks: the aligned scan, and the padding rows' -1 (the
    one-block kernel writes them itself; the chunked path fills first)."""
    if kernels == "chunked":
        monkeypatch.setattr(_cuda_ops, "SMALL_PLAN_MAX_SLOTS", -1)
    experts = random_experts(num_tokens, k, num_experts, seed=block_size)
    x = torch.randn(num_tokens, 8, generator=torch.Generator().manual_seed(1))
    bound = num_tokens * k + num_experts * (block_size - 1)  # the bound before whole blocks
    for num_rows in (None, bound):
        permute_on_both((x, experts, num_experts, num_rows, None, None, False, block_size))
    weights = torch.rand(num_tokens, k, generator=torch.Generator().manual_seed(2))
    for drop_weights in (None, weights):
        permute_on_both((x, experts, num_experts, None, 3, drop_weights, False, block_size))
        permute_on_both((x, experts, num_experts, None, 2 * block_size, drop_weights, True, block_size))
    assert not gpu.errors.any()


def test_permute_plan_over_many_chunks(gpu, monkeypatch):
    """Small chunks: the per-chunk cursors must chain chunk after chunk."""
    monkeypatch.setattr(_cuda_ops, "PLAN_CHUNK_SLOTS", 40)
    monkeypatch.setattr(_cuda_ops, "SMALL_PLAN_MAX_SLOTS", -1)
    experts = random_experts(500, 2, 7, seed=5, empty=0.2)
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(2))
    args = (x, experts, 7, None, None, None, False)
    ours = _cuda_ops.permute_cuda(*args)
    cpu = ops.permute(*args)
    assert all(torch.equal(a, b) for a, b in zip(ours, cpu, strict=True))
    count_launch = next(launch for launch in gpu.launches if launch[0] == "sr_plan_count")
    assert count_launch[1] == 7  # 25 chunks of 40 slots, four warps per block


@pytest.mark.parametrize(
    ("kernels", "num_tokens", "chunk_slots", "min_chunks"),
    [
        ("one block", 5000, None, None),  # 313 slots per warp: a whole batch of 8 steps, then part of one
        ("chunked", 3000, 1024, 1),  # 6 chunks of 1000 slots: four batches each
        ("chunked", 2000, 40, None),  # 100 chunks: each expert's column takes four warp steps
    ],
)
def test_permute_plan_over_long_chunks_and_many_chunks(
    gpu, monkeypatch, kernels, num_tokens, chunk_slots, min_chunks
):
    """Chunks longer than one batch of loads (SR_PLAN_BATCH steps of 32 slots) and more chunks
    than a warp has lanes: the batches must chain in slot order, and the column walks of
    sr_plan_totals and sr_plan_cursors must carry from one 32 chunks to the next. With
    padding rows, spare rows past the plan and empty slots."""
    if kernels == "chunked":
        monkeypatch.setattr(_cuda_ops, "SMALL_PLAN_MAX_SLOTS", -1)
    if chunk_slots is not None:
        monkeypatch.setattr(_cuda_ops, "PLAN_CHUNK_SLOTS", chunk_slots)
    if min_chunks is not None:
        monkeypatch.setattr(_cuda_ops, "PLAN_MIN_CHUNKS", min_chunks)
    experts = random_experts(num_tokens, 2, 8, seed=num_tokens, empty=0.1)
    x = torch.randn(num_tokens, 4, generator=torch.Generator().manual_seed(3))
    for block_size, num_rows in ((1, None), (1, 2 * num_tokens + 100), (16, 2 * num_tokens + 8 * 15)):
        permute_on_both((x, experts, 8, num_rows, None, None, False, block_size))
    assert not gpu.errors.any()
    names = {launch[0] for launch in gpu.launches}
    assert ("sr_plan_small" in names) == (kernels == "one block")


def test_permute_plan_chunking_respects_the_workspace_bound():
    chunks, chunk = _cuda_ops.plan_chunks(1 << 20, 100_000)
    assert chunks * 100_000 <= _cuda_ops.PLAN_WORKSPACE_ENTRIES and chunks * chunk >= 1 << 20
    assert _cuda_ops.plan_chunks(0, 8) == (0, 1)
    chunks, chunk = _cuda_ops.plan_chunks(5000, 8)
    assert (chunks - 1) * chunk < 5000 <= chunks * chunk


def test_permute_plan_chunks_shrink_for_small_plans():
    """Few slots: smaller chunks, so that more warps share the walk; many: full chunks."""
    assert _cuda_ops.plan_chunks(4096, 8) == (32, 128)  # T = 2048, k = 2
    assert _cuda_ops.plan_chunks(100, 8) == (1, 100)
    assert _cuda_ops.plan_chunks(16384, 64) == (64, 256)
    assert _cuda_ops.plan_chunks(131072, 64) == (128, 1024)  # T = 16384, k = 8


@pytest.mark.parametrize("kernels", ["one block", "chunked"])
def test_invalid_expert_ids_and_short_num_rows_are_counted(gpu, monkeypatch, kernels):
    if kernels == "chunked":
        monkeypatch.setattr(_cuda_ops, "SMALL_PLAN_MAX_SLOTS", -1)
    experts = torch.tensor([[0, 9], [1, -3], [0, 1]])
    x = torch.randn(3, 4)
    _, tpe, offsets, _, slot_to_row, _ = _cuda_ops.permute_cuda(x, experts, 2, None, None, None, False)
    assert gpu.errors.tolist() == [0, 2, 0, 0, 0, 0, 0, 0]  # each invalid id counted once
    assert slot_to_row.tolist() == [[0, -1], [2, -1], [1, 3]]
    assert tpe.tolist() == [2, 2] and offsets.tolist() == [0, 2, 4]
    gpu.errors.zero_()
    _, _, _, row_to_slot, slot_to_row, _ = _cuda_ops.permute_cuda(
        x, experts.clamp(0, 1), 2, 4, None, None, False
    )
    assert gpu.errors.tolist() == [0, 0, 0, 2, 0, 0, 0, 0]  # the two slots that did not fit
    assert row_to_slot.shape == (4,) and (slot_to_row == -1).sum() == 2


def permute_capacity_args(num_tokens, k, num_experts, capacity, policy, pad, num_rows=None, seed=0):
    experts = random_experts(num_tokens, k, num_experts, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_tokens, 6, generator=g)
    # Weights on a coarse grid: many exact ties, which the tie rule (lower slot) must break.
    weights = (torch.randint(0, 4, (num_tokens, k), generator=g).float() / 4) if policy == "probs" else None
    return (x, experts, num_experts, num_rows, capacity, weights, pad)


@pytest.mark.parametrize(
    ("num_tokens", "k", "num_experts", "capacity"),
    [(0, 2, 4, 3), (1, 1, 1, 0), (37, 2, 3, 5), (64, 4, 8, 40), (300, 4, 64, 3), (50, 2, 5, 1000)],
)
@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("pad", [False, True])
def test_capacity_plan_is_the_cpu_plan(gpu, num_tokens, k, num_experts, capacity, policy, pad):
    args = permute_capacity_args(
        num_tokens, k, num_experts, capacity, policy, pad, seed=num_tokens + capacity
    )
    permute_on_both(args)
    assert not gpu.errors.any()


def test_capacity_plan_with_static_rows_and_signed_zero_weights(gpu):
    # Every slot to expert 0; weights -0.0 and 0.0 alternate: total order puts 0.0 first.
    experts = torch.zeros(8, 1, dtype=torch.int64)
    weights = torch.tensor([[-0.0], [0.0]] * 4)
    x = torch.randn(8, 3)
    args = (x, experts, 2, 6, 3, weights, False)
    ours = _cuda_ops.permute_cuda(*args)
    cpu = ops.permute(*args)
    assert all(torch.equal(a, b) for a, b in zip(ours, cpu, strict=True))
    assert ours[3][:3].tolist() == [1, 3, 5] and ours[3][3:].tolist() == [-1, -1, -1]


def test_nan_drop_weights_are_counted(gpu):
    experts = torch.zeros(4, 1, dtype=torch.int64)
    weights = torch.tensor([[0.5], [float("nan")], [0.25], [1.0]])
    _cuda_ops.permute_cuda(torch.zeros(4, 2), experts, 1, None, 2, weights, False)
    assert gpu.errors.tolist() == [0, 0, 0, 0, 0, 0, 1, 0]


def test_capacity_rows_past_num_rows_are_counted(gpu):
    experts = torch.tensor([[0], [1], [0], [1]])
    _, _, _, row_to_slot, slot_to_row, _ = _cuda_ops.permute_cuda(
        torch.zeros(4, 2), experts, 2, 3, 2, None, False
    )
    assert gpu.errors.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert row_to_slot.tolist() == [0, 2, 1] and slot_to_row.flatten().tolist() == [0, 2, 1, -1]


# --- rows: gather, combine, dot products ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_len", [1, 5, 16, 40])
def test_row_kernels_match_the_cpu_kernels_bit_for_bit(gpu, dtype, row_len):
    g = torch.Generator().manual_seed(row_len)
    num_tokens, k, num_experts = 23, 3, 5
    experts = random_experts(num_tokens, k, num_experts, seed=row_len, empty=0.2)
    x = torch.randn(num_tokens, row_len, generator=g).to(dtype)
    _, _, _, row_to_slot, slot_to_row, _ = ops.permute(
        x, experts, num_experts, num_tokens * k, None, None, False
    )
    y_sorted = torch.randn(num_tokens * k, row_len, generator=g).to(dtype)
    weights = torch.rand(num_tokens, k, generator=g, dtype=torch.float64).to(accumulator_dtype(dtype))
    for w in (None, weights):
        combined = _cuda_ops.unpermute_cuda(y_sorted, slot_to_row, row_to_slot, w)
        assert torch.equal(combined, ops.unpermute(y_sorted, slot_to_row, row_to_slot, w))
        assert torch.equal(combined, unpermute_reference(y_sorted, slot_to_row, w))
        gathered = _cuda_ops.gather_rows_cuda(x, row_to_slot, k, w)
        assert torch.equal(gathered, ops.gather_rows(x, row_to_slot, k, w))
    grad_y = torch.randn(num_tokens, row_len, generator=g).to(dtype)
    dots = _cuda_ops.slot_dots_cuda(grad_y, y_sorted, slot_to_row)
    assert torch.equal(dots, ops.slot_dots(grad_y, y_sorted, slot_to_row))
    assert not gpu.errors.any()


def test_long_rows_use_16_byte_words(gpu):
    x = torch.randn(4, 64)
    row_to_slot = torch.tensor([3, -1, 0, 2])
    out = _cuda_ops.gather_rows_cuda(x, row_to_slot, 1, None)
    assert torch.equal(out, ops.gather_rows(x, row_to_slot, 1, None))
    odd = _cuda_ops.gather_rows_cuda(x[:, 1:], row_to_slot, 1, None)  # 63 floats: element by element
    assert torch.equal(odd, ops.gather_rows(x[:, 1:].contiguous(), row_to_slot, 1, None))


def test_subnormal_values_survive_the_combine(gpu):
    """No flush-to-zero: the products below float32's normal range stay what the CPU gives."""
    y_sorted = torch.full((2, 4), 1e-30)
    slot_to_row = torch.tensor([[0, 1]])
    weights = torch.tensor([[1e-10, 3e-10]])
    ours = _cuda_ops.unpermute_cuda(y_sorted, slot_to_row, torch.tensor([0, 0]), weights)
    cpu = ops.unpermute(y_sorted, slot_to_row, torch.tensor([0, 0]), weights)
    assert torch.equal(ours, cpu) and (cpu != 0).all()


# --- tokens: Mixture-of-Depths -----------------------------------------------------------------


def token_indices(batch, seq_len, capacity, seed, holes=0.2):
    """Distinct positions per sequence in ascending order, then -1 entries."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        kept = torch.randperm(seq_len, generator=g)[:capacity].sort().values
        kept = kept[torch.rand(capacity, generator=g) >= holes]
        rows.append(torch.cat([kept, torch.full((capacity - kept.numel(),), -1, dtype=torch.int64)]))
    return torch.stack(rows) if rows else torch.empty(0, capacity, dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "seq_len", "capacity", "row_len"), [(3, 11, 4, 5), (2, 40, 40, 16), (4, 9, 0, 3)]
)
def test_token_row_kernels_match_the_cpu_kernels_bit_for_bit(gpu, dtype, batch, seq_len, capacity, row_len):
    g = torch.Generator().manual_seed(seq_len + capacity)
    indices = token_indices(batch, seq_len, capacity, seed=row_len)
    x = torch.randn(batch, seq_len, row_len, generator=g).to(dtype)
    y = torch.randn(batch, capacity, row_len, generator=g).to(dtype)
    gate = torch.rand(batch, seq_len, generator=g, dtype=torch.float64).to(accumulator_dtype(dtype))
    for scale in (None, gate):
        rows = _cuda_ops.gather_tokens_cuda(x, indices, scale)
        assert torch.equal(rows, ops.gather_tokens(x, indices, scale))
    for base, ys, g_ in [(x, y, None), (x, y, gate), (None, y, None), (None, y, gate), (x, None, None)]:
        out = _cuda_ops.scatter_tokens_cuda(base, ys, indices, g_, seq_len)
        assert torch.equal(out, ops.scatter_tokens(base, ys, indices, g_, seq_len))
    dots = _cuda_ops.token_dots_cuda(x, y, indices)
    assert torch.equal(dots, ops.token_dots(x, y, indices))
    assert not gpu.errors.any()


def test_gated_scatter_rounds_once(gpu):
    """x + gate * y in float32, one rounding into bfloat16: not two roundings."""
    x = torch.tensor([[[1.0]]], dtype=torch.bfloat16)
    y = torch.tensor([[[2.0**-9]]], dtype=torch.bfloat16)
    gate = torch.tensor([[1.5]])
    indices = torch.tensor([[0]])
    out = _cuda_ops.scatter_tokens_cuda(x, y, indices, gate, 1)
    assert torch.equal(out, ops.scatter_tokens(x, y, indices, gate, 1))
    assert out.item() == torch.tensor(1.0 + 1.5 * 2.0**-9).bfloat16().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_len", [3, 8])  # element by element, and in 16-byte words
def test_gated_scatter_without_a_base_keeps_the_sign_of_a_zero(gpu, dtype, row_len):
    """gate * y with no base is the product alone, as on the CPU: adding a zero base would
    turn a -0.0 product into +0.0 (torch.equal does not tell them apart; the bits do)."""
    y = torch.full((1, 1, row_len), -1.0, dtype=dtype)
    gate = torch.zeros(1, 1, dtype=accumulator_dtype(dtype))
    indices = torch.tensor([[0]])
    out = _cuda_ops.scatter_tokens_cuda(None, y, indices, gate, 1)
    cpu = ops.scatter_tokens(None, y, indices, gate, 1)
    assert torch.signbit(cpu).all()
    assert torch.equal(torch.signbit(out), torch.signbit(cpu)) and torch.equal(out, cpu)


SELECT_CASES = [
    # (rule, value, capacity)
    ("top", 0.0, 5),
    ("top", 0.0, 0),
    ("top", 0.0, 17),
    ("fraction", 0.3, 6),
    ("fraction", 0.1, 2),
    ("fraction", 1.0, 17),
    ("threshold", 1.5, 4),
    ("threshold", -1.0, 17),
    ("threshold", 2.0, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rule", "value", "capacity"), SELECT_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_select_tokens_matches_the_cpu_kernel(gpu, dtype, rule, value, capacity, with_lengths):
    g = torch.Generator().manual_seed(capacity)
    scores = torch.randint(-2, 4, (5, 17), generator=g).to(dtype)  # many exact ties
    scores[0, 3] = -0.0
    scores[0, 4] = 0.0
    lengths = torch.tensor([17, 0, 9, 16, 3]) if with_lengths else None
    if lengths is not None:
        scores[4, 3:] = float("nan")  # padding is never read
    args = (scores, capacity, rule, value, lengths)
    indices, mask = _cuda_ops.select_tokens_cuda(*args)
    cpu_indices, cpu_mask = ops.select_tokens(*args)
    assert torch.equal(indices, cpu_indices) and torch.equal(mask, cpu_mask)
    assert mask.dtype == torch.bool
    assert not gpu.errors.any()


def test_select_tokens_over_several_chunks(gpu):
    """Sequences longer than the block: the kept entries continue chunk after chunk."""
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 700, generator=g)
    scores[1, :300] = 1.0  # ties across chunks
    for rule, value, capacity in [("top", 0.0, 300), ("fraction", 0.25, 300), ("threshold", 0.5, 250)]:
        args = (scores, capacity, rule, value, torch.tensor([700, 650, 513]))
        indices, mask = _cuda_ops.select_tokens_cuda(*args)
        cpu_indices, cpu_mask = ops.select_tokens(*args)
        assert torch.equal(indices, cpu_indices) and torch.equal(mask, cpu_mask)
    # Three warps per block: each digit takes two steps of four keys per thread.
    assert gpu.launches[-1] == ("sr_select_tokens", 3, 96)


def test_select_tokens_in_full_blocks(gpu):
    """Sequences long enough for 1024-thread blocks: every warp compacts its own run of
    positions, the ties at the threshold span many runs, and each digit takes several steps."""
    g = torch.Generator().manual_seed(9)
    scores = torch.randint(0, 40, (2, 9000), generator=g).to(torch.float32)
    lengths = torch.tensor([9000, 8001])
    for rule, value, capacity in [("top", 0.0, 2500), ("threshold", 30.0, 2000)]:
        args = (scores, capacity, rule, value, lengths)
        indices, mask = _cuda_ops.select_tokens_cuda(*args)
        cpu_indices, cpu_mask = ops.select_tokens(*args)
        assert torch.equal(indices, cpu_indices) and torch.equal(mask, cpu_mask)
    assert gpu.launches[-1] == ("sr_select_tokens", 2, 1024)
    assert not gpu.errors.any()


def test_select_threads_follow_the_sequence_length():
    lengths = (0, 1, 256, 257, 4096, 8192, 10**6)
    assert [_cuda_ops.select_threads(n) for n in lengths] == [32, 32, 32, 64, 512, 1024, 1024]


def test_select_rejects_sequences_its_int32_counts_cannot_hold():
    _cuda_ops._check_int32_count(2**31 - 1, "scores", "positions per sequence")
    with pytest.raises(_cuda_ops.InvalidInputError, match=r"scores: expected at most 2147483647"):
        _cuda_ops._check_int32_count(2**31, "scores", "positions per sequence")


# --- load balancing -----------------------------------------------------------------------------


# Every dtype, score and mask on the small shapes; on the long ones (one group of 40 segments,
# its totals by warps; groups of 15-16 segments, by threads), whose emulation takes seconds
# a case, each dtype once and each score and mask twice: the segment walk does not depend on
# them.
SCORE_SUMS_CASES = [
    (dtype, score, *shape, masked)
    for shape in [(7, 5, 7), (40, 70, 3)]
    for dtype in DTYPES
    for score in ["softmax", "sigmoid"]
    for masked in [False, True]
] + [
    (dtype, score, *shape, masked)
    for shape in [(2500, 6, 2500), (2500, 6, 900)]
    for dtype, score, masked in [
        (torch.float32, "softmax", False),
        (torch.bfloat16, "sigmoid", True),
        (torch.float16, "softmax", True),
        (torch.float64, "sigmoid", False),
    ]
]


@pytest.mark.parametrize(
    ("dtype", "score", "num_tokens", "num_experts", "group_size", "masked"),
    [pytest.param(*case, id="-".join(map(str, case)).replace("torch.", "")) for case in SCORE_SUMS_CASES],
)
def test_score_sums_and_gradient_match_the_cpu_kernels(
    gpu, dtype, score, num_tokens, num_experts, group_size, masked
):
    logits = balance_logits(num_tokens, num_experts, dtype, seed=num_tokens)
    g = torch.Generator().manual_seed(group_size)
    mask = (torch.rand(num_tokens, generator=g) > 0.3).to(torch.uint8) if masked else None
    sums = _cuda_ops.score_sums_cuda(logits, score, group_size, mask)
    cpu = ops.score_sums(logits, score, group_size, mask)
    assert sums.dtype == cpu.dtype and sums.shape == cpu.shape
    torch.testing.assert_close(sums, cpu, **balance_tolerance(dtype))
    grad_sums = torch.randn(cpu.shape, generator=g, dtype=torch.float64).to(cpu.dtype)
    grad = _cuda_ops.score_sums_backward_cuda(logits, score, group_size, mask, grad_sums)
    cpu_grad = ops.score_sums_backward(logits, score, group_size, mask, grad_sums)
    assert grad.dtype == cpu_grad.dtype == dtype
    tolerance = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype)
    if tolerance is None:
        torch.testing.assert_close(grad, cpu_grad, **balance_tolerance(dtype))
    else:
        torch.testing.assert_close(grad, cpu_grad, rtol=tolerance, atol=tolerance)
    assert not gpu.errors.any()


@pytest.mark.parametrize(
    ("num_tokens", "k", "num_experts", "group_size"),
    [
        (9, 2, 4, 9),
        (300, 3, 17, 40),
        (5, 1, 3, 1),
        # Chunks of 2048 slots: two groups of 2200 slots, each of two chunks (the second
        # short), and a last, shorter group; then one group larger than the tokens.
        (2300, 2, 37, 1100),
        (3000, 1, 5, 10**6),
        # More experts than the shared counters hold: every slot adds to the global counts.
        (700, 3, 5000, 300),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_expert_counts_are_the_cpu_counts(gpu, num_tokens, k, num_experts, group_size, masked):
    experts = random_experts(num_tokens, k, num_experts, seed=num_tokens, empty=0.2)
    mask = (torch.arange(num_tokens) % 3 != 1).to(torch.uint8) if masked else None
    counts = _cuda_ops.expert_counts_cuda(experts, num_experts, group_size, mask)
    assert torch.equal(counts, ops.expert_counts(experts, num_experts, group_size, mask))
    assert not gpu.errors.any()


def test_expert_counts_count_invalid_ids(gpu):
    counts = _cuda_ops.expert_counts_cuda(torch.tensor([[0, 5], [-2, 1]]), 3, 2, None)
    assert counts.tolist() == [[1, 1, 0]]
    assert gpu.errors.tolist() == [0, 2, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "num_experts"), [(1, 1), (13, 8), (3000, 5), (6, 100)])
@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_matches_the_cpu_kernel(gpu, dtype, num_tokens, num_experts, masked):
    logits = balance_logits(num_tokens, num_experts, dtype, seed=num_experts)
    if num_experts > 1:
        logits[0, 0] = float("-inf")  # probability 0, not an error
    mask = (torch.arange(num_tokens) % 4 != 2).to(torch.uint8) if masked else None
    if masked and num_tokens > 2:
        logits[2] = float("nan")  # a masked token's logits are never read
    loss, stats = _cuda_ops.z_loss_cuda(logits, mask)
    cpu_loss, cpu_stats = ops.z_loss(logits, mask)
    assert loss.dtype == cpu_loss.dtype and loss.shape == cpu_loss.shape == ()
    assert stats.dtype == cpu_stats.dtype and stats.shape == cpu_stats.shape == (num_tokens, 2)
    torch.testing.assert_close(loss, cpu_loss, **balance_tolerance(dtype))
    assert torch.equal(stats[:, 0], cpu_stats[:, 0])  # the row maxima are exact
    torch.testing.assert_close(stats[:, 1], cpu_stats[:, 1], **balance_tolerance(dtype))
    grad = torch.tensor(-0.75, dtype=loss.dtype)
    grad_logits = _cuda_ops.z_loss_backward_cuda(logits, stats, grad)
    cpu_grad_logits = ops.z_loss_backward(logits, cpu_stats, grad)
    assert grad_logits.dtype == cpu_grad_logits.dtype == dtype
    torch.testing.assert_close(grad_logits.float(), cpu_grad_logits.float(), **balance_tolerance(dtype))
    if masked:
        assert not grad_logits[mask == 0].any()
    assert not gpu.errors.any()


def test_non_finite_logits_are_counted_by_the_balance_kernels(gpu):
    logits = torch.randn(4, 3)
    logits[1, 2] = float("nan")
    logits[2, 0] = float("inf")
    _, stats = _cuda_ops.z_loss_cuda(logits, None)
    assert not stats[1].any() and not stats[2].any()
    assert gpu.errors.tolist() == [2, 0, 0, 0, 0, 0, 0, 0]
    grad_logits = _cuda_ops.z_loss_backward_cuda(logits, stats, torch.tensor(1.0))
    assert not grad_logits[1:3].any() and grad_logits[[0, 3]].all()
    gpu.errors.zero_()
    sums = _cuda_ops.score_sums_cuda(logits, "softmax", 4, None)
    torch.testing.assert_close(sums, ops.score_sums(logits[[0, 3]], "softmax", 4, None))
    assert gpu.errors.tolist() == [2, 0, 0, 0, 0, 0, 0, 0]


def test_empty_masks_give_a_zero_z_loss(gpu):
    loss, stats = _cuda_ops.z_loss_cuda(torch.randn(3, 4), torch.zeros(3, dtype=torch.uint8))
    assert loss.item() == 0.0 and not stats.any()


# --- layer routing ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_plan_is_the_cpu_plan(gpu, dtype):
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(-1, 2, (7, 300, 3), generator=g).to(dtype)  # every kind of tie
    logits[0, 0] = torch.tensor([float("-inf"), float("-inf"), float("-inf")])
    logits[0, 1] = torch.tensor([float("inf"), 0.0, float("inf")])
    plans = _cuda_ops.layer_plan_cuda(logits)
    assert torch.equal(plans, ops.layer_plan(logits))
    assert not gpu.errors.any()


def test_layer_plan_counts_nan_rows(gpu):
    logits = torch.zeros(2, 2, 3)
    logits[1, 0, 2] = float("nan")
    plans = _cuda_ops.layer_plan_cuda(logits)
    assert plans.tolist() == [[1, 1], [-1, 1]]
    assert gpu.errors.tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_tokens_ranks_every_kind_of_value(gpu, dtype):
    """The radix select over the scores' bits: signs, infinities, subnormals, -0.0, near-ties."""
    g = torch.Generator().manual_seed(11)
    values = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-40, 1.0, -1.0, 3.5, -3.5])
    scores = values[torch.randint(0, values.numel(), (4, 600), generator=g)]
    scores[2] = torch.randn(600, generator=g) * 1e3
    scores[3, ::2] = 1.0 + torch.arange(300) * 2.0**-20  # close keys that differ in low bits
    scores = scores.to(dtype)
    for capacity in (1, 7, 299, 300, 599):
        args = (scores, capacity, "top", 0.0, None)
        indices, mask = _cuda_ops.select_tokens_cuda(*args)
        cpu_indices, cpu_mask = ops.select_tokens(*args)
        assert torch.equal(indices, cpu_indices) and torch.equal(mask, cpu_mask), capacity
    assert not gpu.errors.any()


# --- routing variants: top-p, expert choice, Sinkhorn --------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_experts", "p"), [(1, 0.5), (8, 0.6), (60, 0.9), (64, 0.3), (160, 0.75)])
@pytest.mark.parametrize(
    ("min_k", "inclusive", "normalize"), [(1, True, False), (0, False, True), (2, True, True)]
)
def test_topp_gating_is_the_cpu_routing(gpu, dtype, num_experts, p, min_k, inclusive, normalize):
    """float32 / bfloat16 / float16: the CPU's bits (same exp, same sum order); float64:
    the same experts and weights within an ulp."""
    logits = random_logits(23, num_experts, dtype, seed=num_experts)
    max_k = min(num_experts, 6)
    min_k = min(min_k, max_k)
    args = (logits, p, min_k, max_k, inclusive, normalize)
    weights, experts = _cuda_ops.topp_gating_cuda(*args)
    cpu_weights, cpu_experts = ops.topp_gating(*args)
    assert torch.equal(experts, cpu_experts)
    if dtype == torch.float64:
        torch.testing.assert_close(weights, cpu_weights, rtol=1e-14, atol=1e-15)
    else:
        assert torch.equal(weights, cpu_weights)
    assert not gpu.errors.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "capacity"), [(0, 3, 0), (1, 1, 1), (40, 8, 10), (33, 60, 33)]
)
def test_expert_choice_is_the_cpu_choice(gpu, dtype, num_tokens, num_experts, capacity):
    logits = random_logits(num_tokens, num_experts, dtype, seed=capacity)
    gates, indices = _cuda_ops.expert_choice_cuda(logits, capacity)
    cpu_gates, cpu_indices = ops.expert_choice(logits, capacity)
    assert torch.equal(indices, cpu_indices)
    if dtype == torch.float64:
        torch.testing.assert_close(gates, cpu_gates, rtol=1e-14, atol=1e-15)
    else:
        assert torch.equal(gates, cpu_gates)
    weights, experts = _cuda_ops.expert_choice_slots_cuda(indices, gates, num_tokens)
    cpu_weights, cpu_experts = ops.expert_choice_slots(cpu_indices, cpu_gates, num_tokens)
    assert torch.equal(experts, cpu_experts) and torch.equal(weights, cpu_weights.to(weights.dtype))
    assert not gpu.errors.any()


def test_subnormal_probabilities_are_the_cpu_bits(gpu):
    """Rows spread over 120: probabilities down through the subnormals (a logit 87.3 to
    104 below its row's maximum) and to 0, which top-p and expert choice order and return
    as the CPU does, bit for bit."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.rand(40, 24, generator=generator) * -120.0
    logits[:, 0] = 0.0
    weights, experts = _cuda_ops.topp_gating_cuda(logits, 1.0, 1, 24, True, False)
    cpu_weights, cpu_experts = ops.topp_gating(logits, 1.0, 1, 24, True, False)
    assert torch.equal(experts, cpu_experts) and torch.equal(weights, cpu_weights)
    smallest_normal = torch.finfo(torch.float32).smallest_normal
    assert ((cpu_weights > 0) & (cpu_weights < smallest_normal)).any()
    gates, indices = _cuda_ops.expert_choice_cuda(logits, 40)  # every token: the zeros too
    cpu_gates, cpu_indices = ops.expert_choice(logits, 40)
    assert torch.equal(indices, cpu_indices) and torch.equal(gates, cpu_gates)
    assert ((cpu_gates > 0) & (cpu_gates < smallest_normal)).any() and (cpu_gates == 0).any()
    assert not gpu.errors.any()


def test_expert_choice_over_many_tokens_is_the_cpu_choice(gpu):
    """Several warps per expert, several steps per digit, ties across the warps' runs."""
    logits = tie_heavy_logits(3000, 3, torch.float32, seed=6)
    gates, indices = _cuda_ops.expert_choice_cuda(logits, 1000)
    cpu_gates, cpu_indices = ops.expert_choice(logits, 1000)
    assert torch.equal(indices, cpu_indices) and torch.equal(gates, cpu_gates)
    assert gpu.launches[-1] == ("sr_select_tokens", 3, 384)
    assert not gpu.errors.any()


def test_expert_choice_ties_go_to_the_lower_token(gpu):
    # Identical rows have identical probabilities: each expert takes the first tokens.
    logits = torch.tensor([[1.0, 0.0, 2.0]] * 6)
    gates, indices = _cuda_ops.expert_choice_cuda(logits, 4)
    assert indices.tolist() == [[0, 1, 2, 3]] * 3
    assert torch.equal(gates, ops.expert_choice(logits, 4)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "num_experts", "capacity"), [(30, 12, 7), (50, 61, 20), (9, 1, 9)])
def test_expert_choice_backward_matches_the_cpu_kernel(gpu, dtype, num_tokens, num_experts, capacity):
    logits = random_logits(num_tokens, num_experts, dtype, seed=4)
    gates, indices = ops.expert_choice(logits, capacity)
    grad_gates = torch.randn(gates.shape, generator=torch.Generator().manual_seed(5)).to(gates.dtype)
    ours = _cuda_ops.expert_choice_backward_cuda(logits, indices, grad_gates)
    cpu = ops.expert_choice_backward(logits, indices, grad_gates)
    assert ours.dtype == cpu.dtype == dtype
    if dtype == torch.float64:  # the GPU's exp in float64 is not the CPU's
        torch.testing.assert_close(ours, cpu, rtol=1e-12, atol=1e-14)
    else:  # the CPU's probabilities, dot product and roundings
        assert torch.equal(ours, cpu)
    assert not gpu.errors.any()


def test_expert_choice_backward_counts_bad_rows_and_indices(gpu):
    logits = random_logits(6, 4, torch.float32, seed=1)
    logits[2, 1] = float("nan")
    indices = torch.tensor([[0, 2], [1, 7], [3, 4], [5, 0]])  # 7 is no token
    grad_gates = torch.ones(4, 2)
    grad = _cuda_ops.expert_choice_backward_cuda(logits, indices, grad_gates)
    assert (grad[2] == 0).all()
    good = [0, 1, 3, 4, 5]
    placed = torch.zeros(6, 4)
    for e, row in enumerate(indices.tolist()):
        for t in row:
            if t < 6:
                placed[t, e] = 1.0
    probs = torch.softmax(logits[good], dim=-1)
    expected = probs * (placed[good] - (probs * placed[good]).sum(-1, keepdim=True))
    torch.testing.assert_close(grad[good], expected)
    assert gpu.errors.tolist() == [1, 0, 0, 0, 1, 0, 0, 0]


def test_expert_choice_slots_count_bad_token_indices(gpu):
    indices = torch.tensor([[0, 5], [1, 2]])
    gates = torch.tensor([[0.5, 0.25], [0.75, 1.0]])
    weights, experts = _cuda_ops.expert_choice_slots_cuda(indices, gates, 3)
    assert experts.tolist() == [[0, -1], [-1, 1], [-1, 1]]
    assert weights.tolist() == [[0.5, 0.0], [0.0, 0.75], [0.0, 1.0]]
    assert gpu.errors.tolist() == [0, 0, 0, 0, 1, 0, 0, 0]


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "iters"),
    [(1, 1, None), (37, 8, None), (1100, 12, None), (600, 64, 3), (50, 5, 1)],
)
def test_sinkhorn_is_the_cpu_sinkhorn_bit_for_bit(gpu, num_tokens, num_experts, iters):
    logits = random_logits(num_tokens, num_experts, torch.float32, seed=num_tokens)
    ours = _cuda_ops.sinkhorn_cuda(logits, iters, 1e-4)
    cpu = ops.sinkhorn(logits, iters, 1e-4)
    assert torch.equal(ours, cpu)
    assert not gpu.errors.any()


def test_sinkhorn_exp_is_the_cpu_exp_over_its_range(gpu):
    # One logit per row from -110 to 88 (subnormal costs below -87.3, 0 below -103.97, 2^127
    # near 88), the rest small.
    high = torch.linspace(-110.0, 88.0, 4001)
    logits = torch.randn(4001, 5, generator=torch.Generator().manual_seed(3))
    logits[:, 2] = high
    ours = _cuda_ops.sinkhorn_cuda(logits, 1, 0.0)
    assert torch.equal(ours, ops.sinkhorn(logits, 1, 0.0))
    assert not gpu.errors.any()


@pytest.mark.parametrize(
    ("offsets", "num_rows", "malformed"),
    [
        ([0, 5, 5, 14, 17, 17, 24], 28, False),  # empty experts, four padding rows
        ([0, 3, 8], 8, False),  # no padding, no empty expert
        ([0, 0], 3, False),  # E = 1 without rows
        ([0, 6, 4, 9], 12, True),  # decreasing
        ([0, 4, 30], 10, True),  # past the rows
        ([2, 4, 6], 6, True),  # not starting at 0
        ([0, -3, 5], 8, True),  # negative
    ],
)
def test_group_layout_kernels_match_the_torch_layout(gpu, offsets, num_rows, malformed):
    from sparseroute.ops import experts

    offsets = torch.tensor(offsets)
    ends, padding, empty = _cuda_ops.group_layout_cuda(offsets, num_rows)
    expected = experts._group_layout_torch(offsets, num_rows)
    assert torch.equal(ends, expected.ends)
    assert torch.equal(padding, expected.padding)
    assert torch.equal(empty, expected.empty)
    assert gpu.errors.tolist()[2] == int(malformed)  # one count per layout, at most


def test_group_layout_kernel_scans_across_tiles(gpu):
    """More experts than the block's 1024 threads: the running maximum carries across tiles."""
    from sparseroute.ops import experts

    g = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 3, (2500,), generator=g)
    counts[1024:1100] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    num_rows = int(offsets[-1]) + 7
    ends, padding, empty = _cuda_ops.group_layout_cuda(offsets, num_rows)
    expected = experts._group_layout_torch(offsets, num_rows)
    assert torch.equal(ends, expected.ends)
    assert torch.equal(padding, expected.padding)
    assert torch.equal(empty, expected.empty)
    assert not gpu.errors.any()


def _replica_table(num_experts, replicas, num_slots, seed):
    """A replica table [E, R] (ascending distinct slots, -1 past each expert's count) and the
    counts [E]."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, replicas + 1, (num_experts,), generator=g)
    table = torch.full((num_experts, replicas), -1, dtype=torch.int64)
    for e in range(num_experts):
        slots = torch.randperm(num_slots, generator=g)[: int(counts[e])]
        table[e, : int(counts[e])] = slots.sort().values
    return table, counts


@pytest.mark.parametrize("policy", ["round_robin", "load"])
@pytest.mark.parametrize(
    ("num_slots", "slots_per_gpu"),
    [(12, 4), (10_000, 100)],  # counters in shared memory; too many for it (the workspace)
)
def test_replica_map_matches_the_cpu(gpu, policy, num_slots, slots_per_gpu):
    table, counts = _replica_table(9, 4, num_slots, seed=num_slots)
    experts = random_experts(150, 3, 9, seed=4, empty=0.15)
    args = (experts, table, counts, num_slots, slots_per_gpu, policy)
    ours = _cuda_ops.replica_map_cuda(*args)
    assert torch.equal(ours, ops.replica_map(*args))
    assert not gpu.errors.any()


def test_replica_map_by_load_rejects_more_entries_than_its_counters_hold(gpu):
    table, counts = _replica_table(4, 2, 8, seed=1)
    experts = torch.zeros(1, 1, dtype=torch.int64).expand(2**30, 2)  # 2^31 entries, one stored
    with pytest.raises(
        ValueError,
        match=r"experts: expected at most 2147483647 ids \(T \* k\) for policy 'load' on CUDA, "
        r"got 2147483648",
    ):
        _cuda_ops.replica_map_cuda(experts, table, counts, 8, 2, "load")
    assert _cuda_ops.replica_map_cuda(experts[:3], table, counts, 8, 2, "load").shape == (3, 2)


def test_replica_map_counts_invalid_ids_and_tables(gpu):
    table, counts = _replica_table(4, 2, 8, seed=1)
    experts = torch.tensor([[0, 7], [-1, 2]])  # 7 is no expert
    for policy in ("round_robin", "load"):
        out = _cuda_ops.replica_map_cuda(experts, table, counts, 8, 2, policy)
        assert out[0, 1] == -1 and out[1, 0] == -1 and out[0, 0] >= 0
        assert gpu.errors.tolist()[1] >= 1
        gpu.errors.zero_()
    broken = table.clone()
    broken[2, 0] = 99  # a slot outside the 8 slots
    for policy in ("round_robin", "load"):
        out = _cuda_ops.replica_map_cuda(torch.tensor([[2, 0]]), broken, counts, 8, 2, policy)
        assert out[0, 0] == -1 and out[0, 1] >= 0
        assert gpu.errors.tolist()[2] == 1
        gpu.errors.zero_()


def test_gating_lane_count_follows_the_token_count():
    """Few tokens get many lanes each, many tokens one; never fewer than
    GATING_MIN_EXPERTS_PER_LANE experts per lane, never more than 32 lanes."""
    lanes = _cuda_ops.gating_lanes
    assert lanes(16384, 64) == lanes(16384, 256) == 4  # 65536 threads in all
    assert lanes(65536, 256) == lanes(1 << 20, 256) == 1
    assert lanes(1, 4096) == lanes(0, 4096) == 32
    assert lanes(1, 64) == 8 and lanes(1, 8) == 1 and lanes(1, 15) == 1 and lanes(1, 16) == 2


# --- invalid input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(invalid_input_cases.CASES))
def test_invalid_input_is_counted_and_handled(gpu, case):
    """The cases of invalid_input_cases.py (also run on a GPU by tests/gpu/test_gpu_errors.py),
    with the emulated launcher's counters."""

    def counted(expected):
        assert gpu.errors.tolist() == expected
        gpu.errors.zero_()

    invalid_input_cases.CASES[case]("cpu", counted)
