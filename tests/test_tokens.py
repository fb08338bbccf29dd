"""Token selection, gather and scatter (Mixture-of-Depths): against the pure-torch
references, invariants of the index layout, gradients, opcheck, torch.compile, dtypes,
edge cases and bad input."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from reference import (
    gather_tokens_reference,
    scatter_tokens_reference,
    select_tokens_reference,
    token_count_reference,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _scores(batch, seq_len, seed, dtype=torch.float32, ties=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, seq_len, generator=g, dtype=torch.float64)
    if ties:
        # Few distinct values, all exact in every dtype: many ties, none split by rounding.
        scores = (scores * 2).round() / 2
    return scores.to(dtype)


def _check_layout(selection, seq_len, lengths):
    """Ascending kept positions, then -1; the mask holds exactly those positions."""
    indices, mask = selection
    for b in range(indices.shape[0]):
        row = indices[b]
        kept = row[row >= 0]
        assert bool((row[len(kept) :] == -1).all()), "padding entries come last"
        assert bool((kept[1:] > kept[:-1]).all()), "kept positions ascend"
        expected = torch.zeros(seq_len, dtype=torch.bool)
        expected[kept] = True
        assert torch.equal(mask[b], expected)
        if lengths is not None:
            assert bool((kept < lengths[b]).all()), "padding is never kept"
    assert torch.equal(selection.counts, (indices >= 0).sum(dim=1))


@given(
    batch=st.integers(0, 4),
    seq_len=st.integers(0, 40),
    capacity=st.one_of(st.integers(0, 40), st.floats(0.01, 1.0)),
    use_lengths=st.booleans(),
    threshold=st.one_of(st.none(), st.floats(-1.0, 1.0)),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_select_matches_reference(batch, seq_len, capacity, use_lengths, threshold, dtype, ties, seed):
    if isinstance(capacity, int):
        capacity = min(capacity, seq_len)
    elif seq_len == 0:
        capacity = 0
    scores = _scores(batch, seq_len, seed, dtype, ties)
    lengths = None
    if use_lengths:
        lengths = torch.randint(0, seq_len + 1, (batch,), generator=torch.Generator().manual_seed(seed))
        # Padding may hold anything, NaN included: it is never read.
        for b in range(batch):
            scores[b, lengths[b] :] = float("nan")
    selection = sparseroute.select_tokens(scores, capacity, lengths=lengths, threshold=threshold)
    indices, mask = select_tokens_reference(scores, capacity, lengths=lengths, threshold=threshold)
    assert torch.equal(selection.indices, indices)
    assert torch.equal(selection.mask, mask)
    assert selection.indices.shape == (batch, token_count_reference(capacity, seq_len))
    _check_layout(selection, seq_len, lengths)
    if threshold is None:
        for b in range(batch):
            length = seq_len if lengths is None else int(lengths[b])
            assert int(selection.counts[b]) == min(
                token_count_reference(capacity, length), selection.indices.shape[1]
            )


def test_fraction_capacity_rounds_decimal_fractions():
    assert sparseroute.token_capacity(0.1, 30) == 3
    assert sparseroute.token_capacity(0.125, 2048) == 256
    assert sparseroute.token_capacity(0.3, 10) == 3
    assert sparseroute.token_capacity(0.31, 10) == 4
    assert sparseroute.token_capacity(1.0, 7) == 7
    assert sparseroute.token_capacity(5, 7) == 5
    for fraction in (0.05, 0.1, 0.125, 0.2, 0.3, 0.7, 0.9):
        for seq_len in range(0, 200):
            assert sparseroute.token_capacity(fraction, seq_len) == token_count_reference(fraction, seq_len)


def test_ties_keep_the_lower_position_and_signed_zeros_are_equal():
    scores = torch.tensor([[0.0, -0.0, 1.0, 0.0, 1.0, -0.0]])
    assert sparseroute.select_tokens(scores, 3).indices.tolist() == [[0, 2, 4]]
    assert sparseroute.select_tokens(scores, 4).indices.tolist() == [[0, 1, 2, 4]]
    infinite = torch.tensor([[float("-inf"), 2.0, float("inf"), float("-inf")]])
    assert sparseroute.select_tokens(infinite, 3).indices.tolist() == [[0, 1, 2]]


def test_threshold_mode_is_causal():
    """A position's decision does not change when later positions change."""
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(4, 32, generator=g)
    full = sparseroute.select_tokens(scores, 32, threshold=0.5)
    for prefix in (1, 7, 20):
        altered = scores.clone()
        altered[:, prefix:] = torch.rand(4, 32 - prefix, generator=g)
        part = sparseroute.select_tokens(altered, 32, threshold=0.5)
        assert torch.equal(part.mask[:, :prefix], full.mask[:, :prefix])
    # Capped threshold selection keeps the earliest positions, not the best ones.
    capped = sparseroute.select_tokens(scores, 2, threshold=0.5)
    assert torch.equal(capped.indices, full.indices[:, :2])


