"""Invalid input to the CUDA kernels, one case per path: each case runs the kernels' glue
(sparseroute._cuda_ops) on tensors of ``device``, checks what they made of the bad values
(treated as empty, skipped or not routed, as docs/cuda.md says), and passes the error counts
it expects, one per ``_cuda.ERROR_KINDS`` entry, to ``counted``, which compares them with the
device's counters and clears them.

test_cuda_emulated.py runs every case under the host emulation (the counters of its
launcher), tests/gpu/test_gpu_errors.py on a GPU (the counters read back through
``sparseroute.check_cuda_errors()``): the same inputs and expectations on both.
"""

from collections.abc import Callable
from functools import partial

import torch

from sparseroute import _cuda, _cuda_ops

from kernel_inputs import balance_logits, balance_tolerance, random_logits, tie_heavy_logits

ops = torch.ops.sparseroute
Counted = Callable[[list[int]], None]


def counts(**kinds: int) -> list[int]:
    """Expected counters: ``counts(kind4=3)`` is three of ERROR_KINDS[4], none of the others."""
    expected = [0] * len(_cuda.ERROR_KINDS)
    for kind, count in kinds.items():
        expected[int(kind.removeprefix("kind"))] = count
    return expected


def gating_gradient_bad_expert_ids(device, counted: Counted, score: str, normalize: bool) -> None:
    """An id outside [-1, E) is counted once per token and its slot treated as empty: the
    gradient is the CPU's for the same ids with -1 there (the CPU raises instead)."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 6, generator=g)
    _, experts = ops.topk_gating(logits, 3, score, normalize, None, None, None, 2, 1.0)
    grad_weights = torch.randn(5, 3, generator=g)
    bad = experts.clone()
    bad[1, 0], bad[1, 2], bad[3, 1] = 6, -4, 99
    grad = _cuda_ops.topk_gating_backward_cuda(
        logits.to(device), bad.to(device), grad_weights.to(device), score, normalize, 1.0
    )
    emptied = bad.masked_fill((bad < -1) | (bad >= 6), -1)
    cpu = ops.topk_gating_backward(logits, emptied, grad_weights, score, normalize, 1.0)
    torch.testing.assert_close(grad.cpu(), cpu, rtol=1e-6, atol=1e-6)
    counted(counts(kind1=2))  # tokens 1 and 3


def corrupt_plans(device, counted: Counted) -> None:
    """Plan entries outside the tensors are counted and never read out of bounds."""
    x = torch.randn(2, 4)
    xd = x.to(device)
    out = _cuda_ops.gather_rows_cuda(xd, torch.tensor([0, 7, 1], device=device), 1, None).cpu()
    assert torch.equal(out[1], torch.zeros(4)) and torch.equal(out[0], x[0])
    slot_to_row, row_to_slot = torch.tensor([[1], [5]], device=device), torch.tensor([0, 1], device=device)
    combined = _cuda_ops.unpermute_cuda(xd, slot_to_row, row_to_slot, None).cpu()
    assert torch.equal(combined[0], x[1]) and torch.equal(combined[1], torch.zeros(4))
    dots = _cuda_ops.slot_dots_cuda(xd, xd, torch.tensor([[0], [9]], device=device)).cpu()
    assert dots[1, 0] == 0
    counted(counts(kind2=3))


def bad_and_repeated_token_indices(device, counted: Counted) -> None:
    """Token indices outside [-1, S) and positions named twice are counted per extra entry and
    treated as -1: a position named twice is kept by neither entry."""
    x = torch.randn(2, 5, 3)
    indices = torch.tensor([[4, 9, 1], [2, 2, -3]])
    xd, indices_d = x.to(device), indices.to(device)
    rows = _cuda_ops.gather_tokens_cuda(xd, indices_d, None).cpu()
    assert torch.equal(rows[0, 0], x[0, 4]) and torch.equal(rows[0, 2], x[0, 1])
    assert not rows[0, 1].any() and not rows[1].any()
    counted(counts(kind4=3))
    y = torch.randn(2, 3, 3)
    out = _cuda_ops.scatter_tokens_cuda(xd, y.to(device), indices_d, None, 5).cpu()
    assert torch.equal(out[0, 4], y[0, 0]) and torch.equal(out[0, 1], y[0, 2])
    assert torch.equal(out[1], x[1])  # position 2 is kept twice: kept by neither entry
    dots = _cuda_ops.token_dots_cuda(xd, y.to(device), indices_d).cpu()
    assert dots[1].tolist() == [0.0] * 5
    counted(counts(kind4=6))


def select_nan_scores_and_bad_lengths(device, counted: Counted) -> None:
    """A sequence with a NaN score at a valid position, or a length outside [0, S], keeps
    nothing and is counted once; NaN past a sequence's length is fine."""
    scores = torch.randn(4, 6)
    scores[1, 2] = float("nan")
    scores[3, 5] = float("nan")  # past its length: fine
    lengths = torch.tensor([6, 6, 7, 5])
    indices, mask = _cuda_ops.select_tokens_cuda(scores.to(device), 2, "top", 0.0, lengths.to(device))
    indices, mask = indices.cpu(), mask.cpu()
    assert indices[1].tolist() == [-1, -1] and indices[2].tolist() == [-1, -1]
    assert not mask[1].any() and not mask[2].any()
    good = [0, 3]
    cpu_indices, cpu_mask = ops.select_tokens(scores[good], 2, "top", 0.0, lengths[good])
    assert torch.equal(indices[good], cpu_indices) and torch.equal(mask[good], cpu_mask)
    counted(counts(kind5=2))


