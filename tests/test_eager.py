"""The direct eager route (sparseroute.ops._eager) against the torch dispatcher route.

In plain eager code the public functions run each op's kernel (and autograd formula) without
the dispatcher; anywhere torch must see the op they go through ``torch.ops.sparseroute``.
Both routes must give the same bits, forward and backward, and the dispatcher must be taken
whenever a torch subsystem is watching.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparseroute
from sparseroute.ops import _eager


def _route_cases():
    """name -> function of a seed giving (inputs needing a gradient, outputs)."""

    def gating(seed):
        logits = torch.randn(37, 60, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        return [logits], sparseroute.topk_gating(logits, 6)

    def deepseek(seed):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(37, 64, generator=g).requires_grad_()
        bias = torch.randn(64, generator=g) * 0.1
        out = sparseroute.topk_gating(
            logits, 8, score="sigmoid", expert_bias=bias, num_groups=8, topk_groups=4, scale=2.5
        )
        return [logits], out

    def topp(seed):
        logits = torch.randn(37, 16, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        return [logits], sparseroute.topp_gating(logits, 0.7, max_k=5, normalize=True)

    def expert_choice(seed):
        logits = torch.randn(40, 12, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        choice = sparseroute.expert_choice(logits, 7)
        return [logits], tuple(choice)

    def moe_round_trip(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(33, 24, generator=g).requires_grad_()
        logits = torch.randn(33, 10, generator=g).requires_grad_()
        weights, experts = sparseroute.topk_gating(logits, 3)
        x_sorted, plan = sparseroute.permute(x, experts, 10)
        y = sparseroute.unpermute(x_sorted * 2.0, plan, weights)
        return [x, logits], (y, x_sorted, plan.offsets, plan.tokens_per_expert)

    def capacity(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(33, 24, generator=g).requires_grad_()
        logits = torch.randn(33, 8, generator=g).requires_grad_()
        weights, experts = sparseroute.topk_gating(logits, 2)
        x_sorted, plan = sparseroute.permute(
            x, experts, 8, capacity=5, weights=weights, drop_policy="probs", pad_to_capacity=True
        )
        return [x, logits], (sparseroute.unpermute(x_sorted, plan, weights), plan.dropped)

    def experts_mlp(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(30, 16, generator=g).requires_grad_()
        gate_up = (torch.randn(4, 24, 16, generator=g) * 0.1).requires_grad_()
        down = (torch.randn(4, 16, 12, generator=g) * 0.1).requires_grad_()
        offsets = torch.tensor([0, 5, 5, 20, 30])
        return [x, gate_up, down], (sparseroute.grouped_mlp(x, offsets, gate_up, down),)

    def tokens(seed):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(3, 20, generator=g).requires_grad_()
        x = torch.randn(3, 20, 8, generator=g).requires_grad_()
        selection = sparseroute.select_tokens(scores.detach(), 6)
        rows = sparseroute.gather_tokens(x, selection.indices)
        out = sparseroute.scatter_tokens(x, rows * 3.0, selection.indices, gate=torch.sigmoid(scores))
        return [scores, x], (out, selection.indices)

    def losses(seed):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(48, 16, generator=g).requires_grad_()
        _, experts = sparseroute.topk_gating(logits.detach(), 4)
        lb = sparseroute.load_balancing_loss(logits, experts, scope="sequence", seq_len=12)
        return [logits], (lb, sparseroute.z_loss(logits))

    def no_grad_ops(seed):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(48, 16, generator=g)
        _, experts = sparseroute.topk_gating(logits, 4)
        stats = sparseroute.routing_stats(experts, 16)
        return [], (sparseroute.sinkhorn(logits, iters=5), stats.tokens_per_expert)

    return {
        f.__name__: f
        for f in (
            gating,
            deepseek,
            topp,
            expert_choice,
            moe_round_trip,
            capacity,
            experts_mlp,
            tokens,
            losses,
            no_grad_ops,
        )
    }


CASES = _route_cases()


def _run(case, seed):
    inputs, outputs = CASES[case](seed)
    tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
    differentiable = [o for o in tensors if o.requires_grad]
    grads = []
    if differentiable:
        loss = sum((o.double() * (i + 1.5)).sum() for i, o in enumerate(differentiable))
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return tensors, [o.requires_grad for o in tensors], grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_route_matches_dispatcher(case, monkeypatch):
    direct = _run(case, seed=3)
    monkeypatch.setattr(_eager, "_DIRECT", False)
    dispatched = _run(case, seed=3)
    for ours, theirs in zip(direct[0], dispatched[0], strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert torch.equal(ours, theirs)
    assert direct[1] == dispatched[1]  # the same outputs carry gradients
    for ours, theirs in zip(direct[2], dispatched[2], strict=True):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert torch.equal(ours, theirs)


def _refusing_dispatcher(monkeypatch):
    """Makes every op's dispatcher entry raise, so a call that reaches it is seen."""

    def refuse(*args):
        raise AssertionError("went through the dispatcher")

    for entry in _eager._OPS.values():
        monkeypatch.setattr(entry, "dispatcher", refuse)


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    _refusing_dispatcher(monkeypatch)
    for case in sorted(CASES):
        _run(case, seed=1)  # forward and backward, with and without autograd


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_op():
    logits = torch.randn(8, 6)
    with _Recorder() as recorder:
        sparseroute.topk_gating(logits, 2)
    assert "sparseroute.topk_gating.default" in recorder.ops


