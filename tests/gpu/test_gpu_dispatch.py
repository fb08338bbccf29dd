"""permute / unpermute on the GPU: plans, permuted rows, the combine, and every gradient bit
for bit equal to the CPU kernels (integer plans; order-fixed float arithmetic)."""

import pytest
import torch
from gpu_helpers import DTYPES, random_experts, to_acc

import sparseroute

from reference import block_permute_reference, permute_reference, unpermute_reference

ops = torch.ops.sparseroute
PLAN_FIELDS = ("tokens_per_expert", "offsets", "row_to_slot", "slot_to_row", "dropped")


def assert_same_plan(gpu_plan, cpu_plan):
    for name in PLAN_FIELDS:
        a, b = getattr(gpu_plan, name), getattr(cpu_plan, name)
        assert a.device.type == "cuda", name
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize(
    ("num_tokens", "k", "num_experts"),
    [
        (0, 2, 4),
        (1, 1, 1),
        (37, 2, 3),
        (1000, 2, 8),
        (4096, 8, 64),
        (70000, 8, 128),
        (3000, 4, 5000),
        (500, 2, 100_000),
    ],
)
@pytest.mark.parametrize("static_rows", [False, True])
def test_plan_is_the_cpu_plan(num_tokens, k, num_experts, static_rows):
    experts = random_experts(num_tokens, k, num_experts, seed=num_tokens + k)
    x = torch.randn(num_tokens, 24)
    num_rows = num_tokens * k + 5 if static_rows else None
    x_sorted, plan = sparseroute.permute(x.cuda(), experts.cuda(), num_experts, num_rows=num_rows)
    cpu_sorted, cpu_plan = sparseroute.permute(x, experts, num_experts, num_rows=num_rows)
    assert_same_plan(plan, cpu_plan)
    assert torch.equal(x_sorted.cpu(), cpu_sorted)
    if not static_rows:
        ref_sorted, ref_plan = permute_reference(x, experts, num_experts)
        assert torch.equal(x_sorted.cpu(), ref_sorted)
        for name, value in ref_plan.items():
            assert torch.equal(getattr(plan, name).cpu(), value), name


@pytest.mark.parametrize(("num_tokens", "k", "num_experts"), [(37, 2, 3), (4096, 8, 64), (70000, 8, 128)])
@pytest.mark.parametrize("block_size", [16, 128])
def test_block_aligned_plan_is_the_cpu_plan(num_tokens, k, num_experts, block_size):
    """One-block and chunked plan kernels, dropless and with capacity, with and without a
    static row count; the block experts of the plan."""
    experts = random_experts(num_tokens, k, num_experts, seed=block_size)
    x = torch.randn(num_tokens, 24)
    weights = torch.rand(num_tokens, k)
    bound = sparseroute.max_permuted_rows(num_tokens * k, num_experts, block_size)
    capacity = sparseroute.expert_capacity(num_tokens, num_experts, k, 1.0, align=block_size)
    cases = [
        {"num_rows": None},
        {"num_rows": bound},
        {"capacity": capacity, "weights": weights, "drop_policy": "probs"},
        {"capacity": capacity, "pad_to_capacity": True},
    ]
    for options in cases:
        gpu_sorted, plan = sparseroute.permute(
            x.cuda(),
            experts.cuda(),
            num_experts,
            block_size=block_size,
            **{
                name: value.cuda() if isinstance(value, torch.Tensor) else value
                for name, value in options.items()
            },
        )
        cpu_sorted, cpu_plan = sparseroute.permute(x, experts, num_experts, block_size=block_size, **options)
        assert_same_plan(plan, cpu_plan)
        assert torch.equal(gpu_sorted.cpu(), cpu_sorted)
        assert torch.equal(plan.block_experts(block_size).cpu(), cpu_plan.block_experts(block_size))
    ref_sorted, ref_offsets, ref_rows = block_permute_reference(x, experts, num_experts, block_size)
    gpu_sorted, plan = sparseroute.permute(x.cuda(), experts.cuda(), num_experts, block_size=block_size)
    assert torch.equal(gpu_sorted.cpu(), ref_sorted) and torch.equal(plan.row_to_slot.cpu(), ref_rows)
    assert torch.equal(plan.offsets.cpu(), ref_offsets)


def leave_garbage(sizes):
    """Allocates int64 tensors of these sizes filled with garbage, then frees them all: torch's
    caching allocator hands those blocks to the next allocations of the same sizes, as memory
    freed earlier in a long run would be, so an output entry a kernel leaves unwritten shows."""
    garbage = [torch.full((size,), 0x5A5A5A5A5A5A5A5A, dtype=torch.int64, device="cuda") for size in sizes]
    torch.cuda.synchronize()
    del garbage


