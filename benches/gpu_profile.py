"""Where the time of one MoE block goes on a GPU: torch.profiler tables of a forward + backward.

    python benches/gpu_profile.py [--shape mixtral|olmoe] [--impl sparseroute|grouped_mm|eager]
                                  [--steps 5] [--rows 20] [--python]

Builds the block of benches/benchmarks/moe_block.py (bf16, T = 2048), warms it up, times a
step, profiles ``--steps`` forward + backward steps with torch.profiler, and prints the
``--rows`` most expensive operators by GPU time and by host time. torch.profiler sends
sparseroute's calls through torch's dispatcher (see sparseroute.ops._eager), so for the host
time of the calls as they run unprofiled, ``--python`` profiles the Python functions with
cProfile instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.moe_block import SHAPES, build_block


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    parser.add_argument("--impl", default="sparseroute", choices=["sparseroute", "grouped_mm", "eager"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--python", action="store_true", help="cProfile the Python functions")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to profile")
        return 1
    spec = SHAPES[args.shape]
    block = build_block(args.shape, torch.bfloat16, args.impl).cuda()
    x = torch.randn(1, 2048, spec["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step() -> None:
        out = block(x)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    host_ms = (time.perf_counter() - start) / args.steps * 1e3
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    if args.python:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        print(f"{args.shape} {args.impl}: {wall_ms:.3f} ms per step; Python over {args.steps} steps")
        for key in ("tottime", "cumulative"):
            pstats.Stats(profiler).sort_stats(key).print_stats(args.rows)
        return 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(
        f"{args.shape} {args.impl} on {torch.cuda.get_device_name()}: {wall_ms:.3f} ms per step "
        f"(host returns after {host_ms:.3f} ms)"
    )
    table = prof.key_averages()
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        print(table.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
