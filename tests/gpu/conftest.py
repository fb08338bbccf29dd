"""tests/gpu: sparseroute's CUDA kernels on a real GPU, against the CPU kernels and the
pure-torch references. Every test here is skipped, with the reason, where CUDA or CuPy is
absent (make test on a machine without a GPU); scripts/gpu-check.sh runs them on one."""

import importlib.util
import pathlib

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'sparseroute[gpu]')"
    return None


#: Run after every other GPU test: its CUDA graphs capture backward passes too, and a capture
#: that fails can leave the device in an error state for the tests after it.
LAST = "test_gpu_contract.py"


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: pathlib.Path(item.path).name == LAST)  # stable: order kept otherwise
    reason = skip_reason()
    if reason is None:
        return
    for item in items:
        if HERE in pathlib.Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _no_kernel_errors():
    """Every GPU test leaves the error counters clean (tests that provoke errors read them)."""
    import sparseroute

    sparseroute.check_cuda_errors()
    yield
    sparseroute.check_cuda_errors()
