"""``python -m sparseroute COMMAND``: command-line entry points.

Commands:
    demo    run small random Hugging Face MoE models (Mixtral, OLMoE, DeepSeek-V3 shapes)
            with transformers' own experts and patched by sparseroute; print time,
            agreement and expert load, and save a load heatmap.
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from sparseroute._demo import run_demo

        run_demo(repeats=args.repeats, batch=args.batch, seq_len=args.seq_len, heatmap=args.heatmap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