def test_torch_function_modes_take_the_dispatcher(monkeypatch):
    _refusing_dispatcher(monkeypatch)
    with pytest.raises(AssertionError, match="dispatcher"), torch.device("cpu"):
        sparseroute.topk_gating(torch.randn(8, 6), 2)


def test_profiler_sees_the_op():
    logits = torch.randn(8, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sparseroute.topk_gating(logits, 2)
    assert any(event.name == "sparseroute::topk_gating" for event in prof.events())


def test_tensor_subclasses_take_the_dispatcher(monkeypatch):
    class Tagged(torch.Tensor):
        pass

    _refusing_dispatcher(monkeypatch)
    with pytest.raises(AssertionError, match="dispatcher"):
        sparseroute.topk_gating(torch.randn(8, 6).as_subclass(Tagged), 2)
    # In an optional tensor argument too.
    with pytest.raises(AssertionError, match="dispatcher"):
        sparseroute.topk_gating(torch.randn(8, 6), 2, expert_bias=torch.zeros(6).as_subclass(Tagged))


def test_each_call_looks_at_the_schema_tensor_arguments():
    """The direct route checks the arguments that the op's schema types Tensor or
    Optional[Tensor], and only those: every one of them, for every op."""
    assert _eager._OPS
    for name, entry in _eager._OPS.items():
        schema = getattr(torch.ops.sparseroute, name).default._schema
        tensors = [i for i, a in enumerate(schema.arguments) if "Tensor" in str(a.type)]
        assert entry.tensor_positions == tuple(tensors), name
        assert tensors, name


def test_gradients_flow_only_where_they_should():
    logits = torch.randn(8, 6, requires_grad=True)
    weights, experts = sparseroute.topk_gating(logits, 2)
    assert weights.grad_fn is not None and not experts.requires_grad
    with torch.no_grad():
        weights, _ = sparseroute.topk_gating(logits, 2)
    assert weights.grad_fn is None and not weights.requires_grad
    with torch.inference_mode():
        weights, _ = sparseroute.topk_gating(logits, 2)
    assert weights.is_inference()


def test_environment_switch_sends_everything_through_the_dispatcher():
    code = "from sparseroute.ops import _eager; print(_eager._DIRECT)"
    for value, expected in (("1", "False"), ("0", "True")):
        env = {**os.environ, "SPARSEROUTE_DISPATCHER": value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected
