"""grouped_linear and grouped_mlp: per-expert compute over expert-major slices."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparseroute

from reference import grouped_linear_reference

ops = torch.ops.sparseroute

TOLERANCE = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def make_offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


def grouped_case(counts, k_in, n_out, *, transposed, bias, dtype=torch.float32, padding=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts) + padding
    num_experts = len(counts)
    x = torch.randn(rows, k_in, generator=g, dtype=torch.float64).to(dtype)
    if padding:
        x[sum(counts) :] = 0
    shape = (num_experts, k_in, n_out) if transposed else (num_experts, n_out, k_in)
    weight = (torch.randn(shape, generator=g, dtype=torch.float64) / k_in**0.5).to(dtype)
    b = torch.randn(num_experts, n_out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, make_offsets(counts), weight, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_linear_matches_reference(dtype, transposed, bias):
    x, offsets, weight, b = grouped_case(
        [3, 0, 5, 1], 8, 6, transposed=transposed, bias=bias, dtype=dtype, padding=2
    )
    actual = sparseroute.grouped_linear(x, offsets, weight, b, transposed=transposed)
    expected = grouped_linear_reference(
        x.double(), offsets, weight.double(), None if b is None else b.double(), transposed
    )
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, **TOLERANCE[dtype])
    assert torch.equal(actual[-2:], torch.zeros_like(actual[-2:]))


@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=7),
    padding=st.integers(0, 3),
    transposed=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_linear_property(counts, padding, transposed, bias, seed):
    x, offsets, weight, b = grouped_case(
        counts, 5, 3, transposed=transposed, bias=bias, padding=padding, seed=seed
    )
    x.requires_grad_()
    weight.requires_grad_()
    params = [x, weight] + ([b.requires_grad_()] if b is not None else [])
    actual = sparseroute.grouped_linear(x, offsets, weight, b, transposed=transposed)
    expected = grouped_linear_reference(x, offsets, weight, b, transposed)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    grad = torch.randn_like(actual)
    actual_grads = torch.autograd.grad(actual, params, grad)
    expected_grads = torch.autograd.grad(expected, params, grad)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_linear_gradcheck(transposed):
    x, offsets, weight, b = grouped_case(
        [2, 0, 3], 4, 3, transposed=transposed, bias=True, dtype=torch.float64, padding=1
    )
    inputs = (x.requires_grad_(), weight.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda x, w, b: sparseroute.grouped_linear(x, offsets, w, b, transposed=transposed), inputs
    )


def mlp_reference(x, offsets, gate_up, down, activation, gated, interleaved, transposed, biases):
    gate_up_bias, down_bias = biases
    h = grouped_linear_reference(x, offsets, gate_up, gate_up_bias, transposed)
    if gated:
        gate, up = (h[:, 0::2], h[:, 1::2]) if interleaved else h.chunk(2, dim=-1)
        h = activation(gate) * up
    else:
        h = activation(h)
    return grouped_linear_reference(h, offsets, down, down_bias, transposed)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("gate_layout", ["concatenated", "interleaved"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_mlp_gradcheck_against_reference(gated, gate_layout, transposed, with_bias):
    g = torch.Generator().manual_seed(3)
    counts, hidden, ffn = [2, 0, 3, 1], 4, 3
    offsets = make_offsets(counts)
    num_experts, rows = len(counts), sum(counts) + 1
    up_out = 2 * ffn if gated else ffn

    def weight(n_out, k_in):
        shape = (num_experts, k_in, n_out) if transposed else (num_experts, n_out, k_in)
        return torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)

    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    gate_up, down = weight(up_out, hidden), weight(hidden, ffn)
    biases = (
        (
            torch.randn(num_experts, up_out, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(num_experts, hidden, generator=g, dtype=torch.float64, requires_grad=True),
        )
        if with_bias
        else (None, None)
    )

    def run(x, gate_up, down, *bias):
        return sparseroute.grouped_mlp(
            x,
            offsets,
            gate_up,
            down,
            activation="gelu",
            gated=gated,
            gate_layout=gate_layout,
            transposed=transposed,
            bias=tuple(bias) if bias else None,
        )

    inputs = (x, gate_up, down, *(b for b in biases if b is not None))
    expected = mlp_reference(
        x, offsets, gate_up, down, F.gelu, gated, gate_layout == "interleaved", transposed, biases
    )
    torch.testing.assert_close(run(*inputs), expected, **TOLERANCE[torch.float64])
    assert torch.autograd.gradcheck(run, inputs)


def test_grouped_mlp_accepts_a_callable_activation():
    x, offsets, gate_up, _ = grouped_case([2, 3], 4, 6, transposed=False, bias=False)
    _, _, down, _ = grouped_case([2, 3], 3, 4, transposed=False, bias=False)
    actual = sparseroute.grouped_mlp(x, offsets, gate_up, down, activation=torch.tanh)
    expected = mlp_reference(x, offsets, gate_up, down, torch.tanh, True, False, False, (None, None))
    torch.testing.assert_close(actual, expected)


def test_permute_grouped_mlp_unpermute_matches_dense_per_token_loop(generator):
    """The whole dropless MoE: every token's output is the weighted sum of its experts' MLPs."""
    num_tokens, hidden, ffn, num_experts, k = 12, 8, 5, 4, 2
    x = torch.randn(num_tokens, hidden, generator=generator)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    gate_up = torch.randn(num_experts, 2 * ffn, hidden, generator=generator)
    down = torch.randn(num_experts, hidden, ffn, generator=generator)
    weights, experts = sparseroute.topk_gating(logits, k)
    x_sorted, plan = sparseroute.permute(x, experts, num_experts)
    y = sparseroute.unpermute(sparseroute.grouped_mlp(x_sorted, plan.offsets, gate_up, down), plan, weights)
    for t in range(num_tokens):
        expected = torch.zeros(hidden)
        for j in range(k):
            e = int(experts[t, j])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            expected += weights[t, j] * (down[e] @ (F.silu(gate) * up))
        torch.testing.assert_close(y[t], expected, rtol=1e-5, atol=1e-5)


def test_empty_and_single_row_inputs():
    for counts in ([0, 0, 0], [1, 0, 0]):
        x, offsets, weight, b = grouped_case(counts, 4, 3, transposed=False, bias=True)
        x.requires_grad_()
        weight.requires_grad_()
        y = sparseroute.grouped_linear(x, offsets, weight, b)
        assert y.shape == (sum(counts), 3)
        y.sum().backward()
        assert weight.grad is not None and torch.equal(weight.grad[1:], torch.zeros_like(weight.grad[1:]))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_grouped_linear(transposed, bias):
    x, offsets, weight, b = grouped_case([2, 0, 3], 4, 3, transposed=transposed, bias=bias, padding=1)
    x.requires_grad_()
    weight.requires_grad_()
    if b is not None:
        b.requires_grad_()
    torch.library.opcheck(ops.grouped_linear, (x, weight, offsets, b, transposed))
    grad = torch.randn(x.shape[0], 3)
    torch.library.opcheck(
        ops.grouped_linear_backward,
        (grad, x.detach(), weight.detach(), offsets, transposed, True, True, bias),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_moe_with_grouped_mlp_compiles_without_graph_breaks(backend):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 4, generator=g, requires_grad=True)
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    gate_up = torch.randn(4, 12, 8, generator=g, requires_grad=True)
    down = torch.randn(4, 8, 6, generator=g, requires_grad=True)

    def moe(logits, x, gate_up, down):
        weights, experts = sparseroute.topk_gating(logits, 2)
        x_sorted, plan = sparseroute.permute(x, experts, 4, num_rows=32)
        return sparseroute.unpermute(
            sparseroute.grouped_mlp(x_sorted, plan.offsets, gate_up, down), plan, weights
        )

    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, backend=backend)
    args = (logits, x, gate_up, down)
    expected = moe(*args)
    expected_grads = torch.autograd.grad(expected.square().sum(), args)
    actual = compiled(*args)
    actual_grads = torch.autograd.grad(actual.square().sum(), args)
    torch.testing.assert_close(actual, expected)
    for a, b in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_inputs_name_the_argument():
    x, offsets, weight, b = grouped_case([2, 3], 4, 3, transposed=False, bias=True)
    with pytest.raises(ValueError, match=r"weight: expected .* K = 5"):
        sparseroute.grouped_linear(x[:, :0].new_zeros(5, 5), offsets, weight)
    with pytest.raises(TypeError, match="weight: expected dtype float64"):
        sparseroute.grouped_linear(x.double(), offsets, weight)
    with pytest.raises(ValueError, match="offsets: expected E \\+ 1 = 3"):
        sparseroute.grouped_linear(x, offsets[:2], weight)
    with pytest.raises(ValueError, match="offsets: expected non-decreasing"):
        sparseroute.grouped_linear(x, torch.tensor([0, 4, 3]), weight)
    with pytest.raises(ValueError, match="offsets: expected non-decreasing"):
        sparseroute.grouped_linear(x, torch.tensor([0, 2, 9]), weight)
    with pytest.raises(ValueError, match="bias: expected shape \\[E, N\\]"):
        sparseroute.grouped_linear(x, offsets, weight, b[:, :2])
    with pytest.raises(ValueError, match="activation: expected one of"):
        sparseroute.grouped_mlp(x, offsets, weight, weight, activation="swishy")
    with pytest.raises(ValueError, match="gate_layout"):
        sparseroute.grouped_mlp(x, offsets, weight, weight, gate_layout="stacked")
    with pytest.raises(ValueError, match="gate_up_proj: expected an even output size"):
        sparseroute.grouped_mlp(x, offsets, weight, weight)


@pytest.mark.parametrize("interleaved", [False, True])
def test_silu_gate_matches_autograd_through_chunk(interleaved):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(7, 10, generator=g, dtype=torch.float64, requires_grad=True)
    gate, up = (h[:, 0::2], h[:, 1::2]) if interleaved else h.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    actual = ops.silu_gate(h, interleaved)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn(7, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad(actual, h, grad)[0], torch.autograd.grad(expected, h, grad)[0]
    )
    assert torch.autograd.gradcheck(lambda h: ops.silu_gate(h, interleaved), (h,))
    torch.library.opcheck(ops.silu_gate, (h, interleaved))
    torch.library.opcheck(ops.silu_gate_backward, (grad, h.detach(), interleaved))


def _grouped_mm_runs_on_cpu() -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a = torch.randn(16, 8, dtype=torch.bfloat16)
        F.grouped_mm(
            a, torch.randn(2, 8, 8, dtype=torch.bfloat16), offs=torch.tensor([8, 16], dtype=torch.int32)
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch's grouped_mm has no CPU kernel here")
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_path_matches_the_loop(monkeypatch, transposed, bias):
    """The CUDA path for bfloat16 (torch's grouped GEMM, sync-free), run on the CPU: the same
    outputs and gradients as the per-expert loop, with empty experts and padding rows."""
    from sparseroute.ops import experts as experts_module

    g = torch.Generator().manual_seed(5)
    counts = [5, 0, 9, 3, 0, 7]  # empty experts in the middle and at the end
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    rows, k_in, n_out = int(offsets[-1]) + 4, 16, 24  # four padding rows
    x = torch.randn(rows, k_in, generator=g).bfloat16()
    shape = (6, k_in, n_out) if transposed else (6, n_out, k_in)
    weight = (torch.randn(shape, generator=g) * 0.3).bfloat16()
    b = (torch.randn(6, n_out, generator=g) * 0.3).bfloat16() if bias else None
    probe = torch.randn(rows, n_out, generator=g).bfloat16()

    def run():
        inputs = [t.detach().clone().requires_grad_() for t in (x, weight)] + (
            [b.detach().clone().requires_grad_()] if bias else []
        )
        y = sparseroute.grouped_linear(
            inputs[0], offsets, inputs[1], inputs[2] if bias else None, transposed=transposed
        )
        (y.float() * probe.float()).sum().backward()
        return y.detach(), [t.grad for t in inputs]

    loop_y, loop_grads = run()
    monkeypatch.setattr(experts_module, "uses_grouped_mm", lambda x, weight: x.dtype == torch.bfloat16)
    mm_y, mm_grads = run()
    assert torch.equal(mm_y[int(offsets[-1]) :], torch.zeros_like(mm_y[int(offsets[-1]) :]))
    torch.testing.assert_close(mm_y.float(), loop_y.float(), rtol=2e-2, atol=2e-2)
    for mm, loop in zip(mm_grads, loop_grads, strict=True):
        torch.testing.assert_close(mm.float(), loop.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch's grouped_mm has no CPU kernel here")
def test_grouped_mm_layout_follows_its_offsets(monkeypatch):
    """The grouped GEMM path keeps each offsets tensor's group layout while that tensor lives:
    an in-place change of the offsets must rebuild it, and freeing them must drop it."""
    import gc

    from sparseroute.ops import experts as experts_module

    monkeypatch.setattr(experts_module, "uses_grouped_mm", lambda x, weight: x.dtype == torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 16, generator=g).bfloat16()
    weight = (torch.randn(3, 8, 16, generator=g) * 0.3).bfloat16()
    offsets = torch.tensor([0, 4, 4, 12])
    before = len(experts_module._LAYOUTS)
    first = sparseroute.grouped_linear(x, offsets, weight)
    assert len(experts_module._LAYOUTS) == before + 1
    offsets.copy_(torch.tensor([0, 2, 9, 10]))  # two padding rows now, and no empty expert
    second = sparseroute.grouped_linear(x, offsets, weight)
    expected = torch.cat([x[:2] @ weight[0].T, x[2:9] @ weight[1].T, x[9:10] @ weight[2].T])
    torch.testing.assert_close(second[:10].float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(second[10:], torch.zeros_like(second[10:]))
    assert not torch.equal(first, second)
    del offsets
    gc.collect()
    assert len(experts_module._LAYOUTS) == before


def test_grouped_mm_takes_fewer_rows_than_its_int32_group_ends_hold(monkeypatch):
    """torch's grouped GEMM takes the group ends as int32: from 2^31 rows on, grouped_linear
    runs the loop. (Fake CUDA tensors: the check reads shapes only.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparseroute.ops import experts as experts_module

    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with FakeTensorMode():
        weight = torch.empty(4, 16, 8, dtype=torch.bfloat16, device="cuda")
        most = torch.empty(2**31 - 8, 8, dtype=torch.bfloat16, device="cuda")
        too_many = torch.empty(2**31, 8, dtype=torch.bfloat16, device="cuda")
        assert experts_module.uses_grouped_mm(most, weight)
        assert not experts_module.uses_grouped_mm(too_many, weight)
