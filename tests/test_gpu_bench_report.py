"""benches/gpu_bench.py's report, checked on the CPU: a GPU session should not spend its
device time on a formatting error."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

BENCHES = pathlib.Path(__file__).resolve().parent.parent / "benches"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCHES / "gpu_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_bench"]


def row(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "case": "topk_gating softmax",
        "shape": "T=16384 E=64 k=8 bf16",
        "baseline": "torch",
        "sparseroute_ms": 0.0492,
        "torch_ms": 0.1236,
        "speedup": 2.51,
        "sparseroute_graph_ms": None,
    }
    base.update(fields)
    return base


def test_every_kind_of_row_formats(gpu_bench):
    both_graphs = row(
        sparseroute_graph_ms=0.0086,
        torch_graph_ms=0.0412,
        graph_speedup=4.79,
        queued_speedup=3.07,
        of_copy_bandwidth=0.8,
    )
    line = gpu_bench.format_row(both_graphs)
    assert "GPU time alone 0.0086 ms, torch 0.0412 ms: x4.79" in line
    assert "queued x3.07" in line and "80% of copy bandwidth" in line
    # The baseline's capture failed: only ours.
    line = gpu_bench.format_row(row(sparseroute_graph_ms=0.0086, torch_graph_ms=None))
    assert line.endswith("(GPU time alone 0.0086 ms)")
    line = gpu_bench.format_row(row(baseline="vllm fused_topk", torch_ms=0.02, speedup=0.41))
    assert "vllm fused_topk   0.0200 ms   x0.41" in line
    block = row(case="MoE block fwd+bwd vs transformers eager", baseline="transformers-eager")
    line = gpu_bench.format_row(block)
    assert "transformers-eager" in line and "GPU time alone" not in line


def test_a_missing_fused_kernel_is_named_not_raised(gpu_bench):
    name, run = gpu_bench.find_fused_topk()
    if run is None:
        assert name.startswith("vLLM fused_topk not available")
    else:
        assert name == "vllm fused_topk"


def test_kernel_breakdown_sums_by_name_and_formats(gpu_bench):
    # The profiler's events of one device type, summed by name per call: CPU operators here,
    # kernels on a GPU (the same events, of DeviceType.CUDA).
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            torch.mm(x, x)
    times = gpu_bench.time_by_name(prof.events(), DeviceType.CPU, 4)
    assert "aten::mm" in times and times["aten::mm"] > 0
    assert list(times.values()) == sorted(times.values(), reverse=True)
    assert gpu_bench.time_by_name(prof.events(), DeviceType.CUDA, 4) == {}

    text = gpu_bench.format_kernels(
        row(kernels={"sr_topk_gating_team4": 8.1}, torch_kernels="RuntimeError: no profiler")
    )
    assert "sparseroute: sr_topk_gating_team4 8.1" in text
    assert "torch: (no breakdown: RuntimeError: no profiler)" in text
    assert "(no kernels)" in gpu_bench.format_kernels(row(kernels={}, torch_kernels={}))


def test_kernel_times_reports_a_failure_as_text(gpu_bench):
    if torch.cuda.is_available():
        pytest.skip("checks the report without a GPU")
    assert isinstance(gpu_bench.kernel_times(lambda: None), str)
