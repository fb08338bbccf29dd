"""GPU timings: sparseroute's CUDA kernels against the plain-torch code they replace.

    python benches/gpu_bench.py [--out timings.json] [--repeats 50]

Each case times both sides with CUDA events (median of ``--repeats`` runs after warm-up, in
milliseconds) on the current device, and prints a table; ``--out`` writes the rows as JSON.
The torch baselines are the usual hand-written forms: softmax/sigmoid + topk (+ group mask),
a stable argsort + index_select for permute, and a gather + weighted sum for unpermute; for
the token ops topk + sort, gather and a gathered x + gate * y scattered back; for the balance
ops softmax + sum, bincount, logsumexp; argmax for layer_plan.
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
    # Mixture-of-Depths: top-C selection, gather, gated scatter (torch: topk + sort + gather /
    # scatter of x + gate * y).
    for batch, seq_len, hidden in [(8, 4096, 2048), (32, 1024, 1024)]:
        capacity = seq_len // 8
        scores = torch.randn(batch, seq_len, device="cuda", generator=g)
        x = torch.randn(batch, seq_len, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        shape = f"B={batch} S={seq_len} C={capacity} d={hidden} bf16"
        add(
            "select_tokens (top-C)",
            shape,
            lambda scores=scores, c=capacity: sparseroute.select_tokens(scores, c),
            lambda scores=scores, c=capacity: torch_select(scores, c),
        )
        indices = sparseroute.select_tokens(scores, capacity).indices
        y = torch.randn(batch, capacity, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        gate = torch.sigmoid(scores)
        add(
            "gather_tokens",
            shape,
            lambda x=x, indices=indices: sparseroute.gather_tokens(x, indices),
            lambda x=x, indices=indices: x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[2])),
        )
        add(
            "scatter_tokens (gated)",
            shape,
            lambda x=x, y=y, indices=indices, gate=gate: sparseroute.scatter_tokens(x, y, indices, gate=gate),
            lambda x=x, y=y, indices=indices, gate=gate: torch_gated_scatter(x, y, indices, gate),
        )
    # Load balancing: score sums, expert counts, z-loss (torch: softmax + sum, bincount, logsumexp).
    ops = torch.ops.sparseroute
    for tokens, experts, k in [(16384, 64, 8), (65536, 256, 8)]:
        logits = torch.randn(tokens, experts, device="cuda", generator=g, dtype=torch.bfloat16)
        ids = torch.randint(0, experts, (tokens, k), device="cuda", generator=g)
        shape = f"T={tokens} E={experts} k={k} bf16"
        add(
            "score_sums (softmax, batch)",
            shape,
            lambda logits=logits: ops.score_sums(logits, "softmax", logits.shape[0], None),
            lambda logits=logits: torch.softmax(logits.double(), -1).sum(0, keepdim=True),
        )
        add(
            "expert_counts",
            shape,
            lambda ids=ids, e=experts: ops.expert_counts(ids, e, ids.shape[0], None),
            lambda ids=ids, e=experts: torch.bincount(ids.reshape(-1), minlength=e),
        )
        add(
            "z_loss",
            shape,
            lambda logits=logits: sparseroute.z_loss(logits),
            lambda logits=logits: torch.logsumexp(logits.float(), -1).square().mean(),
        )
    plan_logits = torch.randn(4096, 32, 3, device="cuda", generator=g)
    add(
        "layer_plan",
        "B=4096 L=32 fp32",
        lambda: sparseroute.layer_plan(plan_logits),
        lambda: plan_logits.argmax(-1),
    )
    return rows


def torch_select(scores, capacity):
    indices = scores.topk(capacity, dim=-1).indices.sort(dim=-1).values
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)
    return indices, mask


def torch_gated_scatter(x, y, indices, gate):
    index = indices.unsqueeze(-1).expand(-1, -1, x.shape[2])
    rows = x.gather(1, index).float() + gate.gather(1, indices).unsqueeze(-1) * y.float()
    return x.scatter(1, index, rows.to(x.dtype))


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
