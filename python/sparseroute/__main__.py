"""``python -m sparseroute COMMAND``: command-line entry points.

Commands:
    demo    route a random batch through a small MoE layer with sparseroute and with the
            plain-torch code of Hugging Face's MoE blocks; print time and agreement.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseroute", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compare a routed MoE layer against plain torch")
    demo.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from sparseroute._demo import run_demo

        run_demo(repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
