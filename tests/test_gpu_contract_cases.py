"""The cases of tests/gpu/test_gpu_contract.py on the CPU kernels: every pipeline runs forward
and backward at each of its edge shapes (T = 0, T = 1, E = 1, k = E, E = 60 and 160, every
token to one expert) and dtypes, twice with the same bits, with finite outputs and finite
gradients of the inputs' shapes; passes gradcheck in float64; and compiles with
fullgraph=True to eager's results. So the CPU path meets the same
edge-case contract, and the cases a GPU session runs are known to be well-formed."""

import importlib.util
import pathlib
import sys

import pytest
import torch

_PATH = pathlib.Path(__file__).resolve().parent / "gpu" / "test_gpu_contract.py"
_spec = importlib.util.spec_from_file_location("gpu_contract", _PATH)
assert _spec is not None and _spec.loader is not None
contract = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = contract  # dataclasses look their module up while it runs
_spec.loader.exec_module(contract)


@pytest.mark.parametrize(("case", "shape", "dtype"), contract.TYPED_SHAPES, ids=contract.TYPED_SHAPE_IDS)
def test_edge_shapes_run_forward_and_backward(case, shape, dtype):
    tensors = contract.inputs(case, shape, dtype, "cpu")
    outputs, grads = contract.forward_backward(case, shape, tensors)
    again = contract.forward_backward(case, shape, contract.inputs(case, shape, dtype, "cpu"))
    contract.assert_same(outputs, again[0], dtype)  # deterministic
    contract.assert_same(grads, again[1], dtype)
    leaves = contract.differentiable(tensors)
    if grads:  # none where no floating output depends on a floating input
        for leaf, grad in zip(leaves, grads, strict=True):
            assert grad is None or (grad.shape == leaf.shape and torch.isfinite(grad).all())
    for output in outputs:
        assert not output.is_floating_point() or torch.isfinite(output).all()


@pytest.mark.parametrize("case", [c for c in contract.CASES if c.gradcheck_shape], ids=lambda c: c.name)
def test_gradcheck_in_float64(case):
    contract.check_gradcheck(case, "cpu")


@pytest.mark.parametrize("case", contract.CASES, ids=contract.CASE_IDS)
def test_compiles_without_graph_breaks(case):
    contract.check_compiles(case, "cpu")


@pytest.mark.parametrize("name", list(contract.opcheck_calls("cpu")))
def test_opcheck_calls_are_well_formed(name):
    op, args = contract.opcheck_calls("cpu")[name]
    torch.library.opcheck(op, args)
