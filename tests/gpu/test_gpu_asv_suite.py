"""benches/benchmarks/gpu.py, the asv suite of the CUDA kernels, run once on the GPU: every
benchmark's setup and timed body, for both implementations, at each class's first
parameters. The GPU machines have no asv; this is what keeps the suite runnable there."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys

import pytest

BENCHES = pathlib.Path(__file__).resolve().parents[2] / "benches"


def gpu_suite():
    sys.path.insert(0, str(BENCHES))
    try:
        return importlib.import_module("benchmarks.gpu")
    finally:
        sys.path.remove(str(BENCHES))


SUITE_CLASSES = ["GpuGating", "GpuGroupLimitedGating", "GpuDispatch", "GpuVariants", "GpuMoEBlock"]


@pytest.mark.parametrize("name", SUITE_CLASSES)
def test_every_benchmark_runs_for_each_implementation(name):
    benchmark_class = getattr(gpu_suite(), name)
    *leading, impls = benchmark_class.params
    timed = [m for m, _ in inspect.getmembers(benchmark_class, inspect.isfunction) if m.startswith("time_")]
    assert timed
    for impl in impls:
        args = (*(values[0] for values in leading), impl)
        benchmark = benchmark_class()
        benchmark.setup(*args)
        for method in timed:
            getattr(benchmark, method)(*args)


def test_the_suite_lists_every_benchmark_class():
    suite = gpu_suite()
    assert sorted(n for n, v in vars(suite).items() if inspect.isclass(v) and n.startswith("Gpu")) == sorted(
        SUITE_CLASSES
    )