@pytest.mark.parametrize(("num_tokens", "k", "num_experts"), [(1000, 2, 8), (4096, 8, 64)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_plan_kernels_write_every_output_entry(num_tokens, k, num_experts, block_size):
    """The plan kernels write every row of row_to_slot (the -1 of padding and of the rows past
    the plan) and the dropless drop counts themselves, with no fill before them: over memory
    that held garbage, the one-block (1000 tokens) and chunked plans are still the CPU's."""
    experts = random_experts(num_tokens, k, num_experts, seed=block_size, empty=0.2)
    x = torch.randn(num_tokens, 8)
    rows = sparseroute.max_permuted_rows(num_tokens * k, num_experts, block_size) + 40
    cpu_sorted, cpu_plan = sparseroute.permute(x, experts, num_experts, num_rows=rows, block_size=block_size)
    gpu_x, gpu_experts = x.cuda(), experts.cuda()
    for _ in range(3):
        leave_garbage([num_experts] * 4 + [num_experts + 1, rows, num_tokens * k] + [num_experts * 64] * 2)
        gpu_sorted, plan = sparseroute.permute(
            gpu_x, gpu_experts, num_experts, num_rows=rows, block_size=block_size
        )
        assert_same_plan(plan, cpu_plan)
        assert torch.equal(gpu_sorted.cpu(), cpu_sorted)


def test_moe_align_block_size_is_the_cpu_layout_and_capturable():
    experts = random_experts(4096, 8, 64, seed=11)
    gpu = sparseroute.moe_align_block_size(experts.cuda(), 64, 64)
    cpu = sparseroute.moe_align_block_size(experts, 64, 64)
    for a, b in zip(gpu, cpu, strict=True):
        assert a.device.type == "cuda" and torch.equal(a.cpu(), b)
    # Sync-free: it replays in a CUDA graph, following new ids.
    sparseroute.warm_up_cuda()
    static_ids = experts.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            sparseroute.moe_align_block_size(static_ids, 64, 64)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sparseroute.moe_align_block_size(static_ids, 64, 64)
    fresh = random_experts(4096, 8, 64, seed=12)
    static_ids.copy_(fresh.cuda())
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static_out, sparseroute.moe_align_block_size(fresh, 64, 64), strict=True):
        assert torch.equal(a.cpu(), b)


def test_all_tokens_to_one_expert_and_int32_ids():
    experts = torch.full((5000, 2), 3, dtype=torch.int32)
    x = torch.randn(5000, 8)
    x_sorted, plan = sparseroute.permute(x.cuda(), experts.cuda(), 4)
    cpu_sorted, cpu_plan = sparseroute.permute(x, experts, 4)
    assert_same_plan(plan, cpu_plan)
    assert torch.equal(x_sorted.cpu(), cpu_sorted)
    assert plan.tokens_per_expert.tolist() == [0, 0, 0, 10000]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_len", [1, 7, 8, 64, 4096])
def test_rows_and_combine_are_bitwise_the_cpu_kernels(dtype, row_len):
    g = torch.Generator().manual_seed(row_len)
    num_tokens, k, num_experts = 257, 4, 16
    experts = random_experts(num_tokens, k, num_experts, seed=row_len)
    x = torch.randn(num_tokens, row_len, generator=g).to(dtype)
    weights = torch.rand(num_tokens, k, generator=g)
    x_sorted, plan = sparseroute.permute(x.cuda(), experts.cuda(), num_experts, num_rows=num_tokens * k)
    cpu_sorted, cpu_plan = sparseroute.permute(x, experts, num_experts, num_rows=num_tokens * k)
    assert torch.equal(x_sorted.cpu(), cpu_sorted)
    y_sorted = torch.randn(num_tokens * k, row_len, generator=g).to(dtype)
    for w in (None, weights):
        y = sparseroute.unpermute(y_sorted.cuda(), plan, None if w is None else w.cuda())
        cpu_y = sparseroute.unpermute(y_sorted, cpu_plan, w)
        assert y.dtype == dtype
        assert torch.equal(y.cpu(), cpu_y)
        ref = unpermute_reference(y_sorted, cpu_plan.slot_to_row, None if w is None else w.to(to_acc(dtype)))
        assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_len", [3, 16, 1024])
def test_gradients_are_bitwise_the_cpu_gradients(dtype, row_len):
    g = torch.Generator().manual_seed(row_len + 1)
    num_tokens, k, num_experts = 123, 3, 9
    experts = random_experts(num_tokens, k, num_experts, seed=row_len)
    x = torch.randn(num_tokens, row_len, generator=g).to(dtype)
    w = torch.rand(num_tokens, k, generator=g).to(to_acc(dtype))
    grad_out = torch.randn(num_tokens, row_len, generator=g).to(dtype)
    results = []
    for device in ("cuda", "cpu"):
        leaf_x = x.to(device).requires_grad_()
        leaf_w = w.to(device).requires_grad_()
        x_sorted, plan = sparseroute.permute(leaf_x, experts.to(device), num_experts, num_rows=num_tokens * k)
        y = sparseroute.unpermute(x_sorted * 2, plan, leaf_w)
        y.backward(grad_out.to(device))
        results.append((y.detach().cpu(), leaf_x.grad.cpu(), leaf_w.grad.cpu()))
    for gpu_value, cpu_value in zip(*results, strict=True):
        assert torch.equal(gpu_value, cpu_value)


def test_gather_rows_and_slot_dots_ops():
    g = torch.Generator().manual_seed(9)
    experts = random_experts(50, 2, 6, seed=9)
    x = torch.randn(50, 40, generator=g)
    _, plan = sparseroute.permute(x, experts, 6, num_rows=100)
    weights = torch.rand(50, 2, generator=g)
    y_sorted = torch.randn(100, 40, generator=g)
    gathered = ops.gather_rows(x.cuda(), plan.row_to_slot.cuda(), 2, weights.cuda())
    assert torch.equal(gathered.cpu(), ops.gather_rows(x, plan.row_to_slot, 2, weights))
    dots = ops.slot_dots(x.cuda(), y_sorted.cuda(), plan.slot_to_row.cuda())
    assert torch.equal(dots.cpu(), ops.slot_dots(x, y_sorted, plan.slot_to_row))


def test_misaligned_and_non_contiguous_rows():
    base = torch.randn(65 * 32 + 1)
    x = base[1:].view(65, 32)  # 4 bytes past a 16-byte boundary: element-wise path
    experts = random_experts(65, 2, 4, seed=1)
    x_sorted, _ = sparseroute.permute(x.cuda(), experts.cuda(), 4)
    assert torch.equal(x_sorted.cpu(), sparseroute.permute(x, experts, 4)[0])
    strided = torch.randn(32, 65)[:, :64].T  # non-contiguous
    y, _ = sparseroute.permute(strided.cuda(), random_experts(64, 1, 3, seed=2).cuda(), 3)
    assert torch.equal(y.cpu(), sparseroute.permute(strided, random_experts(64, 1, 3, seed=2), 3)[0])


def test_subnormals_are_kept():
    y_sorted = torch.full((2, 4), 1e-30)
    weights = torch.tensor([[1e-10, 3e-10]])
    _, plan = sparseroute.permute(torch.zeros(1, 4), torch.tensor([[0, 1]]), 2)
    gpu = sparseroute.unpermute(
        y_sorted.cuda(), sparseroute.PermutePlan(*(t.cuda() for t in plan)), weights.cuda()
    )
    cpu = sparseroute.unpermute(y_sorted, plan, weights)
    assert torch.equal(gpu.cpu(), cpu) and (cpu != 0).all()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 5, dtype=torch.float64, generator=g).cuda().requires_grad_()
    w = torch.rand(12, 2, dtype=torch.float64, generator=g).cuda().requires_grad_()
    experts = random_experts(12, 2, 4, seed=4).cuda()

    def pipeline(x, w):
        x_sorted, plan = sparseroute.permute(x, experts, 4, num_rows=24)
        return sparseroute.unpermute(torch.tanh(x_sorted), plan, w)

    assert torch.autograd.gradcheck(pipeline, (x, w))


