"""Host time per call of one CUDA op, taken apart: where the microseconds of a small op go.

    python benches/gpu_overhead.py [--out overhead.json] [--calls 2000]

For top-k gating (T=16384, E=64, k=8, bf16) it times, in host microseconds per call (many
calls queued back to back, one synchronisation at the end): the public function (which calls
the kernel without torch's dispatcher in plain eager code, see sparseroute.ops._eager), with
and without autograd, the torch custom op through the dispatcher, the CUDA glue function
alone, the launcher context alone, one kernel launch through sparseroute's launcher (packing
plus cuLaunchKernel) and, for comparison, through a CuPy RawKernel, the two output allocations, and
for scale one torch op (softmax) and the kernel itself on the GPU (a CUDA graph replay of the
op). Whatever the public call costs beyond the kernel is host work that a fused or cached
path could remove.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

import sparseroute
from gpu_bench import capture_graph
from sparseroute import _cuda, _cuda_ops


def host_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def graph_us(fn: Callable[[], object], calls: int) -> float:
    return host_us(capture_graph(fn).replay, calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to time")
        return 1
    sparseroute.warm_up_cuda()
    device = torch.device("cuda", torch.cuda.current_device())
    logits = torch.randn(16384, 64, device=device, dtype=torch.bfloat16)
    trained = logits.detach().clone().requires_grad_()
    op_args = (logits, 8, "softmax", True, None, None, None, 2, 1.0)
    module = _cuda.load_module(device.index, "gating.cu", torch.bfloat16)
    errors = _cuda.error_counters(device.index)
    # sr_topk_gating_warp's arguments for T = 0: a launch that does no work.
    empty_args = (_cuda.pointer(logits), 0, 64, 8, 0, 1, 0, 0, 0, 2, 0, 1.0, 0, 0, _cuda.pointer(errors))
    # The same through a CuPy RawKernel (the launch route before sparseroute's own), whose
    # arguments must be numpy scalars of explicit widths.
    cupy = _cuda.cupy_module()
    raw_kernel = cupy.RawModule(path=str(module.path)).get_function("sr_topk_gating_warp")
    widths = {"Q": np.uint64, "q": np.int64, "i": np.int32, "d": np.float64}
    codes = _cuda.kernel_signatures("gating.cu")["sr_topk_gating_warp"]
    raw_args = tuple(widths[code](arg) for code, arg in zip(codes, empty_args, strict=True))
    # CuPy's launch reads only the raw stream's ``ptr``.
    stream = SimpleNamespace(ptr=torch.cuda.current_stream().cuda_stream)
    launch = _cuda.launcher(device)

    def launcher_only() -> None:
        with _cuda.launcher(device):
            pass

    def one_launch() -> None:
        # Outside a ``with`` block, as the glue of a one-launch op calls it: the launch reads
        # the stream and checks the context itself.
        launch("gating.cu", torch.bfloat16, "sr_topk_gating_warp", 1, 128, empty_args)

    def cupy_launch() -> None:
        raw_kernel((1,), (128,), raw_args, stream=stream)

    def allocations() -> None:
        torch.empty(16384, 8, dtype=torch.float32, device=device)
        torch.empty(16384, 8, dtype=torch.int64, device=device)

    calls = args.calls
    rows = {
        "public sparseroute.topk_gating": host_us(lambda: sparseroute.topk_gating(logits, 8), calls),
        "public, logits requiring a gradient": host_us(lambda: sparseroute.topk_gating(trained, 8), calls),
        "torch.ops.sparseroute.topk_gating": host_us(
            lambda: torch.ops.sparseroute.topk_gating(*op_args), calls
        ),
        "_cuda_ops.topk_gating_cuda (glue + launch)": host_us(
            lambda: _cuda_ops.topk_gating_cuda(*op_args), calls
        ),
        "_cuda.launcher context alone": host_us(launcher_only, calls),
        "one launch through the launcher (15 arguments)": host_us(one_launch, calls),
        "one CuPy RawKernel launch (the route before)": host_us(cupy_launch, calls),
        "two torch.empty outputs": host_us(allocations, calls),
        "torch.softmax (one torch op, for scale)": host_us(lambda: torch.softmax(logits, -1), calls),
        "kernel on the GPU (graph replay)": graph_us(
            lambda: torch.ops.sparseroute.topk_gating(*op_args), calls
        ),
    }
    print(f"device: {torch.cuda.get_device_name()}")
    for name, us in rows.items():
        print(f"{name:<48} {us:8.1f} us/call")
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "host_us_per_call": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
