"""Large outputs come from a cache of reused buffers: they must behave as ordinary tensors,
hold correct results whatever the buffer held before, and the cache must respect its limit."""

import gc

import pytest
import torch

import sparseroute

from reference import permute_reference, unpermute_reference

# 4096 rows of 256 float32 values: 4 MiB, above the pooling threshold.
TOKENS, K, HIDDEN, EXPERTS = 2048, 2, 256, 16


def routed(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    experts = torch.rand(TOKENS, EXPERTS, generator=g).argsort(-1)[:, :K]
    weights = torch.rand(TOKENS, K, generator=g)
    return x, experts, weights


def test_reused_buffers_hold_fresh_results():
    for seed in range(3):
        x, experts, weights = routed(seed)
        x_sorted, plan = sparseroute.permute(x, experts, EXPERTS)
        ref_sorted, _ = permute_reference(x, experts, EXPERTS)
        assert torch.equal(x_sorted, ref_sorted)
        y = sparseroute.unpermute(x_sorted * 2, plan, weights)
        assert torch.equal(y, unpermute_reference(x_sorted * 2, plan.slot_to_row, weights))
        del x_sorted, y
        gc.collect()
    cached, limit = sparseroute.buffer_cache_info()
    assert 0 < cached <= limit


def test_pooled_outputs_are_ordinary_tensors():
    x, experts, weights = routed(7)
    x = x.requires_grad_()
    x_sorted, plan = sparseroute.permute(x, experts, EXPERTS)
    assert x_sorted.is_contiguous() and x_sorted.device.type == "cpu"
    assert x_sorted.untyped_storage().nbytes() >= x_sorted.numel() * 4
    view = x_sorted[1:, :7].t()
    assert view.sum().item() == pytest.approx(x_sorted[1:, :7].sum().item())
    y = sparseroute.unpermute(x_sorted.relu(), plan, weights)
    y.sum().backward()
    expected = sum((x.detach() > 0).float() * weights[:, j : j + 1] for j in range(K))
    torch.testing.assert_close(x.grad, expected)


def test_limit_zero_empties_the_cache():
    x, experts, _ = routed(3)
    x_sorted, _ = sparseroute.permute(x, experts, EXPERTS)
    del x_sorted
    gc.collect()
    _, limit = sparseroute.buffer_cache_info()
    try:
        sparseroute.set_buffer_cache_limit(0)
        assert sparseroute.buffer_cache_info() == (0, 0)
        x_sorted, _ = sparseroute.permute(x, experts, EXPERTS)
        del x_sorted
        gc.collect()
        assert sparseroute.buffer_cache_info()[0] == 0
    finally:
        sparseroute.set_buffer_cache_limit(limit)


def test_limit_is_validated():
    with pytest.raises(ValueError, match="num_bytes: expected at least 0, got -1"):
        sparseroute.set_buffer_cache_limit(-1)
    with pytest.raises(TypeError, match="num_bytes: expected an int"):
        sparseroute.set_buffer_cache_limit(1.5)


def test_pooled_outputs_pass_opcheck_and_compile():
    x, experts, weights = routed(11)
    x = x.requires_grad_()
    torch.library.opcheck(torch.ops.sparseroute.permute, (x, experts, EXPERTS, None, None, None, False))
    x_sorted, plan = sparseroute.permute(x.detach(), experts, EXPERTS)
    y_sorted = x_sorted.clone().requires_grad_()
    args = (y_sorted, plan.slot_to_row, plan.row_to_slot, weights.clone().requires_grad_())
    torch.library.opcheck(torch.ops.sparseroute.unpermute, args)

    def pipeline(x, weights):
        x_sorted, plan = sparseroute.permute(x, experts, EXPERTS, num_rows=TOKENS * K)
        return sparseroute.unpermute(x_sorted.sigmoid(), plan, weights)

    torch._dynamo.reset()
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    w = weights.clone().requires_grad_()
    torch.testing.assert_close(compiled(x, w), pipeline(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64])
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (1024, 512)])
def test_outputs_and_their_views_share_memory(dtype, shape):
    from sparseroute import _memory

    tensor, view = _memory.empty_with_view(shape, dtype)
    assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    assert view.shape == shape and (tensor.numel() == 0 or view.ctypes.data == tensor.data_ptr())
    tensor.fill_(3)
    expected = torch.full(shape, 3, dtype=dtype)
    carrier = expected.view(torch.int16) if dtype == torch.bfloat16 else expected
    assert (view == carrier.numpy()).all()
    view[...] = 0
    assert not tensor.any()
    # Ordinary tensors otherwise: autograd, in-place ops, sharing.
    if dtype.is_floating_point:
        (tensor.requires_grad_() * 2).sum().backward()
        assert torch.equal(tensor.grad, torch.full(shape, 2, dtype=dtype))
    tensor.detach().share_memory_()


def test_one_token_outputs_are_ordinary_tensors():
    logits = torch.randn(1, 8)
    weights, experts = sparseroute.topk_gating(logits, 2)
    x_sorted, plan = sparseroute.permute(torch.randn(1, 16), experts, 8)
    y = sparseroute.unpermute(x_sorted, plan, weights)
    for t in (weights, experts, x_sorted, y, *plan):
        t.clone().add_(1)
        assert t.is_contiguous() and not t.requires_grad
    assert plan.dropped.tolist() == [0] * 8 and plan.offsets.tolist()[-1] == 2
