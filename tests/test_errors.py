"""Bad input raises a clear TypeError or ValueError naming the argument, never a crash."""

import re

import pytest
import torch

import sparseroute

LOGITS = torch.randn(4, 8)
X = torch.randn(4, 3)
EXPERTS = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])


def raises(exc, pattern):
    return pytest.raises(exc, match=re.escape(pattern))


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda: sparseroute.topk_gating(LOGITS[0], 2), ValueError, "logits: expected a 2-D tensor [T, E]"),
        (lambda: sparseroute.topk_gating(LOGITS.long(), 2), TypeError, "logits: expected dtype float32"),
        (lambda: sparseroute.topk_gating(LOGITS.tolist(), 2), TypeError, "logits: expected a torch.Tensor"),
        (lambda: sparseroute.topk_gating(LOGITS.to("meta"), 2), ValueError, "logits: expected a CPU tensor"),
        (lambda: sparseroute.topk_gating(LOGITS, 9), ValueError, "k: expected 1 <= k <= 8"),
        (lambda: sparseroute.topk_gating(LOGITS, 0), ValueError, "k: expected 1 <= k <= 8"),
        (lambda: sparseroute.topk_gating(LOGITS, 2.0), TypeError, "k: expected an int"),
        (lambda: sparseroute.topk_gating(LOGITS, True), TypeError, "k: expected an int"),
        (lambda: sparseroute.topk_gating(LOGITS, 2, score="relu"), ValueError, "score: expected 'softmax'"),
        (lambda: sparseroute.topk_gating(LOGITS, 2, normalize=1), TypeError, "normalize: expected a bool"),
        (lambda: sparseroute.topk_gating(LOGITS, 2, scale="2"), TypeError, "scale: expected a float"),
        (
            lambda: sparseroute.topk_gating(LOGITS, 2, expert_bias=torch.zeros(7)),
            ValueError,
            "expert_bias: expected shape [E] = [8]",
        ),
        (
            lambda: sparseroute.topk_gating(LOGITS, 2, num_groups=3, topk_groups=1),
            ValueError,
            "num_groups: expected a divisor of the number of experts E = 8, got 3",
        ),
        (
            lambda: sparseroute.topk_gating(LOGITS, 2, num_groups=4),
            ValueError,
            "topk_groups: expected an int when the other group argument is given",
        ),
        (
            lambda: sparseroute.topk_gating(LOGITS, 2, num_groups=4, topk_groups=5),
            ValueError,
            "topk_groups: expected 1 <= topk_groups <= 4",
        ),
        (
            lambda: sparseroute.topk_gating(LOGITS, 2, num_groups=4, topk_groups=2, group_score_k=0),
            ValueError,
            "group_score_k: expected 1 <= group_score_k, got 0",
        ),
        (
            lambda: sparseroute.topk_gating(LOGITS, 5, num_groups=4, topk_groups=2),
            ValueError,
            "k: expected at most topk_groups * E / num_groups = 4 experts",
        ),
        (
            lambda: sparseroute.permute(X, EXPERTS[:3], 8),
            ValueError,
            "experts: expected T (rows of x) = 4, got 3",
        ),
        (
            lambda: sparseroute.permute(X, EXPERTS.float(), 8),
            TypeError,
            "experts: expected dtype int64 or int32",
        ),
        (
            lambda: sparseroute.permute(X, EXPERTS[:, 0], 8),
            ValueError,
            "experts: expected a 2-D tensor [T, k]",
        ),
        (lambda: sparseroute.permute(X[0], EXPERTS, 8), ValueError, "x: expected a 2-D tensor [T, d]"),
        (lambda: sparseroute.permute(X.int(), EXPERTS, 8), TypeError, "x: expected dtype float32"),
        (lambda: sparseroute.permute(X, EXPERTS, 0), ValueError, "num_experts: expected 1 <= num_experts"),
        (
            lambda: sparseroute.permute(X, EXPERTS, 8, num_rows=-1),
            ValueError,
            "num_rows: expected 0 <= num_rows",
        ),
        (lambda: sparseroute.unpermute(X, "plan"), TypeError, "plan: expected the PermutePlan"),
    ],
)
def test_bad_arguments(call, exc, pattern):
    with raises(exc, pattern):
        call()


@pytest.mark.parametrize("bad_id,where", [(8, "8 at token 2, slot 1"), (-2, "-2 at token 2, slot 1")])
def test_out_of_range_expert_ids(bad_id, where):
    experts = EXPERTS.clone()
    experts[2, 1] = bad_id
    with raises(
        sparseroute.InvalidInputError,
        f"experts: expected expert ids in [0, 8) or -1 for an empty slot, got {where}",
    ):
        sparseroute.permute(X, experts, 8)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits(value):
    logits = LOGITS.clone()
    logits[3, 5] = value
    with raises(sparseroute.InvalidInputError, "logits: expected finite values, got"):
        sparseroute.topk_gating(logits, 2)
    assert issubclass(sparseroute.InvalidInputError, ValueError)


@pytest.mark.parametrize("num_experts", [64, 256])
@pytest.mark.parametrize("token", [2, 5, 19])
def test_non_finite_logits_are_found_in_any_row(num_experts, token):
    # Rows go through the selection kernels eight at a time (two at a time with AVX-512):
    # the error names the row that holds the value, wherever it sits in its group.
    logits = torch.randn(24, num_experts)
    logits[token, num_experts - 3] = float("nan")
    with raises(sparseroute.InvalidInputError, f"got NaN at token {token}, expert {num_experts - 3}"):
        sparseroute.topk_gating(logits, 2)


def test_num_rows_smaller_than_routed_slots():
    with raises(
        sparseroute.InvalidInputError, "num_rows: expected at least the number of routed slots (8), got 5"
    ):
        sparseroute.permute(X, EXPERTS, 8, num_rows=5)


def test_unpermute_checks_the_plan_against_its_inputs():
    x_sorted, plan = sparseroute.permute(X, EXPERTS, 8)
    with raises(ValueError, "y_sorted: expected rows of the plan (len(plan.row_to_slot)) = 8, got 7"):
        sparseroute.unpermute(x_sorted[:7], plan)
    with raises(ValueError, "weights: expected shape [T, k] = [4, 2] (the plan's slots), got [4, 1]"):
        sparseroute.unpermute(x_sorted, plan, torch.ones(4, 1))
    corrupt = plan._replace(slot_to_row=plan.slot_to_row + 100)
    with raises(sparseroute.InvalidInputError, "plan.slot_to_row: expected row indices in [-1, 8)"):
        sparseroute.unpermute(x_sorted, corrupt)


def test_set_num_threads_validates():
    with raises(ValueError, "num_threads: expected at least 1, got 0"):
        sparseroute.set_num_threads(0)
    with raises(TypeError, "num_threads: expected an int or None"):
        sparseroute.set_num_threads(2.0)
