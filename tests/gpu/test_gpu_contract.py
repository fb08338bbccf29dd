"""Every public op with a CUDA kernel, held to one contract on the GPU: the CPU's results
(outputs and gradients) at the edge shapes (T = 0, T = 1, E = 1, k = E, odd E such as 60 and
160, every token to one expert) in float32, bfloat16 and float16; gradcheck in float64 on the
GPU; torch.compile(fullgraph=True) equal to eager; a CUDA graph of the forward and backward
passes, replayed on fresh inputs; and torch's current stream, forward and backward.

Each case is one pipeline of public ops (``run``) over tensors made on the CPU from a fixed
seed (``make``), so the same inputs reach both devices. The op-specific files (test_gpu_*.py)
test each kernel's semantics in depth; this one makes sure no op misses a part of the contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import sparseroute
from sparseroute import placement
from sparseroute.ops._bridge import accumulator_dtype

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ops = torch.ops.sparseroute


@dataclass(frozen=True)
class Case:
    """One pipeline of public ops. ``make(shape, dtype, generator)`` gives its CPU inputs:
    floating inputs are differentiated, others (expert ids, offsets) are not. ``run(shape,
    *inputs)`` returns the outputs, at each of ``shapes``. ``capturable(dtype)``: the
    pipeline is sync-free, so it can be captured in a CUDA graph."""

    name: str
    make: Callable[[tuple, torch.dtype, torch.Generator], tuple[Tensor, ...]]
    run: Callable[..., tuple[Tensor, ...]]
    shapes: tuple[tuple, ...]
    #: The shape of the float64 gradcheck; None: the pipeline has no gradient.
    gradcheck_shape: tuple | None
    #: The shape of the compile, graph and stream tests.
    probe: tuple
    capturable: Callable[[torch.dtype], bool] = lambda dtype: True
    dtypes: tuple[torch.dtype, ...] = tuple(FLOAT_DTYPES)


def logits_of(num_tokens: int, num_experts: int, dtype: torch.dtype, g: torch.Generator, one_expert=False):
    """Random logits; with ``one_expert`` every token prefers expert 0 by far."""
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if one_expert:
        logits[:, 0] += 20.0
    return logits.to(dtype)


# --- the pipelines -------------------------------------------------------------------------------


def make_logits(shape, dtype, g):
    """The logits of a shape (T, E, ..., every token to expert 0): gating, top-p, expert
    choice, Sinkhorn."""
    return (logits_of(shape[0], shape[1], dtype, g, one_expert=shape[-1]),)


def run_gating(shape, logits):
    return sparseroute.topk_gating(logits, shape[2])


def make_dispatch(shape, dtype, g):
    num_tokens, num_experts, k, one_expert = shape
    x = torch.randn(num_tokens, 8, generator=g).to(dtype)
    experts = torch.full((num_tokens, k), -1, dtype=torch.int64)
    for t in range(num_tokens):
        experts[t] = 0 if one_expert else torch.randperm(num_experts, generator=g)[:k]
    if one_expert:
        experts[:, 1:] = -1
    weights = torch.rand(num_tokens, k, generator=g).to(accumulator_dtype(dtype))
    return x, experts, weights


def run_dispatch(shape, x, experts, weights):
    num_tokens, num_experts, k, _ = shape
    x_sorted, plan = sparseroute.permute(x, experts, num_experts, num_rows=num_tokens * k)
    y = sparseroute.unpermute(torch.tanh(x_sorted), plan, weights)
    return x_sorted, y, plan.offsets, plan.row_to_slot, plan.slot_to_row


def make_tokens(shape, dtype, g):
    batch, seq_len, _capacity = shape
    x = torch.randn(batch, seq_len, 8, generator=g).to(dtype)
    scores = torch.randn(batch, seq_len, generator=g).to(dtype)
    return x, scores


def run_tokens(shape, x, scores):
    selection = sparseroute.select_tokens(scores.detach(), shape[2])
    rows = sparseroute.gather_tokens(x, selection.indices)
    gate = torch.sigmoid(scores.to(accumulator_dtype(scores.dtype)))
    out = sparseroute.scatter_tokens(x, torch.tanh(rows), selection.indices, gate)
    return selection.indices, selection.mask, rows, out


def make_losses(shape, dtype, g):
    num_tokens, num_experts, k, one_expert = shape
    logits = logits_of(num_tokens, num_experts, dtype, g, one_expert)
    experts = sparseroute.topk_gating(logits.float(), k)[1]
    return logits, experts


def run_losses(shape, logits, experts):
    return (
        sparseroute.load_balancing_loss(logits, experts),
        sparseroute.load_balancing_loss(logits, experts, scope="sequence", seq_len=1),
        sparseroute.z_loss(logits),
    )


def make_layer_plan(shape, dtype, g):
    return (torch.randn(*shape, 3, generator=g).to(dtype),)


def run_layer_plan(shape, logits):
    return (sparseroute.layer_plan(logits),)


def run_topp(shape, logits):
    return sparseroute.topp_gating(logits, 0.7, max_k=min(4, logits.shape[1]))


def run_expert_choice(shape, logits):
    choice = sparseroute.expert_choice(logits, shape[2])
    return choice.indices, choice.gates, choice.weights


def run_sinkhorn(shape, logits):
    return (sparseroute.sinkhorn(logits, iters=5),)


def make_grouped_mlp(shape, dtype, g):
    num_experts, rows_per_expert = shape
    counts = torch.tensor(rows_per_expert, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    x = torch.randn(int(counts.sum()), 16, generator=g).to(dtype)
    gate_up = (torch.randn(num_experts, 16, 16, generator=g) * 0.25).to(dtype)
    down = (torch.randn(num_experts, 16, 8, generator=g) * 0.25).to(dtype)
    return x, offsets, gate_up, down


def run_grouped_mlp(shape, x, offsets, gate_up, down):
    return (sparseroute.grouped_mlp(x, offsets, gate_up, down),)


def make_replica_map(shape, dtype, g):
    num_tokens, num_experts = shape
    return (torch.randint(-1, num_experts, (num_tokens, 2), generator=g),)


def placement_plan(num_experts: int) -> placement.PlacementPlan:
    """Two layers of uneven loads over 2 * E slots on two GPUs."""
    load = torch.arange(1, 2 * num_experts + 1, dtype=torch.float32).reshape(2, num_experts)
    return placement.plan_placement(load, 2 * num_experts, 1, 2)


def on_device(plan: placement.PlacementPlan, device: str) -> placement.PlacementPlan:
    return plan._replace(
        logical_to_physical=plan.logical_to_physical.to(device), replica_counts=plan.replica_counts.to(device)
    )


#: The plans of the replica_map shapes' expert counts by device, made before anything is
#: traced (planning is host work, not part of the op). With its tables on the device, the op
#: copies nothing from the host: sync-free and capturable.
PLANS = {"cpu": {num_experts: placement_plan(num_experts) for num_experts in (1, 4, 60)}}
if torch.cuda.is_available():
    PLANS["cuda"] = {num_experts: on_device(plan, "cuda") for num_experts, plan in PLANS["cpu"].items()}


def run_replica_map(shape, experts):
    return (placement.replica_map(experts, PLANS[experts.device.type][shape[1]], 1, policy="load"),)


#: Routing shapes (T, E, k, every token to expert 0): no tokens, one token, one expert, k = E,
#: odd E, every token to one expert.
ROUTING_SHAPES = (
    (0, 8, 2, False),
    (1, 8, 2, False),
    (37, 1, 1, False),
    (37, 8, 8, False),
    (37, 60, 4, False),
    (37, 160, 8, False),
    (37, 16, 2, True),
)

# Each case: name, inputs, pipeline, its edge shapes, the shape of its float64 gradcheck (None:
# no gradient), and the probe shape of the compile, graph and stream tests: one whose outputs
# and gradients change with the inputs (at the edge shapes, every token going to one expert,
# or C = S, they barely do).
CASES = [
    Case("topk_gating", make_logits, run_gating, ROUTING_SHAPES, (9, 12, 3, False), (37, 60, 4, False)),
    Case(
        "permute_unpermute", make_dispatch, run_dispatch, ROUTING_SHAPES, (9, 6, 2, False), (37, 60, 4, False)
    ),
    # (B, S, C)
    Case(
        "tokens",
        make_tokens,
        run_tokens,
        ((0, 8, 2), (1, 1, 1), (3, 37, 5), (2, 160, 160)),
        (2, 9, 3),
        (3, 37, 5),
    ),
    # The losses are means over the tokens: no shape without tokens.
    Case("losses", make_losses, run_losses, ROUTING_SHAPES[1:], (9, 12, 3, False), (37, 60, 4, False)),
    # (B, L)
    Case("layer_plan", make_layer_plan, run_layer_plan, ((0, 4), (1, 1), (5, 7)), None, (5, 7)),
    # (T, E, every token to expert 0)
    Case(
        "topp_gating",
        make_logits,
        run_topp,
        ((0, 8, False), (1, 8, False), (37, 1, False), (37, 60, False), (37, 160, False), (37, 16, True)),
        (9, 12, False),
        (37, 60, False),
    ),
    # (T, E, C, every token to expert 0)
    Case(
        "expert_choice",
        make_logits,
        run_expert_choice,
        ((1, 8, 1, False), (37, 1, 37, False), (37, 60, 5, False), (40, 160, 2, False), (37, 16, 4, True)),
        (9, 12, 3, False),
        (37, 60, 5, False),
    ),
    # (T, E, every token to expert 0)
    Case(
        "sinkhorn",
        make_logits,
        run_sinkhorn,
        ((1, 8, False), (37, 1, False), (37, 60, False), (37, 160, False), (37, 16, True)),
        None,
        (37, 60, False),
    ),
    # (E, rows of each expert): torch's grouped GEMM in bfloat16 is sync-free; the per-expert
    # loop of the other dtypes reads the offsets.
    Case(
        "grouped_mlp",
        make_grouped_mlp,
        run_grouped_mlp,
        ((1, (8,)), (4, (0, 0, 0, 0)), (5, (3, 0, 8, 1, 0)), (3, (24, 0, 0))),
        (3, (4, 0, 5)),
        (5, (3, 0, 8, 1, 0)),
        capturable=lambda dtype: dtype == torch.bfloat16,
    ),
    # (T, E)
    Case(
        "replica_map",
        make_replica_map,
        run_replica_map,
        ((0, 4), (1, 4), (37, 1), (37, 60)),
        None,
        (37, 60),
        dtypes=(torch.float32,),
    ),
]
CASE_IDS = [case.name for case in CASES]
SHAPES = [(case, shape) for case in CASES for shape in case.shapes]
SHAPE_IDS = [f"{case.name}-{shape}" for case, shape in SHAPES]
#: (case, shape, dtype) for every dtype a case takes: the edge-shape comparisons.
TYPED_SHAPES = [(case, shape, dtype) for case, shape in SHAPES for dtype in case.dtypes]
TYPED_SHAPE_IDS = [
    f"{case.name}-{shape}-{str(dtype).removeprefix('torch.')}" for case, shape, dtype in TYPED_SHAPES
]
#: (case, dtype) for every dtype in which a case is sync-free: the CUDA-graph replays.
CAPTURABLE = [(case, dtype) for case in CASES for dtype in case.dtypes if case.capturable(dtype)]
CAPTURABLE_IDS = [f"{case.name}-{str(dtype).removeprefix('torch.')}" for case, dtype in CAPTURABLE]


# --- running a case --------------------------------------------------------------------------------


def inputs(case: Case, shape: tuple, dtype: torch.dtype, device: str, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    made = case.make(shape, dtype, g)
    return [t.to(device).requires_grad_(t.is_floating_point()) for t in made]


def differentiable(tensors) -> list[Tensor]:
    return [t for t in tensors if t.requires_grad]


def forward_backward(case: Case, shape: tuple, tensors: list[Tensor], run=None):
    """Outputs, then the gradients of the floating inputs for a fixed function of the floating
    outputs (each output times its position, summed), None for an unused input."""
    outputs = (run or case.run)(shape, *tensors)
    leaves = differentiable(tensors)
    floating = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    if not leaves or not floating:
        return outputs, []
    loss = sum(
        (o.float() * torch.arange(1, o.numel() + 1, device=o.device).reshape(o.shape) / o.numel()).sum()
        for o in floating
    )
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outputs, list(grads)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """GPU against CPU: gating weights, losses and scores agree to a few float32 ulp (the GPU's
    exp), and the outputs kept in the element type to one rounding of it."""
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 5e-2, "atol": 5e-2}


def assert_same(actual, expected, dtype):
    for a, b in zip(actual, expected, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        a = a.detach().cpu()
        b = b.detach().cpu()
        if a.is_floating_point():
            torch.testing.assert_close(a, b, equal_nan=True, **tolerance(dtype))
        else:
            assert torch.equal(a, b)


def check_gradcheck(case: Case, device: str) -> None:
    """gradcheck in float64 of the case's floating outputs at its gradcheck shape."""
    shape = case.gradcheck_shape
    tensors = inputs(case, shape, torch.float64, device, seed=1)
    leaves = differentiable(tensors)

    def floating_outputs(*leaf_values):
        values = iter(leaf_values)
        full = [next(values) if t.requires_grad else t for t in tensors]
        return tuple(o for o in case.run(shape, *full) if o.is_floating_point())

    assert torch.autograd.gradcheck(floating_outputs, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def check_compiles(case: Case, device: str) -> None:
    """torch.compile(fullgraph=True) of the pipeline: the outputs and gradients of eager."""
    shape = case.probe
    torch._dynamo.reset()
    compiled = torch.compile(case.run, fullgraph=True, backend="aot_eager")
    expected = forward_backward(case, shape, inputs(case, shape, torch.float32, device))
    actual = forward_backward(case, shape, inputs(case, shape, torch.float32, device), run=compiled)
    for a, b in zip(actual, expected, strict=True):
        assert_same(a, b, torch.float32)


# --- the contract --------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "shape", "dtype"), TYPED_SHAPES, ids=TYPED_SHAPE_IDS)
def test_edge_shapes_match_the_cpu(case, shape, dtype):
    gpu_outputs, gpu_grads = forward_backward(case, shape, inputs(case, shape, dtype, "cuda"))
    cpu_outputs, cpu_grads = forward_backward(case, shape, inputs(case, shape, dtype, "cpu"))
    assert all(o.device.type == "cuda" for o in gpu_outputs)
    assert_same(gpu_outputs, cpu_outputs, dtype)
    assert_same(gpu_grads, cpu_grads, dtype)
    sparseroute.check_cuda_errors()


@pytest.mark.parametrize("case", [c for c in CASES if c.gradcheck_shape], ids=lambda c: c.name)
def test_gradcheck_in_float64(case):
    check_gradcheck(case, "cuda")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiles_without_graph_breaks(case):
    check_compiles(case, "cuda")


@pytest.mark.parametrize(("case", "dtype"), CAPTURABLE, ids=CAPTURABLE_IDS)
def test_cuda_graph_replays_forward_and_backward(case, dtype):
    sparseroute.warm_up_cuda()
    shape = case.probe
    static = inputs(case, shape, dtype, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as torch recommends before capture
            forward_backward(case, shape, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs, static_grads = forward_backward(case, shape, static)
    for seed in (1, 2):
        fresh = inputs(case, shape, dtype, "cuda", seed=seed)
        with torch.no_grad():
            for held, new in zip(static, fresh, strict=True):
                held.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        expected_outputs, expected_grads = forward_backward(case, shape, fresh)
        assert_same(static_outputs, expected_outputs, dtype)
        assert_same(static_grads, expected_grads, dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_runs_on_the_current_stream(case):
    """Forward and backward on a side stream whose inputs are written only after a long sleep
    kernel: a kernel launched on any other stream would read them too early. Each case in a
    dtype that runs sync-free where it has one: a host synchronisation would wait out the
    sleep, and the kernels after it would find their inputs ready on any stream."""
    shape = case.probe
    dtype = next((d for d in case.dtypes if case.capturable(d)), torch.float32)
    source = inputs(case, shape, dtype, "cuda")
    expected = forward_backward(case, shape, source)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        late = [torch.zeros_like(t).requires_grad_(t.requires_grad) for t in source]
        torch.cuda._sleep(100_000_000)
        with torch.no_grad():
            for held, value in zip(late, source, strict=True):
                held.copy_(value)
        actual = forward_backward(case, shape, late)
    stream.synchronize()
    for a, b in zip(actual, expected, strict=True):
        assert_same(a, b, dtype)


def opcheck_calls(device: str = "cuda") -> dict[str, tuple]:
    """The custom ops that the op-specific GPU files do not opcheck, with CUDA arguments."""
    g = torch.Generator().manual_seed(4)
    plan = PLANS["cpu"][4]
    x = torch.randn(12, 16, generator=g).to(device).requires_grad_()
    weight = torch.randn(3, 8, 16, generator=g).to(device).requires_grad_()
    offsets = torch.tensor([0, 5, 5, 12], device=device)
    h = torch.randn(12, 16, generator=g).to(device).requires_grad_()
    experts = torch.randint(-1, 4, (9, 2), generator=g).to(device)
    replicas = (plan.logical_to_physical[1].to(device), plan.replica_counts[1].to(device))
    grad = torch.randn(12, 8, generator=g).to(device)
    logits = torch.randn(16, 6, generator=g).to(device)
    return {
        "sinkhorn": (ops.sinkhorn, (logits, 3, 1e-4)),
        "sinkhorn_until_converged": (ops.sinkhorn, (logits.bfloat16(), None, 1e-4)),
        "replica_map_load": (
            ops.replica_map,
            (experts, *replicas, plan.num_slots, plan.slots_per_gpu, "load"),
        ),
        "replica_map_round_robin": (
            ops.replica_map,
            (experts, *replicas, plan.num_slots, plan.slots_per_gpu, "round_robin"),
        ),
        "grouped_linear": (ops.grouped_linear, (x, weight, offsets, None, False)),
        "grouped_linear_bf16": (
            ops.grouped_linear,
            (
                x.detach().bfloat16().requires_grad_(),
                weight.detach().bfloat16().requires_grad_(),
                offsets,
                None,
                False,
            ),
        ),
        "grouped_linear_backward": (
            ops.grouped_linear_backward,
            (grad, x.detach(), weight.detach(), offsets, False, True, True, False),
        ),
        "silu_gate": (ops.silu_gate, (h, False)),
        "silu_gate_backward": (ops.silu_gate_backward, (grad, h.detach(), False)),
    }


@pytest.mark.parametrize("name", list(opcheck_calls("cpu")))
def test_opcheck(name):
    op, args = opcheck_calls()[name]
    torch.library.opcheck(op, args)
