"""GPU time of top-k gating's lane-team kernel for each team width: the data behind
``_cuda_ops.GATING_EXPERTS_PER_LANE``.

    python benches/gpu_gating_lanes.py [--out lanes.json] [--repeats 50]

For each shape (T=16384; E in 8, 64, 256, 512; k in 2, 8; bfloat16 and float32) it times a
CUDA graph replay of ``sparseroute.topk_gating`` (the GPU time alone, in microseconds) with
the team width that each setting of GATING_EXPERTS_PER_LANE gives, from 32 lanes per token
(the most) down to one, and torch's softmax + topk + renormalise for scale.
"""

from __future__ import annotations

import argparse
import json

import torch

import sparseroute
from gpu_bench import graph_ms, torch_topk
from sparseroute import _cuda_ops

EXPERTS_PER_LANE = (1, 2, 4, 8, 16, 32, 64, 1 << 30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to time")
        return 1
    sparseroute.warm_up_cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    default = _cuda_ops.GATING_EXPERTS_PER_LANE
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for experts in (8, 64, 256, 512):
            for k in (2, 8):
                logits = torch.randn(16384, experts, device="cuda", generator=g, dtype=dtype)
                row: dict[str, object] = {"shape": f"T=16384 E={experts} k={k} {str(dtype)[6:]}"}
                seen = set()
                for per_lane in EXPERTS_PER_LANE:
                    _cuda_ops.GATING_EXPERTS_PER_LANE = per_lane
                    lanes = _cuda_ops.gating_lanes(experts)
                    if lanes in seen:
                        continue
                    seen.add(lanes)
                    ms = graph_ms(lambda logits=logits, k=k: sparseroute.topk_gating(logits, k), args.repeats)
                    row[f"lanes={lanes}"] = None if ms is None else round(ms * 1000, 1)
                _cuda_ops.GATING_EXPERTS_PER_LANE = default
                row["default lanes"] = _cuda_ops.gating_lanes(experts)
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
