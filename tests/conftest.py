"""Shared test configuration.

Hypothesis profiles: "fast" (default, 100 examples per property, the same examples on
every run so that `make test` is reproducible) and "slow" (HYPOTHESIS_PROFILE=slow, 1000
fresh random examples per run, for exploration). The tests import the *installed* sparseroute wheel;
see test_process.py.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fast",
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slow",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture(autouse=True)
def _default_threads():
    """Every test starts with sparseroute following torch's thread count."""
    import sparseroute

    sparseroute.set_num_threads(None)
    yield
    sparseroute.set_num_threads(None)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Names the running emulated kernel test for cuda_emulation's launch records, from which
    test_cuda_memory.py picks the tests it reruns under AddressSanitizer and UBSan."""
    if item.path.name != "test_cuda_emulated.py":
        return (yield)
    import cuda_emulation

    cuda_emulation.current_test = item.nodeid[item.nodeid.index(item.path.name) :]
    try:
        return (yield)
    finally:
        cuda_emulation.current_test = None