def _random_indices(batch, seq_len, capacity, seed, ascending=False):
    """Distinct positions per sequence in any order, with -1 entries anywhere."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(seq_len, generator=g)[:capacity] for _ in range(batch)])
    if ascending:
        indices = indices.sort(dim=1).values
    drop = torch.rand(batch, capacity, generator=g) < 0.25
    return torch.where(drop, -1, indices)


@given(
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 24),
    capacity_share=st.floats(0.0, 1.0),
    width=st.integers(0, 9),
    gated=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_gather_and_scatter_match_reference(batch, seq_len, capacity_share, width, gated, dtype, seed):
    capacity = round(capacity_share * seq_len)
    g = torch.Generator().manual_seed(seed)
    indices = _random_indices(batch, seq_len, capacity, seed)
    x = torch.randn(batch, seq_len, width, generator=g).to(dtype).requires_grad_()
    y = torch.randn(batch, capacity, width, generator=g).to(dtype).requires_grad_()
    gate = torch.rand(batch, seq_len, generator=g).requires_grad_() if gated else None

    rows = sparseroute.gather_tokens(x, indices)
    assert torch.equal(rows, gather_tokens_reference(x, indices))
    out = sparseroute.scatter_tokens(x, y, indices, gate)
    expected = scatter_tokens_reference(x, y, indices, gate)
    # Both compute x + g * y in float32 (float64) and round once: bitwise equal.
    assert torch.equal(out, expected)

    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    grad_rows = torch.randn(rows.shape, generator=g).to(dtype)
    inputs = (x, y) if gate is None else (x, y, gate)
    ours = torch.autograd.grad((out, rows), inputs, (grad_out, grad_rows), allow_unused=True)
    theirs = torch.autograd.grad(
        (expected, gather_tokens_reference(x, indices)), inputs, (grad_out, grad_rows), allow_unused=True
    )
    for mine, reference in zip(ours, theirs, strict=True):
        tolerance = {} if dtype in (torch.float32, torch.float64) else {"atol": 1e-2, "rtol": 1e-2}
        torch.testing.assert_close(mine, reference, **tolerance)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(2, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    selection = sparseroute.select_tokens(scores.detach(), 4, lengths=torch.tensor([7, 3]))

    def mod_block(x, scores, weight):
        rows = sparseroute.gather_tokens(x, selection.indices)
        return sparseroute.scatter_tokens(
            x, torch.tanh(rows @ weight), selection.indices, torch.sigmoid(scores)
        )

    def replacing_block(x, weight):
        rows = sparseroute.gather_tokens(x, selection.indices)
        return sparseroute.scatter_tokens(x, torch.tanh(rows @ weight), selection.indices)

    assert torch.autograd.gradcheck(mod_block, (x, scores, weight))
    assert torch.autograd.gradcheck(replacing_block, (x, weight))


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g, requires_grad=True)
    scores = torch.randn(2, 9, generator=g)
    indices = sparseroute.select_tokens(scores, 5, lengths=torch.tensor([9, 4])).indices
    y = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    gate = torch.rand(2, 9, generator=g, requires_grad=True)
    ops = torch.ops.sparseroute
    torch.library.opcheck(ops.select_tokens, (scores, 5, "top", 0.0, torch.tensor([9, 4])))
    torch.library.opcheck(ops.select_tokens, (scores, 5, "threshold", 0.1, None))
    torch.library.opcheck(ops.gather_tokens, (x, indices, None))
    torch.library.opcheck(ops.scatter_tokens, (x, y, indices, gate, 9))
    torch.library.opcheck(ops.scatter_tokens, (x, y, indices, None, 9))
    torch.library.opcheck(ops.scatter_tokens, (None, y, indices, None, 9))
    torch.library.opcheck(ops.token_dots, (x.detach(), y.detach(), indices))


def test_compiled_mod_block_matches_eager():
    g = torch.Generator().manual_seed(0)
    router = torch.nn.Linear(8, 1)
    block = torch.nn.Linear(8, 8)

    def mod_block(x):
        scores = router(x).squeeze(-1)
        selection = sparseroute.select_tokens(scores.detach(), 0.25)
        rows = sparseroute.gather_tokens(x, selection.indices)
        return sparseroute.scatter_tokens(x, block(rows), selection.indices, torch.sigmoid(scores))

    x = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(mod_block, fullgraph=True, backend="aot_eager")
    eager_out = mod_block(x)
    compiled_out = compiled(x)
    torch.testing.assert_close(compiled_out, eager_out)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), (x, *router.parameters()))
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), (x, *router.parameters()))
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_results_do_not_depend_on_threads():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 1024, generator=g)
    x = torch.randn(8, 1024, 64, generator=g, requires_grad=True)
    gate = torch.rand(8, 1024, generator=g, requires_grad=True)

    def run(threads):
        sparseroute.set_num_threads(threads)
        selection = sparseroute.select_tokens(scores, 0.125)
        rows = sparseroute.gather_tokens(x, selection.indices)
        out = sparseroute.scatter_tokens(x, rows * 2, selection.indices, gate)
        grads = torch.autograd.grad(out.sum(), (x, gate))
        return (selection.indices, out, *grads)

    single = run(1)
    for a, b in zip(single, run(3), strict=True):
        assert torch.equal(a, b)


def test_edge_cases():
    # No sequences, no positions, no capacity, keep everything, width 0.
    empty = sparseroute.select_tokens(torch.randn(0, 5), 2)
    assert empty.indices.shape == (0, 2) and empty.mask.shape == (0, 5)
    none = sparseroute.select_tokens(torch.randn(2, 0), 0)
    assert none.indices.shape == (2, 0) and none.mask.shape == (2, 0)
    zero = sparseroute.select_tokens(torch.randn(2, 5), 0)
    assert zero.indices.shape == (2, 0) and not bool(zero.mask.any())
    everything = sparseroute.select_tokens(torch.randn(2, 5), 1.0)
    assert everything.indices.tolist() == [list(range(5))] * 2
    single = sparseroute.select_tokens(torch.randn(1, 1), 1)
    assert single.indices.tolist() == [[0]]
    x = torch.randn(2, 5, 3, requires_grad=True)
    rows = sparseroute.gather_tokens(x, zero.indices)
    assert rows.shape == (2, 0, 3)
    out = sparseroute.scatter_tokens(x, rows, zero.indices, torch.rand(2, 5))
    assert torch.equal(out, x)
    padding_only = torch.full((2, 3), -1)
    assert torch.equal(sparseroute.gather_tokens(x, padding_only), torch.zeros(2, 3, 3))
    narrow = torch.randn(2, 5, 0)
    assert sparseroute.scatter_tokens(narrow, torch.randn(2, 1, 0), torch.tensor([[1], [2]])).shape == (
        2,
        5,
        0,
    )
    # int32 indices and lengths are accepted.
    selection = sparseroute.select_tokens(
        torch.randn(2, 5), 2, lengths=torch.tensor([5, 1], dtype=torch.int32)
    )
    assert selection.counts.tolist() == [2, 1]
    assert torch.equal(
        sparseroute.gather_tokens(x, selection.indices.int()), sparseroute.gather_tokens(x, selection.indices)
    )


def test_bad_input_is_rejected_clearly():
    scores = torch.randn(2, 6)
    x = torch.randn(2, 6, 4)
    with pytest.raises(
        ValueError, match=r"capacity: expected 0 <= capacity <= 6 \(the sequence length\), got 7"
    ):
        sparseroute.select_tokens(scores, 7)
    for fraction in (0.0, 1.5, math.nan, -0.5):
        with pytest.raises(ValueError, match=r"capacity: expected a fraction in \(0, 1\]"):
            sparseroute.select_tokens(scores, fraction)
    with pytest.raises(TypeError, match="capacity: expected an int"):
        sparseroute.select_tokens(scores, "half")
    with pytest.raises(sparseroute.InvalidInputError, match=r"lengths: expected values in \[0, 6\].*got 7"):
        sparseroute.select_tokens(scores, 2, lengths=torch.tensor([7, 1]))
    with pytest.raises(sparseroute.InvalidInputError, match=r"lengths: expected values in \[0, 6\].*got -1"):
        sparseroute.select_tokens(scores, 2, lengths=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=r"lengths: expected shape \[B\] = \[2\]"):
        sparseroute.select_tokens(scores, 2, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(
        sparseroute.InvalidInputError, match=r"scores: expected no NaN.*sequence 1, position 3"
    ):
        bad = scores.clone()
        bad[1, 3] = float("nan")
        sparseroute.select_tokens(bad, 2)
    with pytest.raises(ValueError, match="threshold: expected a float"):
        sparseroute.select_tokens(scores, 2, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"scores: expected a 2-D tensor \[B, S\]"):
        sparseroute.select_tokens(torch.randn(6), 2)
    with pytest.raises(TypeError, match="scores: expected dtype"):
        sparseroute.select_tokens(torch.ones(2, 6, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="scores: expected a CPU tensor"):
        sparseroute.select_tokens(torch.randn(2, 6, device="meta"), 2)

    with pytest.raises(
        sparseroute.InvalidInputError, match=r"indices: expected positions in \[-1, 6\), got 6"
    ):
        sparseroute.gather_tokens(x, torch.tensor([[0, 6], [1, 2]]))
    with pytest.raises(
        sparseroute.InvalidInputError, match=r"distinct positions.*position 2 twice in sequence 1"
    ):
        sparseroute.gather_tokens(x, torch.tensor([[0, 1], [2, 2]]))
    with pytest.raises(ValueError, match=r"indices: expected \[B, C\] with B = 2"):
        sparseroute.gather_tokens(x, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="indices: expected at most S = 6 entries"):
        sparseroute.gather_tokens(x, torch.full((2, 7), -1))
    with pytest.raises(ValueError, match=r"x: expected a 3-D tensor \[B, S, d\]"):
        sparseroute.gather_tokens(torch.randn(6, 4), torch.tensor([[0]]))
    indices = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"y: expected shape \[B, C, d\] = \[2, 2, 4\]"):
        sparseroute.scatter_tokens(x, torch.randn(2, 3, 4), indices)
    with pytest.raises(TypeError, match="y: expected the dtype of x"):
        sparseroute.scatter_tokens(x, torch.randn(2, 2, 4, dtype=torch.float64), indices)
    with pytest.raises(ValueError, match=r"gate: expected shape \[B, S\] = \[2, 6\]"):
        sparseroute.scatter_tokens(x, torch.randn(2, 2, 4), indices, torch.rand(2, 2))
    with pytest.raises(sparseroute.InvalidInputError, match="indices"):
        sparseroute.scatter_tokens(x, torch.randn(2, 2, 4), torch.tensor([[0, -3], [2, 3]]))


class _HandOffCounter:
    """Counts the backward passes in which a scatter handed its gradient for x to its gather."""

    def __init__(self, monkeypatch):
        from sparseroute.ops import tokens

        self.count = 0
        original = tokens._hand_gradient_to_gather

        def counted(*args):
            handed = original(*args)
            self.count += handed
            return handed

        monkeypatch.setattr(tokens, "_hand_gradient_to_gather", counted)


def _mod_layer(x, router, block, gather, scatter, gated=True, capacity=5):
    scores = router(x).squeeze(-1)
    indices = sparseroute.select_tokens(scores.detach(), capacity).indices
    rows = gather(x, indices)
    y = block(rows)
    return scatter(x, y, indices, torch.sigmoid(scores) if gated else None), rows


def _mod_modules(seed=0, width=6):
    torch.manual_seed(seed)
    return torch.nn.Linear(width, 1).double(), torch.nn.Linear(width, width).double()


@pytest.mark.parametrize("gated", [True, False])
def test_gradient_hand_off_gives_the_same_gradients(monkeypatch, gated):
    """The scatter hands its gradient for x to the gather (one full-size gradient instead
    of two summed by autograd); x, the router and the block get the reference gradients."""
    counter = _HandOffCounter(monkeypatch)
    router, block = _mod_modules()
    x = torch.randn(3, 11, 6, dtype=torch.float64, requires_grad=True)
    # Without a gate, the router only selects: it gets no gradient.
    parameters = (x, *(router.parameters() if gated else ()), *block.parameters())

    ours, _ = _mod_layer(x, router, block, sparseroute.gather_tokens, sparseroute.scatter_tokens, gated)
    reference, _ = _mod_layer(x, router, block, gather_tokens_reference, scatter_tokens_reference, gated)
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    expected = torch.autograd.grad(reference, parameters, grad)
    assert counter.count == 0
    for got, want in zip(
        torch.autograd.grad(ours, parameters, grad, retain_graph=True), expected, strict=True
    ):
        torch.testing.assert_close(got, want)
    assert counter.count == 1
    # A second pass over the same graph hands off again and gets the same gradients.
    for got, want in zip(torch.autograd.grad(ours, parameters, grad), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert counter.count == 2


def test_no_hand_off_where_it_would_change_gradients(monkeypatch):
    counter = _HandOffCounter(monkeypatch)
    router, block = _mod_modules(1)
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    indices = sparseroute.select_tokens(torch.randn(2, 9), 4).indices
    gate = torch.rand(2, 9, dtype=torch.float64)

    def both(fn_gather, fn_scatter, case):
        if case == "y without the gather":
            rows = fn_gather(x, indices)
            out = fn_scatter(x, block(torch.ones_like(rows)), indices, gate)
            return out.square().sum() + rows.sum()
        if case == "x changed in place":
            base = x * 1.0
            rows = fn_gather(base, indices)
            # The reference's gather saves its input, so it can only compare out of place.
            base = base.mul_(3.0) if fn_gather is sparseroute.gather_tokens else base * 3.0
            return fn_scatter(base, block(rows), indices, gate).square().sum()
        if case == "two scatters":
            rows = fn_gather(x, indices)
            first = fn_scatter(x, block(rows), indices, gate)
            second = fn_scatter(x, torch.tanh(rows), indices, None)
            return (first * second).sum()
        raise AssertionError(case)

    for case in ("y without the gather", "x changed in place", "two scatters"):
        ours = torch.autograd.grad(both(sparseroute.gather_tokens, sparseroute.scatter_tokens, case), x)[0]
        want = torch.autograd.grad(both(gather_tokens_reference, scatter_tokens_reference, case), x)[0]
        torch.testing.assert_close(ours, want, msg=case)
    # Only the first of the two scatters may hand off; the others must not.
    assert counter.count == 1

    # Gradients of the rows alone: the gather's backward does not run (its output's
    # gradient is only captured), so anything handed to it is never used; nor is it needed,
    # as no gradient for x is asked for.
    out, rows = _mod_layer(x, router, block, sparseroute.gather_tokens, sparseroute.scatter_tokens)
    grad_rows = torch.autograd.grad(out.sum(), rows)[0]
    out_reference, reference_rows = _mod_layer(
        x, router, block, gather_tokens_reference, scatter_tokens_reference
    )
    torch.testing.assert_close(grad_rows, torch.autograd.grad(out_reference.sum(), reference_rows)[0])
