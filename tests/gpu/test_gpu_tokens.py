"""The Mixture-of-Depths token ops on a GPU: select_tokens, gather_tokens, scatter_tokens and
token_dots against the CPU kernels (bit for bit) and tests/reference.py, opcheck,
torch.compile(fullgraph=True), CUDA graph capture after warm-up, invalid input counted."""

import pytest
import torch
from gpu_helpers import DTYPES, to_acc

import sparseroute
from sparseroute import InvalidInputError

from reference import gather_tokens_reference, scatter_tokens_reference, select_tokens_reference

ops = torch.ops.sparseroute


def token_indices(batch, seq_len, capacity, seed, holes=0.2):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        kept = torch.randperm(seq_len, generator=g)[:capacity].sort().values
        kept = kept[torch.rand(capacity, generator=g) >= holes]
        rows.append(torch.cat([kept, torch.full((capacity - kept.numel(),), -1, dtype=torch.int64)]))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "seq_len", "capacity", "row_len"), [(3, 11, 4, 5), (4, 300, 120, 64), (2, 9, 0, 8)]
)
def test_token_rows_match_the_cpu_bit_for_bit(dtype, batch, seq_len, capacity, row_len):
    g = torch.Generator().manual_seed(seq_len)
    indices = token_indices(batch, seq_len, capacity, seed=row_len)
    x = torch.randn(batch, seq_len, row_len, generator=g).to(dtype)
    y = torch.randn(batch, capacity, row_len, generator=g).to(dtype)
    gate = torch.rand(batch, seq_len, generator=g, dtype=torch.float64).to(to_acc(dtype))
    xc, yc, ic, gc = x.cuda(), y.cuda(), indices.cuda(), gate.cuda()
    for scale, scale_c in ((None, None), (gate, gc)):
        assert torch.equal(ops.gather_tokens(xc, ic, scale_c).cpu(), ops.gather_tokens(x, indices, scale))
    assert torch.equal(ops.gather_tokens(xc, ic, None).cpu(), gather_tokens_reference(x, indices))
    for base, rows, g_ in [(x, y, None), (x, y, gate), (None, y, None), (None, y, gate), (x, None, None)]:
        gpu = ops.scatter_tokens(
            None if base is None else base.cuda(),
            None if rows is None else rows.cuda(),
            ic,
            None if g_ is None else g_.cuda(),
            seq_len,
        )
        assert torch.equal(gpu.cpu(), ops.scatter_tokens(base, rows, indices, g_, seq_len))
    assert torch.equal(
        ops.scatter_tokens(xc, yc, ic, gc, seq_len).cpu(), scatter_tokens_reference(x, y, indices, gate)
    )
    assert torch.equal(ops.token_dots(xc, yc, ic).cpu(), ops.token_dots(x, y, indices))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [0, 5, 0.3, 0.1, 1.0, 64])
@pytest.mark.parametrize("threshold", [None, 1.5])
def test_select_tokens_matches_the_cpu_and_the_reference(dtype, capacity, threshold):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-2, 4, (6, 700), generator=g).to(dtype)  # ties everywhere
    lengths = torch.tensor([700, 0, 699, 256, 257, 3])
    gpu = sparseroute.select_tokens(scores.cuda(), capacity, lengths=lengths.cuda(), threshold=threshold)
    cpu = sparseroute.select_tokens(scores, capacity, lengths=lengths, threshold=threshold)
    assert torch.equal(gpu.indices.cpu(), cpu.indices) and torch.equal(gpu.mask.cpu(), cpu.mask)
    ref_indices, ref_mask = select_tokens_reference(scores, capacity, lengths=lengths, threshold=threshold)
    assert torch.equal(cpu.indices, ref_indices) and torch.equal(gpu.mask.cpu(), ref_mask)


