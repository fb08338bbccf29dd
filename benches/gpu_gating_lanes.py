"""GPU time of top-k gating's lane-team kernel for each team width: the data behind
``_cuda_ops.GATING_TARGET_THREADS`` and ``GATING_MIN_EXPERTS_PER_LANE``.

    python benches/gpu_gating_lanes.py [--out lanes.json] [--repeats 30]

For each shape (T in 4096, 16384, 65536; E in 8, 64, 256, 512; k in 2, 8; bfloat16, and
float32 at T=16384) it prints the GPU time of one ``sparseroute.topk_gating`` call (a CUDA
graph of ten calls, replayed, per call; microseconds) with 1, 2, 4, ... 32 lanes per token
(as many as leave each lane 8 experts), the width the defaults choose, and torch's softmax +
topk + renormalise for scale.
"""

from __future__ import annotations

import argparse
import json

import torch

import sparseroute
from gpu_bench import graph_ms, torch_topk
from sparseroute import _cuda_ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to time")
        return 1
    sparseroute.warm_up_cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    default_lanes = _cuda_ops.gating_lanes
    shapes = [(t, torch.bfloat16) for t in (4096, 16384, 65536)] + [(16384, torch.float32)]
    rows = []
    for tokens, dtype in shapes:
        for experts in (8, 64, 256, 512):
            for k in (2, 8):
                logits = torch.randn(tokens, experts, device="cuda", generator=g, dtype=dtype)
                row: dict[str, object] = {"shape": f"T={tokens} E={experts} k={k} {str(dtype)[6:]}"}
                lanes = 1
                while lanes <= 32 and experts >= lanes * 8:
                    _cuda_ops.gating_lanes = lambda t, e, lanes=lanes: lanes  # type: ignore[assignment]
                    ms = graph_ms(lambda logits=logits, k=k: sparseroute.topk_gating(logits, k), args.repeats)
                    row[f"lanes={lanes}"] = None if ms is None else round(ms * 1000, 1)
                    lanes *= 2
                _cuda_ops.gating_lanes = default_lanes  # type: ignore[assignment]
                row["default"] = _cuda_ops.gating_lanes(tokens, experts)
                torch_ms = graph_ms(lambda logits=logits, k=k: torch_topk(logits, k), args.repeats)
                row["torch"] = None if torch_ms is None else round(torch_ms * 1000, 1)
                print("  ".join(f"{key} {value}" for key, value in row.items()), flush=True)
                rows.append(row)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "us": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
