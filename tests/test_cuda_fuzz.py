"""Random calls of every CUDA kernel, run on the CPU by the host emulation, against the CPU
kernels: hypothesis draws the shapes, the options and the kind of data (exact ties, normal
values, values of widely different sizes, values a few ulp apart), and each property checks
what the fixed cases of test_cuda_emulated.py check (the same expert choices, plans, rows and
selections bit for bit; weights, sums and gradients within float tolerance). Where gating
compares computed scores (a bias or a group limit), a row may take other experts than the
CPU's when keys a few ulp apart decide it; the property checks that choice instead.

The emulation runs every CUDA thread as an OS thread, so each property runs few examples in
`make test` (the same ones on every run); ``SPARSEROUTE_FUZZ_EXAMPLES=500`` with
``HYPOTHESIS_PROFILE=slow`` explores many fresh ones.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseroute
from cuda_emulation import EmulatedLauncher, compiler, emulated_cuda
from sparseroute import _cuda_ops
from sparseroute.ops._bridge import accumulator_dtype

from kernel_inputs import balance_tolerance
from reference import assert_weights_close, gating_scores_reference, group_scores_reference

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler for the CUDA emulation")

ops = torch.ops.sparseroute
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FUZZ = settings(max_examples=int(os.environ.get("SPARSEROUTE_FUZZ_EXAMPLES", "10")))


@contextmanager
def emulated(**tuning: int) -> Iterator[EmulatedLauncher]:
    """The emulated CUDA glue, with ``_cuda_ops`` tuning constants set for the block (a
    function-scoped fixture would be shared by every example of a property)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in tuning.items():
            patch.setattr(_cuda_ops, name, value)
        with emulated_cuda(patch) as launcher:
            yield launcher


def both(name: str, *args):
    """Op ``name``'s CUDA kernel (emulated) and CPU kernel on the same arguments."""
    return _cuda_ops._KERNELS[name](*args), getattr(ops, name)(*args)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual, expected), what


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=what)


#: Kinds of values: "ties" small integers (exact in every dtype, many exact ties), "normal"
#: standard deviation 2, "wide" magnitudes from 1e-3 to 1e3 (saturated sigmoids, softmax
#: weights that underflow), "close" values a few ulp of the dtype apart (near ties).
KINDS = ["ties", "normal", "wide", "close"]