def score_sums_gradient_non_finite_rows(device, counted: Counted, score: str) -> None:
    """A token whose logits hold NaN or an infinity gets a zero gradient, as a masked token,
    and is counted; the others get the CPU's gradient."""
    logits = balance_logits(9, 5, torch.float32, seed=3)
    logits[2, 1] = float("nan")
    logits[6, 4] = float("inf")
    grad_sums = torch.randn(2, 5, generator=torch.Generator().manual_seed(4))
    grad = _cuda_ops.score_sums_backward_cuda(logits.to(device), score, 5, None, grad_sums.to(device)).cpu()
    finite = torch.isfinite(logits).all(-1)
    cpu = ops.score_sums_backward(
        logits.masked_fill(~finite[:, None], 0.0), score, 5, finite.to(torch.uint8), grad_sums
    )
    assert (grad[~finite] == 0).all()
    torch.testing.assert_close(grad, cpu, **balance_tolerance(torch.float32))
    counted(counts(kind0=2))


def topp_ties_and_non_finite_rows(device, counted: Counted) -> None:
    """Top-p with exact ties routes as the CPU; rows holding NaN or an infinity are not routed
    (experts -1, weights 0) and are counted."""
    logits = tie_heavy_logits(12, 16, torch.float32, seed=3)
    logits[4, 2] = float("nan")
    logits[7, 0] = float("inf")
    weights, experts = (
        t.cpu() for t in _cuda_ops.topp_gating_cuda(logits.to(device), 0.5, 1, 16, True, False)
    )
    good = [t for t in range(12) if t not in (4, 7)]
    cpu_weights, cpu_experts = ops.topp_gating(logits[good], 0.5, 1, 16, True, False)
    assert torch.equal(experts[good], cpu_experts) and torch.equal(weights[good], cpu_weights)
    assert (experts[[4, 7]] == -1).all() and (weights[[4, 7]] == 0).all()
    counted(counts(kind0=2))


def expert_choice_non_finite_rows(device, counted: Counted, capacity: int) -> None:
    """Rows holding NaN or an infinity are counted and have probability 0 for every expert:
    chosen only where an expert has no better token (all of them, at capacity = T), with
    gate 0."""
    logits = random_logits(12, 4, torch.float32, seed=2)
    logits[3, 0] = float("nan")
    logits[7, 2] = float("-inf")
    gates, indices = (t.cpu() for t in _cuda_ops.expert_choice_cuda(logits.to(device), capacity))
    finite = torch.isfinite(logits).all(-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~finite, 0.0), dim=-1).masked_fill(~finite, 0.0)
    # Each expert's best tokens, ties to the lower token, listed in ascending token order.
    order = torch.sort(probs.T, dim=-1, descending=True, stable=True).indices[:, :capacity]
    expected = order.sort(dim=-1).values
    assert torch.equal(indices, expected)
    torch.testing.assert_close(gates, probs.T.gather(1, expected))
    if capacity == 12:
        assert (gates[:, [3, 7]] == 0).all()
    counted(counts(kind0=2))


def sinkhorn_overflowing_logits(device, counted: Counted) -> None:
    """Logits that are NaN, -inf or above 88 are counted (one each) and cost 0."""
    logits = torch.zeros(4, 3)
    logits[1, 2] = 90.0
    logits[2, 0] = float("nan")
    out = _cuda_ops.sinkhorn_cuda(logits.to(device), 5, 1e-4).cpu()
    assert torch.isfinite(out).all()
    counted(counts(kind7=2))


#: Every case, with its parameters bound (``case(device, counted)``).
CASES = {
    **{
        f"gating_gradient_bad_expert_ids-{score}-{normalize}": partial(
            gating_gradient_bad_expert_ids, score=score, normalize=normalize
        )
        for score, normalize in [("softmax", True), ("softmax", False), ("sigmoid", True)]
    },
    "corrupt_plans": corrupt_plans,
    "bad_and_repeated_token_indices": bad_and_repeated_token_indices,
    "select_nan_scores_and_bad_lengths": select_nan_scores_and_bad_lengths,
    **{
        f"score_sums_gradient_non_finite_rows-{score}": partial(
            score_sums_gradient_non_finite_rows, score=score
        )
        for score in ["softmax", "sigmoid"]
    },
    "topp_ties_and_non_finite_rows": topp_ties_and_non_finite_rows,
    **{
        f"expert_choice_non_finite_rows-{capacity}": partial(expert_choice_non_finite_rows, capacity=capacity)
        for capacity in [3, 12]
    },
    "sinkhorn_overflowing_logits": sinkhorn_overflowing_logits,
}
