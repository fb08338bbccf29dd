"""permute / unpermute: plan invariants, exact agreement with the reference, gradients,
padding rows, empty slots, and bitwise determinism across thread counts."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from reference import block_permute_reference, permute_reference, unpermute_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@st.composite
def dispatch_cases(draw):
    num_experts = draw(st.sampled_from([1, 2, 8, 60, 160, 256]) | st.integers(1, 300))
    num_tokens = draw(st.sampled_from([0, 1]) | st.integers(0, 300))
    k = draw(st.integers(1, min(num_experts, 16)))
    d = draw(st.sampled_from([1, 8, 33]) | st.integers(1, 300))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31))
    empty_fraction = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    one_expert = draw(st.booleans()) and draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    # Distinct experts per token, as top-k produces, unless everything goes to one expert.
    if one_expert:
        experts = torch.full((num_tokens, k), num_experts - 1, dtype=torch.int64)
    else:
        experts = torch.rand(num_tokens, num_experts, generator=g).argsort(-1)[:, :k]
    empty = torch.rand(num_tokens, k, generator=g) < empty_fraction
    experts = experts.masked_fill(empty, -1)
    x = torch.randn(num_tokens, d, generator=g).to(dtype)
    weights = torch.rand(num_tokens, k, generator=g)
    return x, experts, num_experts, weights


def check_plan_invariants(plan, experts, num_experts):
    routed = int((experts >= 0).sum())
    assert int(plan.tokens_per_expert.sum()) == routed
    assert plan.offsets[0] == 0 and int(plan.offsets[-1]) == routed
    assert torch.equal(plan.offsets.diff(), plan.tokens_per_expert)
    real = plan.row_to_slot[:routed]
    # Expert-major, then ascending slot index, within every expert.
    row_experts = experts.reshape(-1)[real]
    assert torch.all(row_experts.diff() >= 0)
    same_expert = row_experts.diff() == 0
    assert torch.all(real.diff()[same_expert] > 0)
    # The two maps are inverse to each other.
    flat_rows = plan.slot_to_row.reshape(-1)
    assert torch.equal(flat_rows[real], torch.arange(routed))
    assert torch.all(flat_rows[experts.reshape(-1) < 0] == -1)
    assert torch.all(plan.row_to_slot[routed:] == -1)


@given(dispatch_cases())
def test_permute_matches_reference(case):
    x, experts, num_experts, _ = case
    x_sorted, plan = sparseroute.permute(x, experts, num_experts)
    ref_sorted, ref_plan = permute_reference(x, experts, num_experts)
    check_plan_invariants(plan, experts, num_experts)
    for name, value in ref_plan.items():
        assert torch.equal(getattr(plan, name), value), name
    assert x_sorted.dtype == x.dtype
    assert torch.equal(x_sorted, ref_sorted)


@given(dispatch_cases(), st.booleans())
def test_unpermute_matches_reference_exactly(case, weighted):
    x, experts, num_experts, weights = case
    _, plan = sparseroute.permute(x, experts, num_experts)
    y_sorted = torch.randn(plan.row_to_slot.shape[0], x.shape[1]).to(x.dtype)
    w = weights if weighted else None
    y = sparseroute.unpermute(y_sorted, plan, w)
    # The combine's arithmetic order is fixed (fp32, slot order, no FMA): equal bits.
    assert y.dtype == x.dtype
    assert torch.equal(y, unpermute_reference(y_sorted, plan.slot_to_row, w))


@given(dispatch_cases())
def test_round_trip_is_identity_for_k1(case):
    x, experts, num_experts, _ = case
    experts = experts[:, :1].clamp(min=0)
    x_sorted, plan = sparseroute.permute(x, experts, num_experts)
    assert torch.equal(sparseroute.unpermute(x_sorted, plan), x)
    ones = torch.ones(x.shape[0], 1)
    assert torch.equal(sparseroute.unpermute(x_sorted, plan, ones), x)


@given(dispatch_cases())
def test_gradients_match_reference(case):
    x, experts, num_experts, weights = case
    if x.dtype != torch.float64:
        x = x.float()
    w = weights.to(x.dtype)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(x.shape[0]), dtype=x.dtype)

    ours_x, ours_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    x_sorted, plan = sparseroute.permute(ours_x, experts, num_experts)
    (sparseroute.unpermute(x_sorted * 3.0, plan, ours_w) * grad_out).sum().backward()

    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref_sorted, ref_plan = permute_reference(ref_x, experts, num_experts)
    (unpermute_reference(ref_sorted * 3.0, ref_plan["slot_to_row"], ref_w) * grad_out).sum().backward()

    eps = 1e-6 if x.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=eps * 10, atol=eps * 10)
    # grad_w[t, j] is a dot product over d, summed in a different order than the reference:
    # its rounding error scales with the mass sum_i |grad_out[t, i] * y[t, i]|.
    mass = (grad_out * x * 3.0).abs().sum(-1, keepdim=True).expand_as(ours_w.grad)
    error = (ours_w.grad - ref_w.grad).abs()
    assert torch.all(error <= eps * (mass + 1)), (error - eps * mass).max()


def test_gradcheck_float64(generator):
    num_tokens, k, num_experts, d = 7, 3, 5, 4
    experts = torch.rand(num_tokens, num_experts, generator=generator).argsort(-1)[:, :k]
    experts[2, 1] = -1
    x = torch.randn(num_tokens, d, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.rand(num_tokens, k, dtype=torch.float64, generator=generator, requires_grad=True)

    def round_trip(x, w):
        x_sorted, plan = sparseroute.permute(x, experts, num_experts)
        return sparseroute.unpermute(x_sorted.sin(), plan, w)

    assert torch.autograd.gradcheck(round_trip, (x, w))
    assert torch.autograd.gradgradcheck(lambda x: sparseroute.permute(x, experts, num_experts)[0], (x,))


def test_gating_permute_unpermute_gradcheck(generator):
    logits = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)

    def moe(logits, x):
        weights, experts = sparseroute.topk_gating(logits, 2)
        x_sorted, plan = sparseroute.permute(x, experts, 5)
        return sparseroute.unpermute(x_sorted.tanh(), plan, weights)

    assert torch.autograd.gradcheck(moe, (logits, x))


def test_static_rows_pad_with_zeros():
    x = torch.arange(8.0).view(4, 2)
    experts = torch.tensor([[1, -1], [0, 1], [-1, -1], [1, 0]])
    x_sorted, plan = sparseroute.permute(x, experts, 2, num_rows=8)
    assert x_sorted.shape == (8, 2)
    assert plan.offsets.tolist() == [0, 2, 5]
    assert plan.row_to_slot.tolist() == [2, 7, 0, 3, 6, -1, -1, -1]
    assert torch.equal(x_sorted[5:], torch.zeros(3, 2))
    compact, _ = sparseroute.permute(x, experts, 2)
    assert compact.shape == (5, 2)
    assert torch.equal(compact, x_sorted[:5])
    # Token 2 has no slot: zeros back.
    y = sparseroute.unpermute(x_sorted, plan)
    assert torch.equal(y, torch.tensor([[0.0, 1], [4, 6], [0, 0], [12, 14]]))


def test_all_tokens_to_one_expert():
    x = torch.randn(100, 16)
    experts = torch.full((100, 1), 3)
    x_sorted, plan = sparseroute.permute(x, experts, 5)
    assert plan.tokens_per_expert.tolist() == [0, 0, 0, 100, 0]
    assert torch.equal(x_sorted, x)


def test_int32_experts_are_accepted():
    x = torch.randn(10, 4)
    experts = torch.randint(0, 6, (10, 2), dtype=torch.int32)
    a, plan_a = sparseroute.permute(x, experts, 6)
    b, plan_b = sparseroute.permute(x, experts.long(), 6)
    assert torch.equal(a, b)
    assert torch.equal(plan_a.slot_to_row, plan_b.slot_to_row)


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_do_not_depend_on_thread_count(dtype):
    g = torch.Generator().manual_seed(5)
    num_tokens, num_experts, k, d = 4096, 64, 8, 96
    logits = torch.randn(num_tokens, num_experts, generator=g).to(dtype)
    x = torch.randn(num_tokens, d, generator=g).to(dtype).requires_grad_()

    def run(threads):
        sparseroute.set_num_threads(threads)
        x.grad = None
        weights, experts = sparseroute.topk_gating(logits, k)
        x_sorted, plan = sparseroute.permute(x, experts, num_experts)
        y = sparseroute.unpermute(x_sorted * 1.5, plan, weights)
        y.square().sum().backward()
        return weights, experts, x_sorted, y, x.grad, *plan

    single = run(1)
    for threads in (2, 3):
        for a, b in zip(single, run(threads), strict=True):
            assert torch.equal(a, b)


def test_non_contiguous_inputs(generator):
    x = torch.randn(64, 40, generator=generator).t()  # [40, 64], strided
    logits = torch.randn(16, 40, generator=generator).t()  # [40, 16], strided
    weights, experts = sparseroute.topk_gating(logits, 3)
    ref_weights, ref_experts = sparseroute.topk_gating(logits.contiguous(), 3)
    assert torch.equal(experts, ref_experts) and torch.equal(weights, ref_weights)
    x_sorted, plan = sparseroute.permute(x, experts, 16)
    assert torch.equal(x_sorted, sparseroute.permute(x.contiguous(), experts, 16)[0])
    y = sparseroute.unpermute(x_sorted.t().contiguous().t(), plan, weights[:, :3])
    assert torch.equal(y, sparseroute.unpermute(x_sorted, plan, weights))


def test_concurrent_calls_from_python_threads():
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(9)
    inputs = [(torch.randn(3000, 32, generator=g), torch.randn(3000, 64, generator=g)) for _ in range(8)]

    def route(pair):
        logits, x = pair
        weights, experts = sparseroute.topk_gating(logits, 4)
        x_sorted, plan = sparseroute.permute(x, experts, 32)
        return sparseroute.unpermute(x_sorted, plan, weights)

    expected = [route(pair) for pair in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(route, inputs * 3))
    for i, y in enumerate(results):
        assert torch.equal(y, expected[i % len(inputs)])


# --- block-aligned rows ----------------------------------------------------------------------


@given(dispatch_cases(), st.sampled_from([1, 2, 3, 16, 64]))
def test_blocks_match_the_reference_and_round_trip(case, block_size):
    x, experts, num_experts, weights = case
    x_sorted, plan = sparseroute.permute(x, experts, num_experts, block_size=block_size)
    ref_sorted, ref_offsets, ref_rows = block_permute_reference(x, experts, num_experts, block_size)
    assert torch.equal(x_sorted, ref_sorted)
    assert torch.equal(plan.offsets, ref_offsets) and torch.equal(plan.row_to_slot, ref_rows)
    assert torch.all(plan.offsets % block_size == 0)
    assert torch.equal(plan.tokens_per_expert, torch.bincount(experts[experts >= 0], minlength=num_experts))
    # The blocks move rows, not what comes back: unpermute is the plain plan's, bit for bit.
    plain_sorted, plain = sparseroute.permute(x, experts, num_experts)
    assert torch.equal(
        sparseroute.unpermute(x_sorted, plan, weights), sparseroute.unpermute(plain_sorted, plain, weights)
    )
    # The static bound holds any plan: its rows are the same, then padding.
    bound = sparseroute.max_permuted_rows(experts.numel(), num_experts, block_size)
    static_sorted, static_plan = sparseroute.permute(
        x, experts, num_experts, num_rows=bound, block_size=block_size
    )
    assert static_sorted.shape[0] == bound and bound >= x_sorted.shape[0]
    assert torch.equal(static_sorted[: x_sorted.shape[0]], x_sorted)
    assert not static_sorted[x_sorted.shape[0] :].any()
    assert torch.equal(static_plan.slot_to_row, plan.slot_to_row)


def test_block_experts_name_each_blocks_expert():
    x = torch.randn(8, 4)
    experts = torch.tensor([[2], [0], [2], [0], [2], [2], [0], [2]])
    x_sorted, plan = sparseroute.permute(x, experts, 3, block_size=4)
    assert plan.offsets.tolist() == [0, 4, 4, 12]
    assert plan.row_to_slot.tolist() == [1, 3, 6, -1, 0, 2, 4, 5, 7, -1, -1, -1]
    assert not x_sorted[3].any() and not x_sorted[9:].any()
    assert plan.block_experts(4).tolist() == [0, 2, 2]
    _, padded = sparseroute.permute(
        x, experts, 3, num_rows=sparseroute.max_permuted_rows(8, 3, 4), block_size=4
    )
    assert padded.row_to_slot.shape[0] == 20  # 8 slots + 3 * 3 padding, in whole blocks of 4
    assert padded.block_experts(4).tolist() == [0, 2, 2, -1, -1]
    with pytest.raises(ValueError, match="block_size: expected"):
        plan.block_experts(0)


def test_blocks_with_capacity():
    g = torch.Generator().manual_seed(3)
    experts = torch.randint(0, 4, (40, 2), generator=g)
    weights = torch.rand(40, 2, generator=g)
    x = torch.randn(40, 6, generator=g)
    for policy in ["position", "probs"]:
        plain_sorted, plain = sparseroute.permute(
            x, experts, 4, capacity=7, weights=weights, drop_policy=policy
        )
        x_sorted, plan = sparseroute.permute(
            x, experts, 4, capacity=7, weights=weights, drop_policy=policy, block_size=8
        )
        assert plan.offsets.tolist() == [0, 8, 16, 24, 32]
        assert torch.equal(plan.tokens_per_expert, plain.tokens_per_expert)
        assert torch.equal(plan.dropped, plain.dropped)
        for e in range(4):
            kept = plain.row_to_slot[plain.offsets[e] : plain.offsets[e + 1]]
            assert torch.equal(plan.row_to_slot[8 * e : 8 * e + len(kept)], kept)
            assert torch.all(plan.row_to_slot[8 * e + len(kept) : 8 * (e + 1)] == -1)
        assert torch.equal(sparseroute.unpermute(x_sorted, plan), sparseroute.unpermute(plain_sorted, plain))
    # The padded grid takes blocks when the capacity is made of them.
    _, grid = sparseroute.permute(x, experts, 4, capacity=8, pad_to_capacity=True, block_size=4)
    assert grid.offsets.tolist() == [0, 8, 16, 24, 32]
    with pytest.raises(ValueError, match="capacity: expected a multiple of block_size = 4"):
        sparseroute.permute(x, experts, 4, capacity=7, pad_to_capacity=True, block_size=4)


def test_block_size_must_be_positive_and_num_rows_must_hold_the_padding():
    x = torch.randn(4, 2)
    experts = torch.tensor([[0], [1], [1], [2]])
    with pytest.raises(ValueError, match="block_size: expected"):
        sparseroute.permute(x, experts, 3, block_size=0)
    with pytest.raises(sparseroute.InvalidInputError, match="num_rows: expected at least the number of rows"):
        sparseroute.permute(x, experts, 3, num_rows=4, block_size=2)


def test_blocks_gradcheck_float64(generator):
    x = torch.randn(9, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    experts = torch.randint(0, 3, (9, 2), generator=generator)
    weights = torch.rand(9, 2, generator=generator, dtype=torch.float64, requires_grad=True)

    def moe(x, weights):
        x_sorted, plan = sparseroute.permute(x, experts, 3, block_size=4)
        return sparseroute.unpermute(x_sorted * 2.0, plan, weights)

    assert torch.autograd.gradcheck(moe, (x, weights))


def vllm_align_reference(topk_ids, block_size, num_experts):
    """vLLM's moe_align_block_size outputs, slots within an expert in ascending order: per
    expert its flat slot indices padded with T * k to whole blocks, one expert id per block;
    then T * k and -1 up to the static lengths."""
    flat = topk_ids.reshape(-1)
    ids, blocks = [], []
    for e in range(num_experts):
        mine = torch.nonzero(flat == e).reshape(-1)
        padding = -len(mine) % block_size
        ids.append(torch.cat([mine, torch.full((padding,), flat.numel())]))
        blocks += [e] * ((len(mine) + padding) // block_size)
    post_padded = sum(len(i) for i in ids)
    length = -(-(flat.numel() + num_experts * (block_size - 1)) // block_size) * block_size
    ids.append(torch.full((length - post_padded,), flat.numel()))
    blocks += [-1] * (-(-length // block_size) - len(blocks))
    return torch.cat(ids).int(), torch.tensor(blocks, dtype=torch.int32), torch.tensor([post_padded]).int()


@given(dispatch_cases(), st.sampled_from([1, 4, 16, 64]))
def test_moe_align_block_size_is_vllms_layout_in_slot_order(case, block_size):
    _, experts, num_experts, _ = case
    ours = sparseroute.moe_align_block_size(experts, block_size, num_experts)
    for a, b in zip(ours, vllm_align_reference(experts, block_size, num_experts), strict=True):
        assert a.dtype == torch.int32 and torch.equal(a, b)


def test_moe_align_block_size_checks_its_arguments():
    with pytest.raises(ValueError, match="block_size: expected"):
        sparseroute.moe_align_block_size(torch.zeros(2, 1, dtype=torch.int64), 0, 4)
    with pytest.raises(sparseroute.InvalidInputError, match="experts: expected expert ids in"):
        sparseroute.moe_align_block_size(torch.tensor([[5]]), 4, 4)
