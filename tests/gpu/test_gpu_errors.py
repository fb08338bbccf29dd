"""Invalid input on the GPU: counted in the device's error buffer, by kind, and handled as
docs/cuda.md says (treated as empty, skipped or not routed), never a crash. The same inputs
and expectations as the emulated tests of these paths (tests/test_cuda_emulated.py), so the
real kernels, atomics included, are held to what the emulation checked; each test reads the
counts back through ``sparseroute.check_cuda_errors()``."""

import pytest
import torch

import sparseroute
from sparseroute import InvalidInputError, _cuda
from sparseroute import _cuda_ops as cuda

ops = torch.ops.sparseroute
DEVICE = "cuda"


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def assert_counted(**counts: int) -> None:
    """check_cuda_errors() raises naming exactly these counts, by the index of their kind in
    ERROR_KINDS (``kind1=2``: two of ERROR_KINDS[1]), and clears them."""
    found = "; ".join(
        f"{count} {_cuda.ERROR_KINDS[int(kind.removeprefix('kind'))]}"
        for kind, count in sorted(counts.items())
    )
    with pytest.raises(InvalidInputError) as raised:
        sparseroute.check_cuda_errors()
    assert str(raised.value).endswith("since the last check: " + found)


@pytest.mark.parametrize(("score", "normalize"), [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_gating_gradient_skips_and_counts_bad_expert_ids(score, normalize):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 6, generator=g)
    _, experts = ops.topk_gating(logits, 3, score, normalize, None, None, None, 1.0)
    grad_weights = torch.randn(5, 3, generator=g)
    bad = experts.clone()
    bad[1, 0], bad[1, 2], bad[3, 1] = 6, -4, 99
    grad = cuda.topk_gating_backward_cuda(*on_device(logits, bad, grad_weights), score, normalize, 1.0)
    emptied = bad.masked_fill((bad < -1) | (bad >= 6), -1)
    expected = ops.topk_gating_backward(logits, emptied, grad_weights, score, normalize, 1.0)
    torch.testing.assert_close(grad.cpu(), expected, rtol=1e-6, atol=1e-6)
    assert_counted(kind1=2)  # tokens 1 and 3


def test_corrupt_plans_are_counted_and_never_read_out_of_bounds():
    x = torch.randn(2, 4)
    (xd,) = on_device(x)
    out = cuda.gather_rows_cuda(xd, *on_device(torch.tensor([0, 7, 1])), 1, None).cpu()
    assert torch.equal(out[1], torch.zeros(4)) and torch.equal(out[0], x[0])
    combined = cuda.unpermute_cuda(xd, *on_device(torch.tensor([[1], [5]]), torch.tensor([0, 1])), None).cpu()
    assert torch.equal(combined[0], x[1]) and torch.equal(combined[1], torch.zeros(4))
    dots = cuda.slot_dots_cuda(xd, xd, *on_device(torch.tensor([[0], [9]]))).cpu()
    assert dots[1, 0] == 0
    assert_counted(kind2=3)


def test_scatter_and_dots_treat_bad_and_repeated_indices_as_empty():
    x = torch.randn(2, 5, 3)
    y = torch.randn(2, 3, 3)
    indices = torch.tensor([[4, 9, 1], [2, 2, -3]])
    out = cuda.scatter_tokens_cuda(*on_device(x, y, indices), None, 5).cpu()
    assert torch.equal(out[0, 4], y[0, 0]) and torch.equal(out[0, 1], y[0, 2])
    assert torch.equal(out[1], x[1])  # position 2 is kept twice: kept by neither entry
    assert_counted(kind4=3)
    dots = cuda.token_dots_cuda(*on_device(x, y, indices)).cpu()
    assert dots[1].tolist() == [0.0] * 5
    assert_counted(kind4=3)


def test_select_tokens_counts_nan_scores_and_bad_lengths():
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    scores[1, 2] = float("nan")
    scores[3, 5] = float("nan")  # past its length: fine
    lengths = torch.tensor([6, 6, 7, 5])
    indices, mask = (
        t.cpu() for t in cuda.select_tokens_cuda(*on_device(scores), 2, "top", 0.0, *on_device(lengths))
    )
    assert indices[1].tolist() == [-1, -1] and indices[2].tolist() == [-1, -1]
    assert not mask[1].any() and not mask[2].any()
    good = [0, 3]
    cpu_indices, cpu_mask = ops.select_tokens(scores[good], 2, "top", 0.0, lengths[good])
    assert torch.equal(indices[good], cpu_indices) and torch.equal(mask[good], cpu_mask)
    assert_counted(kind5=2)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_score_sum_gradient_skips_and_counts_non_finite_rows(score):
    logits = (torch.randn(9, 5, generator=torch.Generator().manual_seed(3)) * 3).float()
    logits[2, 1] = float("nan")
    logits[6, 4] = float("inf")
    grad_sums = torch.randn(2, 5, generator=torch.Generator().manual_seed(4))
    grad = cuda.score_sums_backward_cuda(*on_device(logits), score, 5, None, *on_device(grad_sums)).cpu()
    finite = torch.isfinite(logits).all(-1)
    expected = ops.score_sums_backward(
        logits.masked_fill(~finite[:, None], 0.0), score, 5, finite.to(torch.uint8), grad_sums
    )
    assert (grad[~finite] == 0).all()
    torch.testing.assert_close(grad, expected, rtol=2e-5, atol=2e-5)
    assert_counted(kind0=2)


def test_topp_gating_does_not_route_non_finite_rows():
    logits = torch.randint(0, 5, (12, 16), generator=torch.Generator().manual_seed(3)).float()
    logits[4, 2] = float("nan")
    logits[7, 0] = float("inf")
    weights, experts = (t.cpu() for t in cuda.topp_gating_cuda(*on_device(logits), 0.5, 1, 16, True, False))
    good = [t for t in range(12) if t not in (4, 7)]
    cpu_weights, cpu_experts = ops.topp_gating(logits[good], 0.5, 1, 16, True, False)
    assert torch.equal(experts[good], cpu_experts) and torch.equal(weights[good], cpu_weights)
    assert (experts[[4, 7]] == -1).all() and (weights[[4, 7]] == 0).all()
    assert_counted(kind0=2)


@pytest.mark.parametrize("capacity", [3, 12])
def test_expert_choice_gives_non_finite_rows_probability_zero(capacity):
    logits = (torch.randn(12, 4, generator=torch.Generator().manual_seed(2)) * 2).float()
    logits[3, 0] = float("nan")
    logits[7, 2] = float("-inf")
    gates, indices = (t.cpu() for t in cuda.expert_choice_cuda(*on_device(logits), capacity))
    finite = torch.isfinite(logits).all(-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~finite, 0.0), dim=-1).masked_fill(~finite, 0.0)
    order = torch.sort(probs.T, dim=-1, descending=True, stable=True).indices[:, :capacity]
    expected = order.sort(dim=-1).values
    assert torch.equal(indices, expected)
    torch.testing.assert_close(gates, probs.T.gather(1, expected))
    assert_counted(kind0=2)


def test_sinkhorn_counts_logits_that_overflow():
    logits = torch.zeros(4, 3)
    logits[1, 2] = 90.0
    logits[2, 0] = float("nan")
    out = cuda.sinkhorn_cuda(*on_device(logits), 5, 1e-4).cpu()
    assert torch.isfinite(out).all()
    with pytest.raises(InvalidInputError, match=r"since the last check: \d+ sinkhorn logits"):
        sparseroute.check_cuda_errors()