def test_short_num_rows_and_bad_ids_are_reported():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]], device="cuda")
    _, plan = sparseroute.permute(torch.randn(3, 4, device="cuda"), experts, 2, num_rows=4)
    assert (plan.slot_to_row == -1).sum().item() == 2
    with pytest.raises(sparseroute.InvalidInputError, match="did not fit in num_rows"):
        sparseroute.check_cuda_errors()
    bad = torch.tensor([[0, 7]], device="cuda")
    _, plan = sparseroute.permute(torch.randn(1, 4, device="cuda"), bad, 2)
    assert plan.slot_to_row.tolist() == [[0, -1]]
    with pytest.raises(sparseroute.InvalidInputError, match="expert ids outside"):
        sparseroute.check_cuda_errors()


@pytest.mark.parametrize("policy", ["round_robin", "load"])
def test_replica_map_on_cuda_matches_the_cpu(policy):
    """The plan's tables stay on the CPU (plans are made there); the experts are on the GPU."""
    from sparseroute import placement

    g = torch.Generator().manual_seed(3)
    load = torch.rand(2, 16, generator=g).mul(4).exp()
    plan = placement.plan_placement(load, 32, 2, 4, num_groups=4)
    experts = torch.randint(-1, 16, (300, 4), generator=g)
    for layer in range(2):
        cpu = placement.replica_map(experts, plan, layer, policy=policy)
        gpu = placement.replica_map(experts.cuda(), plan, layer, policy=policy)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)
    bad = torch.tensor([[0, 99]], device="cuda")
    assert placement.replica_map(bad, plan, 0, policy=policy)[0, 1].item() == -1
    with pytest.raises(sparseroute.InvalidInputError, match="expert ids outside"):
        sparseroute.check_cuda_errors()


def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="expert_bias: expected a tensor on cuda"):
        sparseroute.topk_gating(torch.randn(4, 8, device="cuda"), 2, expert_bias=torch.zeros(8))
