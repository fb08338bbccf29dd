"""``python -m sparseroute COMMAND``: command-line entry points.

Commands:
    demo    run small random Hugging Face MoE models (Mixtral, OLMoE, DeepSeek-V3 shapes)
            with transformers' own experts and patched by sparseroute; print time,
            agreement and expert load, and save a load heatmap.
    cache-sim
            replay a routing trace file through expert caches (policies x capacities);
            print hit ratio, bytes moved and stalls, and optionally plot hit ratio.
    info    print the version, CPU threads, CUDA, CuPy and NVRTC versions, the device and
            which ops have CUDA kernels.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseroute", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="Hugging Face MoE models before and after sparseroute.patch")
    demo.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    demo.add_argument("--batch", type=int, default=4, help="sequences per batch")
    demo.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    demo.add_argument("--heatmap", default=None, help="PNG path (default sparseroute-demo-load.png)")
    commands.add_parser("info", help="versions, CUDA device and the ops with CUDA kernels")
    sim = commands.add_parser("cache-sim", help="replay a routing trace through expert caches")
    sim.add_argument("trace", help="routing trace file (JSON lines, see docs/cache.md)")
    sim.add_argument("--capacity", type=int, nargs="+", required=True, help="cache sizes to try")
    sim.add_argument(
        "--policy",
        action="append",
        default=None,
        help="lru, lfu, lifo, belady or priority; repeat for several (default: all)",
    )
    sim.add_argument("--window", type=int, default=None, help="belady lookahead in steps (default: all)")
    sim.add_argument("--capacity-unit", default="experts", help="experts (default) or bytes")
    sim.add_argument("--expert-bytes", type=int, default=None, help="size of every expert in bytes")
    sim.add_argument("--decay", type=float, default=None, help="priority: weight kept per step")
    sim.add_argument("--plot", default=None, help="save hit ratio vs capacity to this PNG")
    sim.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: for long runs on a terminal)",
    )
    args = parser.parse_args(argv)
    if args.command == "info":
        from sparseroute._info import format_info

        print(format_info())
    elif args.command == "demo":
        from sparseroute._demo import run_demo

        run_demo(repeats=args.repeats, batch=args.batch, seq_len=args.seq_len, heatmap=args.heatmap)
    elif args.command == "cache-sim":
        from sparseroute.cache import run_cache_sim

        return run_cache_sim(
            args.trace,
            capacities=args.capacity,
            policies=args.policy,
            window=args.window,
            capacity_unit=args.capacity_unit,
            expert_bytes=args.expert_bytes,
            decay=args.decay,
            plot=args.plot,
            progress=args.progress,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
