"""GPU timings: sparseroute's CUDA kernels against the plain-torch code they replace.

    python benches/gpu_bench.py [--out timings.json] [--repeats 50]

Each case times both sides with CUDA events (median of ``--repeats`` runs after warm-up, in
milliseconds) on the current device, and prints a table; ``--out`` writes the rows as JSON.
The torch baselines are the usual hand-written forms: softmax/sigmoid + topk (+ group mask),
a stable argsort + index_select for permute, and a gather + weighted sum for unpermute.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

import sparseroute


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_topk(logits, k, score="softmax", bias=None, num_groups=None, topk_groups=None):
    scores = torch.softmax(logits.float(), -1) if score == "softmax" else torch.sigmoid(logits.float())
    keys = scores if bias is None else scores + bias
    if num_groups is not None:
        tokens, experts = keys.shape
        grouped = keys.view(tokens, num_groups, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        best = group_scores.topk(topk_groups, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keys = keys.masked_fill(~mask.repeat_interleave(experts // num_groups, 1), float("-inf"))
    experts = keys.topk(k, dim=-1).indices
    weights = scores.gather(1, experts)
    return weights / weights.sum(-1, keepdim=True), experts


def torch_permute(x, experts):
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return x.index_select(0, order // experts.shape[1]), order


def torch_unpermute(y_sorted, order, weights):
    tokens, k = weights.shape
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return (y.view(tokens, k, -1).float() * weights.unsqueeze(-1)).sum(1).to(y_sorted.dtype)


def cases(repeats: int) -> list[dict[str, object]]:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict[str, object]] = []

    def add(name: str, shape: str, ours: Callable[[], object], theirs: Callable[[], object]) -> None:
        ours_ms, theirs_ms = time_ms(ours, repeats), time_ms(theirs, repeats)
        rows.append(
            {
                "case": name,
                "shape": shape,
                "sparseroute_ms": round(ours_ms, 4),
                "torch_ms": round(theirs_ms, 4),
                "speedup": round(theirs_ms / ours_ms, 2),
            }
        )

    for tokens, experts, k in [(4096, 8, 2), (16384, 64, 8), (16384, 256, 8)]:
        logits = torch.randn(tokens, experts, device="cuda", generator=g, dtype=torch.bfloat16)
        add(
            "topk_gating softmax",
            f"T={tokens} E={experts} k={k} bf16",
            lambda logits=logits, k=k: sparseroute.topk_gating(logits, k),
            lambda logits=logits, k=k: torch_topk(logits, k),
        )
    logits = torch.randn(16384, 256, device="cuda", generator=g)
    bias = torch.randn(256, device="cuda", generator=g) * 0.01
    add(
        "topk_gating deepseek-v3 (sigmoid, bias, 8 groups / 4)",
        "T=16384 E=256 k=8 fp32",
        lambda: sparseroute.topk_gating(
            logits, 8, score="sigmoid", expert_bias=bias, num_groups=8, topk_groups=4
        ),
        lambda: torch_topk(logits, 8, "sigmoid", bias, 8, 4),
    )
    for tokens, experts, k, hidden in [(4096, 8, 2, 4096), (16384, 64, 8, 2048)]:
        x = torch.randn(tokens, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        ids = torch.randint(0, experts, (tokens, k), device="cuda", generator=g)
        weights = torch.rand(tokens, k, device="cuda", generator=g)
        shape = f"T={tokens} E={experts} k={k} d={hidden} bf16"
        add(
            "permute (static rows)",
            shape,
            lambda x=x, ids=ids, e=experts: sparseroute.permute(x, ids, e, num_rows=ids.numel()),
            lambda x=x, ids=ids: torch_permute(x, ids),
        )
        x_sorted, plan = sparseroute.permute(x, ids, experts, num_rows=ids.numel())
        _, order = torch_permute(x, ids)
        add(
            "unpermute (weighted)",
            shape,
            lambda x_sorted=x_sorted, plan=plan, w=weights: sparseroute.unpermute(x_sorted, plan, w),
            lambda x_sorted=x_sorted, order=order, w=weights: torch_unpermute(x_sorted, order, w),
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the timings here as JSON")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to time")
        return 1
    sparseroute.warm_up_cuda()
    rows = cases(args.repeats)
    device = torch.cuda.get_device_name()
    print(f"device: {device}")
    for row in rows:
        print(
            f"{row['case']:<58} {row['shape']:<30} sparseroute {row['sparseroute_ms']:>8.4f} ms"
            f"   torch {row['torch_ms']:>8.4f} ms   x{row['speedup']}"
        )
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"device": device, "timings": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
