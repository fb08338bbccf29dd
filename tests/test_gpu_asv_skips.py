"""benches/benchmarks/gpu.py on a machine without CUDA: asv must skip its benchmarks (setup
raises NotImplementedError, with the reason), not fail them. tests/gpu runs them on a GPU."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys

import pytest
import torch

BENCHES = pathlib.Path(__file__).resolve().parent.parent / "benches"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: tests/gpu runs the suite")
def test_without_cuda_every_gpu_benchmark_is_skipped():
    sys.path.insert(0, str(BENCHES))
    try:
        suite = importlib.import_module("benchmarks.gpu")
    finally:
        sys.path.remove(str(BENCHES))
    classes = [v for n, v in vars(suite).items() if inspect.isclass(v) and n.startswith("Gpu")]
    assert len(classes) == 5
    for benchmark_class in classes:
        first = [values[0] for values in benchmark_class.params]
        with pytest.raises(NotImplementedError, match="no CUDA device"):
            benchmark_class().setup(*first)