@pytest.mark.parametrize("capacity", [5000, 0.5])
def test_select_tokens_of_long_sequences_matches_the_cpu(capacity):
    """1024-thread blocks: every warp compacts a run, ties span runs, digits take steps."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 50, (3, 20000), generator=g).to(torch.float32)
    lengths = torch.tensor([20000, 12345, 1])
    gpu = sparseroute.select_tokens(scores.cuda(), capacity, lengths=lengths.cuda())
    cpu = sparseroute.select_tokens(scores, capacity, lengths=lengths)
    assert torch.equal(gpu.indices.cpu(), cpu.indices) and torch.equal(gpu.mask.cpu(), cpu.mask)


def test_invalid_input_is_counted():
    scores = torch.randn(3, 8, device="cuda")
    scores[1, 2] = float("nan")
    selection = sparseroute.select_tokens(scores, 2)
    assert selection.indices[1].tolist() == [-1, -1] and not selection.mask[1].any()
    with pytest.raises(InvalidInputError, match="NaN score"):
        sparseroute.check_cuda_errors()
    x = torch.randn(2, 5, 4, device="cuda")
    rows = ops.gather_tokens(x, torch.tensor([[1, 1], [7, 0]], device="cuda"), None)
    assert not rows[0].any() and not rows[1, 0].any() and torch.equal(rows[1, 1], x[1, 0])
    with pytest.raises(InvalidInputError, match="token indices"):
        sparseroute.check_cuda_errors()


def opcheck_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 10, 8, generator=g).to("cuda", dtype).requires_grad_()
    y = torch.randn(3, 4, 8, generator=g).to("cuda", dtype).requires_grad_()
    indices = token_indices(3, 10, 4, seed=2).cuda()
    gate = torch.rand(3, 10, generator=g).cuda().requires_grad_()
    return x, y, indices, gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_token_ops(dtype):
    x, y, indices, gate = opcheck_inputs(dtype)
    torch.library.opcheck(ops.gather_tokens, (x, indices, None))
    torch.library.opcheck(ops.gather_tokens, (x, indices, gate.detach()))
    torch.library.opcheck(ops.scatter_tokens, (x, y, indices, None, 10))
    torch.library.opcheck(ops.scatter_tokens, (x, y, indices, gate, 10))
    torch.library.opcheck(ops.scatter_tokens, (None, y, indices, None, 10))
    torch.library.opcheck(ops.token_dots, (x.detach(), y.detach(), indices))
    scores = x.detach()[..., 0]
    torch.library.opcheck(ops.select_tokens, (scores, 4, "top", 0.0, None))
    torch.library.opcheck(
        ops.select_tokens, (scores, 4, "fraction", 0.3, torch.tensor([10, 5, 0], device="cuda"))
    )
    torch.library.opcheck(ops.select_tokens, (scores, 4, "threshold", 0.1, None))


def depth_block(x, router, w):
    scores = (x @ router).squeeze(-1)
    selection = sparseroute.select_tokens(scores, 0.25)
    rows = sparseroute.gather_tokens(x, selection.indices)
    out = torch.tanh(rows @ w)
    return sparseroute.scatter_tokens(x, out, selection.indices, gate=torch.sigmoid(scores))


def block_inputs(seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 64, 32, generator=g).to(device).requires_grad_()
    router = torch.randn(32, 1, generator=g).to(device).requires_grad_()
    w = torch.randn(32, 32, generator=g).to(device).requires_grad_()
    return x, router, w


def test_depth_block_gradients_match_the_cpu():
    gpu_inputs = block_inputs(5)
    cpu_inputs = block_inputs(5, "cpu")
    gpu = depth_block(*gpu_inputs)
    cpu = depth_block(*cpu_inputs)
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), rtol=1e-5, atol=1e-5)
    gpu_grads = torch.autograd.grad(gpu.square().sum(), gpu_inputs)
    cpu_grads = torch.autograd.grad(cpu.square().sum(), cpu_inputs)
    for a, b in zip(gpu_grads, cpu_grads, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_depth_block_compiles_without_graph_breaks(backend):
    inputs = block_inputs(6)
    torch._dynamo.reset()
    compiled = torch.compile(depth_block, fullgraph=True, backend=backend)
    expected = depth_block(*inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    actual = compiled(*inputs)
    actual_grads = torch.autograd.grad(actual.square().sum(), inputs)
    torch.testing.assert_close(actual, expected)
    for a, b in zip(actual_grads, expected_grads, strict=True):
        # Inductor fuses the router's matmul and sigmoid gradients: float32 sums reordered.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_depth_block_cuda_graph_capture_and_replay():
    sparseroute.warm_up_cuda()
    static_inputs = [t.detach().clone() for t in block_inputs(7)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            depth_block(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = depth_block(*static_inputs)
    for seed in (8, 9):
        fresh = [t.detach() for t in block_inputs(seed)]
        for static, new in zip(static_inputs, fresh, strict=True):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, depth_block(*fresh), rtol=1e-6, atol=1e-6)