def values(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(-2, 3, shape, generator=g).to(dtype)
    if kind == "normal":
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    if kind == "wide":
        scale = 10.0 ** torch.randint(-3, 4, shape, generator=g)
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    ulp = torch.finfo(dtype).eps
    return (1.0 + torch.randint(0, 4, shape, generator=g) * ulp).to(dtype)


dtypes = st.sampled_from(FLOAT_DTYPES)
kinds = st.sampled_from(KINDS)
seeds = st.integers(0, 2**16)


def expert_ids(num_tokens: int, k: int, num_experts: int, holes: float, seed: int) -> torch.Tensor:
    """[T, k] ids in [0, E), a fraction ``holes`` of them -1 (empty slots)."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, num_experts, (num_tokens, k), generator=g)
    return experts.masked_fill(torch.rand(num_tokens, k, generator=g) < holes, -1)


# --- top-k gating --------------------------------------------------------------------------------


@st.composite
def gating_calls(draw):
    """(args of topk_gating, tuning constants): any route (lane teams, keyed teams, the warp,
    the block), with or without a bias and a group limit."""
    dtype = draw(dtypes)
    num_experts = draw(st.one_of(st.integers(1, 40), st.sampled_from([60, 64, 96, 160, 256, 700])))
    num_tokens = draw(st.integers(0, 40))
    groups = topk_groups = None
    if num_experts > 1 and draw(st.booleans()):
        groups = draw(
            st.sampled_from([g for g in range(1, min(num_experts, 40) + 1) if num_experts % g == 0])
        )
        topk_groups = draw(st.integers(1, groups))
    reachable = num_experts if groups is None else topk_groups * (num_experts // groups)
    k = draw(st.integers(1, min(reachable, 24)))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    kind = draw(kinds)
    seed = draw(seeds)
    logits = values((num_tokens, num_experts), dtype, kind, seed)
    bias = None
    if draw(st.booleans()):
        bias_kind = draw(st.sampled_from(["ties", "normal", "small"]))
        bias = values(
            (num_experts,), torch.float64, "normal" if bias_kind == "small" else bias_kind, seed + 1
        )
        bias = (bias * (1e-3 if bias_kind == "small" else 1.0)).to(accumulator_dtype(dtype))
    args = (
        logits,
        k,
        score,
        draw(st.booleans()),
        bias,
        groups,
        topk_groups,
        draw(st.integers(1, 4)),
        draw(st.sampled_from([1.0, 2.5, 0.1])),
    )
    tuning = draw(
        st.sampled_from(
            [
                {},
                {"LANE_TEAM_MAX_K": 0},  # the warp (or the block) for every call
                {"GATING_TARGET_THREADS": 1 << 30, "GATING_MIN_EXPERTS_PER_LANE": 1},  # wide teams
            ]
        )
    )
    return args, tuning


def rows_split_by_near_ties(experts: torch.Tensor, cpu_experts: torch.Tensor, args: tuple) -> torch.Tensor:
    """The rows where the emulated GPU chose other experts than the CPU, after checking that
    each such choice is valid once keys a few ulp apart count as ties.

    Without a bias or a group limit the logits are the keys, so no row may differ. With
    either, the keys are computed scores (plus the bias) and groups are ranked by sums of
    them; the GPU's exp and sum orders may order two keys or two group scores a few ulp
    apart differently (docs/cuda.md, "Same results as the CPU"). On such a row the GPU's
    experts must be k distinct experts from at most `topk_groups` groups, each group within
    the tolerance of the groups' cut, no expert left out of the groups in play above the
    chosen ones beyond the tolerance, and the chosen in non-increasing key order."""
    logits, k, score, _normalize, bias, groups, topk_groups, group_score_k, _scale = args
    differ = (experts != cpu_experts).any(-1)
    if bias is None and groups is None:
        assert not differ.any(), "experts: the logits are the keys, so bit for bit"
    if not differ.any():
        return differ
    keys = gating_scores_reference(logits.double(), score)
    if bias is not None:
        keys = keys + bias.double()
    all_group_scores = None if groups is None else group_scores_reference(keys, groups, group_score_k)
    eps = torch.finfo(accumulator_dtype(logits.dtype)).eps
    for t in differ.nonzero().flatten().tolist():
        row, chosen = keys[t], experts[t]
        tolerance = 16 * eps * (1 + row.abs().max().item()) * group_score_k
        assert chosen.unique().numel() == k, f"row {t}: {chosen.tolist()}"
        in_play = torch.ones_like(row, dtype=torch.bool)
        if all_group_scores is not None:
            size = row.numel() // groups
            group_scores = all_group_scores[t]
            cut = group_scores.topk(topk_groups).values[-1].item()
            chosen_groups = (chosen // size).unique()
            assert chosen_groups.numel() <= topk_groups, f"row {t}: groups {chosen_groups.tolist()}"
            assert (group_scores[chosen_groups] >= cut - tolerance).all(), f"row {t}: a group below the cut"
            # The groups the GPU must have selected: those of its experts, and those clearly
            # above the cut.
            selected = group_scores > cut + tolerance
            selected[chosen_groups] = True
            in_play = selected.repeat_interleave(size)
        in_play[chosen] = False
        chosen_keys = row[chosen]
        if in_play.any():
            assert row[in_play].max() <= chosen_keys.min() + tolerance, f"row {t}: a better key left out"
        assert (chosen_keys[:-1] >= chosen_keys[1:] - tolerance).all(), f"row {t}: out of order"
    return differ


@FUZZ
@given(call=gating_calls(), grad_seed=seeds)
def test_topk_gating_and_its_gradient(call, grad_seed):
    args, tuning = call
    logits, _k, score, normalize, _bias, _groups, _topk_groups, _n, scale = args
    dtype = logits.dtype
    with emulated(**tuning) as gpu:
        (weights, experts), (cpu_weights, cpu_experts) = both("topk_gating", *args)
        assert experts.shape == cpu_experts.shape and experts.dtype == cpu_experts.dtype
        differ = rows_split_by_near_ties(experts, cpu_experts, args)
        assert weights.dtype == cpu_weights.dtype
        assert_weights_close(weights[~differ], cpu_weights[~differ], dtype)
        # The gradient, with some slots emptied as top-p layouts leave them.
        g = torch.Generator().manual_seed(grad_seed)
        chosen = cpu_experts.masked_fill(torch.rand(cpu_experts.shape, generator=g) < 0.1, -1)
        grad_weights = torch.randn(chosen.shape, generator=g, dtype=torch.float64).to(cpu_weights.dtype)
        grad, cpu_grad = both("topk_gating_backward", logits, chosen, grad_weights, score, normalize, scale)
        assert grad.dtype == cpu_grad.dtype == dtype
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
        assert_close(grad, cpu_grad, "grad_logits", tol * max(1.0, abs(scale)))
        assert not gpu.errors.any()


# --- permute, unpermute and the row kernels ------------------------------------------------------


@st.composite
def permute_calls(draw):
    """(args of permute, tuning constants): dropless or with a capacity (either drop policy,
    padded or not), rows in blocks or not, a static row count or not, one block's plan or
    the chunked kernels."""
    num_tokens = draw(st.integers(0, 300))
    k = draw(st.integers(1, 6))
    num_experts = draw(st.one_of(st.integers(1, 20), st.sampled_from([60, 64, 160, 1000])))
    dtype = draw(dtypes)
    row_len = draw(st.sampled_from([1, 3, 8, 16, 33]))
    seed = draw(seeds)
    experts = expert_ids(num_tokens, k, num_experts, draw(st.sampled_from([0.0, 0.1, 0.5])), seed)
    if draw(st.booleans()):  # a skewed load: most slots to expert 0
        experts = experts.masked_fill(
            torch.rand(experts.shape, generator=torch.Generator().manual_seed(seed)) < 0.8, 0
        )
    x = values((num_tokens, row_len), dtype, "normal", seed + 1)
    block_size = draw(st.sampled_from([1, 1, 2, 16]))
    capacity = drop_weights = None
    pad = False
    num_rows = None
    if draw(st.booleans()):
        capacity = draw(st.integers(0, num_tokens * k // max(1, num_experts) + 4))
        pad = draw(st.booleans())
        if pad:
            capacity -= capacity % block_size
        if draw(st.booleans()):
            g = torch.Generator().manual_seed(seed + 2)
            # A coarse grid of weights: many exact ties, broken by the lower slot.
            drop_weights = torch.randint(0, 4, experts.shape, generator=g).float() / 4
    if not pad and draw(st.booleans()):
        num_rows = num_tokens * k + num_experts * (block_size - 1) + draw(st.integers(0, 3)) * block_size
    tuning = draw(st.sampled_from([{}, {"SMALL_PLAN_MAX_SLOTS": -1}, {"PLAN_MIN_CHUNK_SLOTS": 32}]))
    return (x, experts, num_experts, num_rows, capacity, drop_weights, pad, block_size), tuning


PLAN_OUTPUTS = ["x_sorted", "tokens_per_expert", "offsets", "row_to_slot", "slot_to_row", "dropped"]


@FUZZ
@given(call=permute_calls(), seed=seeds)
def test_permute_and_the_row_kernels(call, seed):
    args, tuning = call
    x, experts = args[0], args[1]
    num_tokens, k = experts.shape
    with emulated(**tuning) as gpu:
        ours, cpu = both("permute", *args)
        for name, a, b in zip(PLAN_OUTPUTS, ours, cpu, strict=True):
            assert_same(a, b, name)
        _, _, _, row_to_slot, slot_to_row, _ = cpu
        g = torch.Generator().manual_seed(seed)
        y_sorted = torch.randn(row_to_slot.shape[0], x.shape[1], generator=g, dtype=torch.float64).to(x.dtype)
        weights = torch.rand(num_tokens, k, generator=g, dtype=torch.float64).to(accumulator_dtype(x.dtype))
        for w in (None, weights):
            assert_same(*both("unpermute", y_sorted, slot_to_row, row_to_slot, w), "unpermute")
            assert_same(*both("gather_rows", x, row_to_slot, k, w), "gather_rows")
        grad_y = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
        assert_same(*both("slot_dots", grad_y, y_sorted, slot_to_row), "slot_dots")
        assert not gpu.errors.any()


# --- tokens: Mixture-of-Depths -------------------------------------------------------------------


@st.composite
def select_calls(draw):
    batch = draw(st.integers(0, 5))
    seq_len = draw(st.one_of(st.integers(1, 70), st.sampled_from([257, 700])))
    dtype = draw(dtypes)
    scores = values((batch, seq_len), dtype, draw(kinds), draw(seeds))
    rule = draw(st.sampled_from(["top", "fraction", "threshold"]))
    capacity = draw(st.integers(0, seq_len))
    value = 0.0
    if rule == "fraction":
        value = draw(st.sampled_from([0.01, 0.125, 0.3, 0.5, 1.0]))
        capacity = sparseroute.token_capacity(value, seq_len)
    elif rule == "threshold":
        value = float(scores.double().median()) if scores.numel() else 0.0
    lengths = None
    if draw(st.booleans()):
        lengths = torch.tensor(
            draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch)), dtype=torch.int64
        )
        for b in range(batch):
            scores[b, int(lengths[b]) :] = float("nan")  # padding is never read
    return scores, capacity, rule, value, lengths


@FUZZ
@given(call=select_calls(), row_len=st.sampled_from([1, 5, 8, 16]), seed=seeds)
def test_select_tokens_and_the_token_row_kernels(call, row_len, seed):
    scores, capacity, rule, value, lengths = call
    batch, seq_len = scores.shape
    with emulated() as gpu:
        (indices, mask), (cpu_indices, cpu_mask) = both(
            "select_tokens", scores, capacity, rule, value, lengths
        )
        assert_same(indices, cpu_indices, "indices")
        assert_same(mask, cpu_mask, "mask")
        dtype = scores.dtype
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, seq_len, row_len, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randn(batch, capacity, row_len, generator=g, dtype=torch.float64).to(dtype)
        gate = torch.rand(batch, seq_len, generator=g, dtype=torch.float64).to(accumulator_dtype(dtype))
        for scale in (None, gate):
            assert_same(*both("gather_tokens", x, cpu_indices, scale), "gather_tokens")
        for base, ys, gates in [(x, y, None), (x, y, gate), (None, y, gate), (x, None, None)]:
            assert_same(*both("scatter_tokens", base, ys, cpu_indices, gates, seq_len), "scatter_tokens")
        assert_same(*both("token_dots", x, y, cpu_indices), "token_dots")
        assert not gpu.errors.any()


# --- load balancing ------------------------------------------------------------------------------


@FUZZ
@given(
    dtype=dtypes,
    num_tokens=st.integers(1, 300),
    num_experts=st.one_of(st.integers(1, 20), st.sampled_from([60, 160])),
    group_size=st.integers(1, 400),
    kind=kinds,
    masked=st.booleans(),
    seed=seeds,
)
def test_balance_kernels(dtype, num_tokens, num_experts, group_size, kind, masked, seed):
    logits = values((num_tokens, num_experts), dtype, kind, seed)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(num_tokens, generator=g) > 0.3).to(torch.uint8) if masked else None
    close = balance_tolerance(dtype)
    grad_tolerance = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype)
    with emulated() as gpu:
        for score in ("softmax", "sigmoid"):
            sums, cpu_sums = both("score_sums", logits, score, group_size, mask)
            assert sums.dtype == cpu_sums.dtype and sums.shape == cpu_sums.shape
            torch.testing.assert_close(sums, cpu_sums, **close)
            grad_sums = torch.randn(cpu_sums.shape, generator=g, dtype=torch.float64).to(cpu_sums.dtype)
            grad, cpu_grad = both("score_sums_backward", logits, score, group_size, mask, grad_sums)
            if grad_tolerance is None:
                torch.testing.assert_close(grad, cpu_grad, **close)
            else:
                assert_close(grad, cpu_grad, "score_sums_backward", grad_tolerance)
        experts = expert_ids(num_tokens, 3, num_experts, 0.2, seed)
        assert_same(*both("expert_counts", experts, num_experts, group_size, mask), "expert_counts")
        (loss, stats), (cpu_loss, cpu_stats) = both("z_loss", logits, mask)
        torch.testing.assert_close(loss, cpu_loss, **close)
        assert_same(stats[:, 0], cpu_stats[:, 0], "row maxima")
        torch.testing.assert_close(stats[:, 1], cpu_stats[:, 1], **close)
        grad = torch.tensor(-0.75, dtype=loss.dtype)
        grad_logits, cpu_grad_logits = both("z_loss_backward", logits, cpu_stats, grad)
        torch.testing.assert_close(grad_logits.float(), cpu_grad_logits.float(), **close)
        assert not gpu.errors.any()


# --- routing variants ----------------------------------------------------------------------------


def assert_routing_bits(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """float32/bfloat16/float16 logits: the CPU's bits; float64: within an ulp or so (the
    GPU's exp in float64 is not the CPU's)."""
    if dtype == torch.float64:
        assert_close(actual, expected, what, 1e-13)
    else:
        assert_same(actual, expected, what)


@FUZZ
@given(
    dtype=dtypes,
    num_tokens=st.integers(0, 60),
    num_experts=st.one_of(st.integers(1, 20), st.sampled_from([60, 64, 160])),
    kind=kinds,
    seed=seeds,
    data=st.data(),
)
def test_topp_gating_and_expert_choice(dtype, num_tokens, num_experts, kind, seed, data):
    logits = values((num_tokens, num_experts), dtype, kind, seed)
    max_k = data.draw(st.integers(1, num_experts))
    min_k = data.draw(st.integers(0, max_k))
    p = data.draw(st.sampled_from([0.05, 0.3, 0.6, 0.9, 1.0]))
    inclusive, normalize = data.draw(st.booleans()), data.draw(st.booleans())
    capacity = data.draw(st.integers(0, num_tokens))
    with emulated() as gpu:
        (weights, experts), (cpu_weights, cpu_experts) = both(
            "topp_gating", logits, p, min_k, max_k, inclusive, normalize
        )
        assert_same(experts, cpu_experts, "topp experts")
        assert_routing_bits(weights, cpu_weights, dtype, "topp weights")
        (gates, indices), (cpu_gates, cpu_indices) = both("expert_choice", logits, capacity)
        assert_same(indices, cpu_indices, "expert_choice indices")
        assert_routing_bits(gates, cpu_gates, dtype, "expert_choice gates")
        g = torch.Generator().manual_seed(seed)
        grad_gates = torch.randn(cpu_gates.shape, generator=g, dtype=torch.float64).to(cpu_gates.dtype)
        grad, cpu_grad = both("expert_choice_backward", logits, cpu_indices, grad_gates)
        assert_routing_bits(grad, cpu_grad, dtype, "expert_choice gradient")
        (slot_weights, slot_experts), (cpu_slot_weights, cpu_slot_experts) = both(
            "expert_choice_slots", cpu_indices, cpu_gates, num_tokens
        )
        assert_same(slot_experts, cpu_slot_experts, "expert_choice_slots experts")
        assert torch.equal(slot_weights, cpu_slot_weights.to(slot_weights.dtype))
        assert not gpu.errors.any()


@FUZZ
@given(
    num_tokens=st.integers(1, 700),
    num_experts=st.one_of(st.integers(1, 20), st.sampled_from([60, 64])),
    kind=st.sampled_from(["ties", "normal"]),
    iters=st.sampled_from([None, 1, 3]),
    tol=st.sampled_from([1e-4, 1e-2]),
    seed=seeds,
)
def test_sinkhorn(num_tokens, num_experts, kind, iters, tol, seed):
    """Valid logits only: the CPU refuses the others, and the GPU takes their cost as 0,
    which can leave the iteration many steps from ``tol`` (see docs/cuda.md). One or two
    tokens run a fixed number of iterations: to ``tol`` they can take 10^5 (see sinkhorn's
    docstring), too many to emulate."""
    logits = values((num_tokens, num_experts), torch.float32, kind, seed)
    if num_tokens < 3 and iters is None:
        iters = 4
    with emulated() as gpu:
        assert_same(*both("sinkhorn", logits, iters, tol), "sinkhorn")
        assert not gpu.errors.any()


@FUZZ
@given(
    dtype=dtypes,
    batch=st.integers(0, 9),
    layers=st.integers(0, 300),
    kind=kinds,
    seed=seeds,
)
def test_layer_plan(dtype, batch, layers, kind, seed):
    """Router logits [B, L, 3] (one score per action and layer): the same plan."""
    logits = values((batch, layers, 3), dtype, kind, seed)
    with emulated() as gpu:
        assert_same(*both("layer_plan", logits), "layer_plan")
        assert not gpu.errors.any()


# --- placement -----------------------------------------------------------------------------------


@FUZZ
@given(
    num_experts=st.integers(1, 40),
    replicas=st.integers(1, 5),
    slots_per_gpu=st.integers(1, 12),
    gpus=st.integers(1, 8),
    num_tokens=st.integers(0, 200),
    k=st.integers(1, 4),
    policy=st.sampled_from(["round_robin", "load"]),
    seed=seeds,
)
def test_replica_map(num_experts, replicas, slots_per_gpu, gpus, num_tokens, k, policy, seed):
    num_slots = slots_per_gpu * gpus
    replicas = min(replicas, num_slots)
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, replicas + 1, (num_experts,), generator=g)
    table = torch.full((num_experts, replicas), -1, dtype=torch.int64)
    for e in range(num_experts):
        table[e, : int(counts[e])] = torch.randperm(num_slots, generator=g)[: int(counts[e])].sort().values
    experts = expert_ids(num_tokens, k, num_experts, 0.15, seed)
    with emulated() as gpu:
        assert_same(
            *both("replica_map", experts, table, counts, num_slots, slots_per_gpu, policy), "replica_map"
        )
        assert not gpu.errors.any()
