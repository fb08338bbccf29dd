"""GPU timings: sparseroute's CUDA kernels against the plain-torch code they replace.

    python benches/gpu_bench.py [--out timings.json] [--repeats 50]

Each case times both sides with CUDA events (median of ``--repeats`` runs after warm-up, in
milliseconds) on the current device, and prints a table; ``--out`` writes the rows as JSON.
The torch baselines are the usual hand-written forms: softmax/sigmoid + topk (+ bias, group
mask), a stable argsort + index_select for permute (also against permute with rows in blocks
of 128), and a gather + weighted sum for unpermute; for the token ops topk + sort, gather and a
gathered x + gate * y scattered back; for the balance ops softmax + sum, bincount, logsumexp;
argmax for layer_plan; Megatron-style forms of capacity dispatch, top-p, expert choice (topk
per expert) and Sinkhorn; and one transformers MoE block (Mixtral, OLMoE shapes) with its own
experts against sparseroute.patch. For sync-free ops it also times a CUDA graph replay of ten
calls of the op (``sparseroute_graph_ms``, per call): the GPU time alone, without the host
work of each call, and the same of the baseline (``torch_graph_ms``, ``graph_speedup``: GPU
against GPU); for those it also times both sides queued (many calls back to back, as in a
model, ``*_queued_ms``), and for permute and unpermute a torch copy of as many bytes
(``copy_graph_ms``, ``of_copy_bandwidth``). Where vLLM is installed, top-k gating is also
timed against its fused top-k softmax kernel (rows whose ``baseline`` is "vllm fused_topk";
``torch_ms`` is then that kernel's time); ``fused_topk_baseline`` in the JSON says whether it
was found. Unless ``--no-kernels``, each row of the op cases then also gets the GPU time of
every kernel of both sides (``kernels``, ``torch_kernels``: microseconds per call by kernel
name, from torch.profiler; within ``--kernel-seconds`` after the timings, which are written
first), so that a slow case shows which of its kernels to work on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

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


def queued_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of ``calls`` calls queued back to back (one pair of events around
    them all): the host prepares the next call while the GPU runs the last, as in a model."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def capture_graph(fn: Callable[[], object], calls: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn``, captured after two warm-up calls on a side
    stream (as torch recommends before a capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


#: Calls of the op in the graph that graph_ms replays: one replay's launch latency (several
#: microseconds, during which the GPU idles) is shared by this many calls.
GRAPH_CALLS = 10


def graph_ms(fn: Callable[[], object], repeats: int, label: str = "") -> float | None:
    """The GPU time of one call of ``fn``: time_ms of a replay of a CUDA graph of GRAPH_CALLS
    calls, divided by GRAPH_CALLS; None, with the reason printed (after ``label``), when the
    capture fails."""
    try:
        graph = capture_graph(fn, GRAPH_CALLS)
    except Exception as err:  # report and go on: the eager timings stand without it
        print(f"graph capture failed{label}: {type(err).__name__}: {err}")
        return None
    return round(time_ms(graph.replay, repeats) / GRAPH_CALLS, 4)


#: Calls of each side that kernel_times profiles.
PROFILED_CALLS = 10
#: Characters of a kernel name kept (torch's are long C++ template names).
KERNEL_NAME_CHARS = 72


def time_by_name(events: Iterable[Any], device_type: Any, calls: int) -> dict[str, float]:
    """The profiler ``events`` of ``device_type`` summed by name (names cut to
    KERNEL_NAME_CHARS), in microseconds per call of ``calls``, largest first."""
    totals: dict[str, float] = {}
    for event in events:
        if event.device_type == device_type:
            name = event.name[:KERNEL_NAME_CHARS]
            totals[name] = totals.get(name, 0.0) + event.time_range.elapsed_us()
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return {name: round(us / calls, 2) for name, us in ranked}


def kernel_times(fn: Callable[[], object], calls: int = PROFILED_CALLS) -> dict[str, float] | str:
    """The GPU time of each kernel (and copy or fill) that a call of ``fn`` runs, in
    microseconds per call, largest first (torch.profiler over ``calls`` calls); the error,
    as text, where the profiler fails."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        return time_by_name(prof.events(), DeviceType.CUDA, calls)
    except Exception as err:  # report and go on: the timings stand without it
        return f"{type(err).__name__}: {err}"


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


def find_fused_topk() -> tuple[str, Callable[[torch.Tensor, int], object] | None]:
    """A serving engine's fused top-k softmax (softmax, top-k and renormalisation in one
    kernel), when one is installed: vLLM's ``fused_topk``. Returns its name and a function of
    (logits, k), or the reason it is missing and None."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_topk  # type: ignore[import-not-found]
    except Exception as err:  # not installed, or installed without its CUDA extension
        return f"vLLM fused_topk not available ({type(err).__name__}: {err})", None

    def run(logits: torch.Tensor, k: int) -> object:
        # Its first argument only gives the token count and the device.
        return fused_topk(logits, logits, k, True)

    return "vllm fused_topk", run


FUSED_TOPK = find_fused_topk()


def fused_topk_input(fused_topk: Callable[[torch.Tensor, int], object], logits, k: int) -> torch.Tensor:
    """``logits`` as the fused kernel takes them: as they are, or in float32 (converted once,
    outside the timing) for versions whose kernel reads float32 only."""
    try:
        fused_topk(logits, k)
        return logits
    except Exception:
        return logits.float()


def torch_permute(x, experts):
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return x.index_select(0, order // experts.shape[1]), order


def torch_unpermute(y_sorted, order, weights):
    tokens, k = weights.shape
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return (y.view(tokens, k, -1).float() * weights.unsqueeze(-1)).sum(1).to(y_sorted.dtype)


#: A row and the two calls it timed (sparseroute's, the baseline's), for kernel_times.
Profiled = tuple[dict[str, object], Callable[[], object], Callable[[], object]]


def cases(repeats: int) -> tuple[list[dict[str, object]], list[Profiled]]:
    """The timed rows, and the rows of add() with the calls they timed."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict[str, object]] = []
    profiled: list[Profiled] = []

    def add(
        name: str,
        shape: str,
        ours: Callable[[], object],
        theirs: Callable[[], object],
        capturable: bool = False,
        moved_bytes: int = 0,
        baseline: str = "torch",
    ) -> None:
        ours_ms, theirs_ms = time_ms(ours, repeats), time_ms(theirs, repeats)
        row = {
            "case": name,
            "shape": shape,
            "baseline": baseline,
            "sparseroute_ms": round(ours_ms, 4),
            # The baseline's time (torch's code unless "baseline" names another).
            "torch_ms": round(theirs_ms, 4),
            "speedup": round(theirs_ms / ours_ms, 2),
            # The GPU time alone (a CUDA graph replay of the op, per call) for sync-free ops: the
            # difference to sparseroute_ms is host work per call.
            "sparseroute_graph_ms": (
                graph_ms(ours, repeats, f" ({name}, sparseroute)") if capturable else None
            ),
        }
        if capturable:
            # The baseline's GPU time alone too, where it can be captured (torch's bincount, for
            # one, reads its result's size back): GPU against GPU.
            theirs_graph = graph_ms(theirs, repeats, f" ({name}, {baseline})")
            row["torch_graph_ms"] = theirs_graph
            if theirs_graph and row["sparseroute_graph_ms"]:
                row["graph_speedup"] = round(theirs_graph / row["sparseroute_graph_ms"], 2)
            # Small ops run among many others: time them queued too.
            ours_queued, theirs_queued = queued_ms(ours, repeats), queued_ms(theirs, repeats)
            row["sparseroute_queued_ms"] = round(ours_queued, 4)
            row["torch_queued_ms"] = round(theirs_queued, 4)
            row["queued_speedup"] = round(theirs_queued / ours_queued, 2)
        if moved_bytes and row["sparseroute_graph_ms"]:
            # The device's copy bandwidth in this run: a torch copy that reads and writes
            # as many bytes as the op does, timed the same way (GPU time alone).
            source = torch.empty(moved_bytes // 2, dtype=torch.uint8, device="cuda")
            target = torch.empty_like(source)
            copy_ms = graph_ms(lambda: target.copy_(source), repeats)
            if copy_ms:
                row["copy_graph_ms"] = copy_ms
                row["of_copy_bandwidth"] = round(copy_ms / row["sparseroute_graph_ms"], 3)
        rows.append(row)
        profiled.append((row, ours, theirs))

    fused_name, fused_topk = FUSED_TOPK
    for tokens, experts, k in [(4096, 8, 2), (16384, 64, 8), (16384, 256, 8)]:
        logits = torch.randn(tokens, experts, device="cuda", generator=g, dtype=torch.bfloat16)
        baselines: list[tuple[str, str, Callable[[], object]]] = [
            ("topk_gating softmax", "torch", lambda logits=logits, k=k: torch_topk(logits, k))
        ]
        if fused_topk is not None:
            fused_logits = fused_topk_input(fused_topk, logits, k)
            baselines.append(
                (
                    "topk_gating softmax vs a serving engine's fused kernel",
                    fused_name,
                    lambda logits=fused_logits, k=k: fused_topk(logits, k),
                )
            )
        for case, baseline, theirs in baselines:
            add(
                case,
                f"T={tokens} E={experts} k={k} bf16",
                lambda logits=logits, k=k: sparseroute.topk_gating(logits, k),
                theirs,
                capturable=True,
                baseline=baseline,
            )
    # Keyed routes, in fp32 as the models' routers compute them: DeepSeek-V3's (sigmoid, a
    # selection bias, 8 groups of which 4 compete) and a bias alone at an expert count no
    # power of two (GLM-4.5's). Defaults bind the tensors: the kernel breakdown calls these
    # lambdas after the loop has moved on.
    for case, experts, groups in [
        ("topk_gating deepseek-v3 (sigmoid, bias, 8 groups / 4)", 256, (8, 4)),
        ("topk_gating sigmoid, bias", 160, (None, None)),
    ]:
        logits = torch.randn(16384, experts, device="cuda", generator=g)
        bias = torch.randn(experts, device="cuda", generator=g) * 0.01
        add(
            case,
            f"T=16384 E={experts} k=8 fp32",
            lambda logits=logits, bias=bias, groups=groups: sparseroute.topk_gating(
                logits, 8, score="sigmoid", expert_bias=bias, num_groups=groups[0], topk_groups=groups[1]
            ),
            lambda logits=logits, bias=bias, groups=groups: torch_topk(logits, 8, "sigmoid", bias, *groups),
            capturable=True,
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
            capturable=True,
            # Reads the T * k gathered rows (and the ids), writes as many.
            moved_bytes=2 * ids.numel() * hidden * x.element_size(),
        )
        if experts == 64:
            # The layout of block-sparse grouped GEMMs: each expert's rows in whole blocks of
            # 128 (torch: the plain stable-sort permute, which has no blocks).
            bound = sparseroute.max_permuted_rows(ids.numel(), experts, 128)
            add(
                "permute (blocks of 128 rows, static rows)",
                shape,
                lambda x=x, ids=ids, e=experts, n=bound: sparseroute.permute(
                    x, ids, e, num_rows=n, block_size=128
                ),
                lambda x=x, ids=ids: torch_permute(x, ids),
                capturable=True,
                moved_bytes=2 * ids.numel() * hidden * x.element_size(),
            )
        x_sorted, plan = sparseroute.permute(x, ids, experts, num_rows=ids.numel())
        _, order = torch_permute(x, ids)
        add(
            "unpermute (weighted)",
            shape,
            lambda x_sorted=x_sorted, plan=plan, w=weights: sparseroute.unpermute(x_sorted, plan, w),
            lambda x_sorted=x_sorted, order=order, w=weights: torch_unpermute(x_sorted, order, w),
            capturable=True,
            # Reads the T * k rows, writes T.
            moved_bytes=(ids.numel() + tokens) * hidden * x.element_size(),
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
            capturable=True,
        )
        indices = sparseroute.select_tokens(scores, capacity).indices
        y = torch.randn(batch, capacity, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        gate = torch.sigmoid(scores)
        add(
            "gather_tokens",
            shape,
            lambda x=x, indices=indices: sparseroute.gather_tokens(x, indices),
            lambda x=x, indices=indices: x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[2])),
            capturable=True,
        )
        add(
            "scatter_tokens (gated)",
            shape,
            lambda x=x, y=y, indices=indices, gate=gate: sparseroute.scatter_tokens(x, y, indices, gate=gate),
            lambda x=x, y=y, indices=indices, gate=gate: torch_gated_scatter(x, y, indices, gate),
            capturable=True,
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
            capturable=True,
        )
        add(
            "expert_counts",
            shape,
            lambda ids=ids, e=experts: ops.expert_counts(ids, e, ids.shape[0], None),
            lambda ids=ids, e=experts: torch.bincount(ids.reshape(-1), minlength=e),
            capturable=True,
        )
        add(
            "z_loss",
            shape,
            lambda logits=logits: sparseroute.z_loss(logits),
            lambda logits=logits: torch.logsumexp(logits.float(), -1).square().mean(),
            capturable=True,
        )
    # Routing variants at the shape of the CPU targets (T=16384, E=64, k=8).
    logits = torch.randn(16384, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    weights, ids = sparseroute.topk_gating(logits, 8)
    x = torch.randn(16384, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
    capacity = sparseroute.expert_capacity(16384, 64, 8, 1.0)
    shape = "T=16384 E=64 k=8 d=2048 bf16"
    add(
        "permute capacity (probs, padded)",
        shape,
        lambda: sparseroute.permute(
            x, ids, 64, capacity=capacity, weights=weights, drop_policy="probs", pad_to_capacity=True
        ),
        lambda: torch_capacity_permute(x, ids, weights, 64, capacity),
        capturable=True,
    )
    add(
        "topp_gating (p=0.9, max_k=8)",
        "T=16384 E=64 bf16",
        lambda: sparseroute.topp_gating(logits, 0.9, max_k=8),
        lambda: torch_topp(logits, 0.9, 8),
        capturable=True,
    )
    add(
        "expert_choice (C=2048)",
        "T=16384 E=64 bf16",
        lambda: sparseroute.expert_choice(logits, 2048),
        lambda: torch_expert_choice(logits, 2048),
        capturable=True,
    )
    float_logits = logits.float()
    add(
        "sinkhorn (tol=1e-4)",
        "T=16384 E=64 fp32",
        lambda: sparseroute.sinkhorn(float_logits),
        lambda: torch_sinkhorn(float_logits, 1e-4),
    )
    rows.extend(moe_block_rows(repeats))
    plan_logits = torch.randn(4096, 32, 3, device="cuda", generator=g)
    add(
        "layer_plan",
        "B=4096 L=32 fp32",
        lambda: sparseroute.layer_plan(plan_logits),
        lambda: plan_logits.argmax(-1),
        capturable=True,
    )
    return rows, profiled


def moe_block_rows(repeats: int) -> list[dict[str, object]]:
    """One transformers MoE block (Mixtral and OLMoE shapes, bf16, T = 2048), forward +
    backward: transformers' "eager" and "grouped_mm" experts against the block after
    sparseroute.patch. No rows without transformers."""
    try:
        from benchmarks.moe_block import SHAPES, build_block
    except ImportError as err:
        print(f"MoE blocks skipped: {err}")
        return []
    rows: list[dict[str, object]] = []
    for shape in ("mixtral", "olmoe"):
        spec = SHAPES[shape]
        x = torch.randn(1, 2048, spec["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        times = {}
        for impl in ("eager", "grouped_mm", "sparseroute"):
            try:
                block = build_block(shape, torch.bfloat16, impl).cuda()
            except Exception as err:  # an experts implementation this transformers lacks
                print(f"{shape} {impl} skipped: {type(err).__name__}: {err}")
                continue

            def step(block=block, x=x) -> None:
                out = block(x)
                (out[0] if isinstance(out, tuple) else out).float().sum().backward()

            times[impl] = time_ms(step, repeats)
        if "sparseroute" not in times:
            continue
        for baseline in ("eager", "grouped_mm"):
            if baseline in times:
                rows.append(
                    {
                        "case": f"MoE block fwd+bwd vs transformers {baseline}",
                        "shape": f"{shape} E={spec['experts']} k={spec['k']} T=2048 bf16",
                        "baseline": f"transformers-{baseline}",
                        "sparseroute_ms": round(times["sparseroute"], 4),
                        "torch_ms": round(times[baseline], 4),
                        "speedup": round(times[baseline] / times["sparseroute"], 2),
                        "sparseroute_graph_ms": None,
                    }
                )
    return rows


def torch_capacity_permute(x, ids, weights, num_experts, capacity):
    """Megatron-style capacity dispatch with drop_policy="probs", padded: each expert's
    top-`capacity` routing probabilities (topk over the dense [E, T] map), rows gathered into
    an [E * C, d] buffer, dropped rows zeroed."""
    routed = torch.zeros(x.shape[0], num_experts, device=x.device).scatter_(1, ids, weights)
    mask = torch.zeros_like(routed, dtype=torch.bool).scatter_(1, ids, True)
    scores = routed.masked_fill(~mask, -1.0).t()
    top = scores.topk(capacity, dim=1)
    keep = (top.values >= 0).reshape(-1, 1)
    return x.index_select(0, top.indices.reshape(-1)) * keep


def torch_topp(logits, p, max_k):
    probs = torch.softmax(logits.float(), -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    sorted_probs, order = sorted_probs[:, :max_k], order[:, :max_k]
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < p
    return sorted_probs * keep, order.masked_fill(~keep, -1)


def torch_expert_choice(logits, capacity):
    probs = torch.softmax(logits.float(), -1).t()
    indices = probs.topk(capacity, dim=1).indices.sort(dim=1).values
    return probs.gather(1, indices), indices


def torch_sinkhorn(logits, tol):
    """Megatron-Core's loop: the convergence test reads the error back every iteration."""
    cost = torch.exp(logits)
    d0 = torch.ones(cost.shape[0], device=cost.device)
    d1 = torch.ones(cost.shape[1], device=cost.device)
    error, d1_old = 1e9, d1
    while error > tol:
        d0 = (1 / d0.shape[0]) / (torch.sum(d1 * cost, 1) + 1e-8)
        d1 = (1 / d1.shape[0]) / (torch.sum(d0.unsqueeze(1) * cost, 0) + 1e-8)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
    return d1 * cost * d0.unsqueeze(1)


def torch_select(scores, capacity):
    indices = scores.topk(capacity, dim=-1).indices.sort(dim=-1).values
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)
    return indices, mask


def torch_gated_scatter(x, y, indices, gate):
    index = indices.unsqueeze(-1).expand(-1, -1, x.shape[2])
    rows = x.gather(1, index).float() + gate.gather(1, indices).unsqueeze(-1) * y.float()
    return x.scatter(1, index, rows.to(x.dtype))


def format_row(row: dict[str, object]) -> str:
    """One line of the printed table."""
    graph = row["sparseroute_graph_ms"]
    alone = ""
    if graph is not None:
        alone = f"   (GPU time alone {graph:.4f} ms"
        if "graph_speedup" in row:  # both sides' GPU times were taken
            alone += f", {row['baseline']} {row['torch_graph_ms']:.4f} ms: x{row['graph_speedup']}"
        alone += ")"
    return (
        f"{row['case']:<58} {row['shape']:<30} sparseroute {row['sparseroute_ms']:>8.4f} ms"
        f"   {row['baseline']} {row['torch_ms']:>8.4f} ms   x{row['speedup']}"
        + alone
        + (f"   queued x{row['queued_speedup']}" if "queued_speedup" in row else "")
        + (f"   {row['of_copy_bandwidth']:.0%} of copy bandwidth" if "of_copy_bandwidth" in row else "")
    )


def format_kernels(row: dict[str, object]) -> str:
    """The kernel breakdown of one row: both sides' kernels, largest first."""

    def side(times: object) -> str:
        if not isinstance(times, dict):
            return f"(no breakdown: {times})"
        return ", ".join(f"{name} {us}" for name, us in times.items()) or "(no kernels)"

    return (
        f"{row['case']} [{row['shape']}]\n    sparseroute: {side(row.get('kernels'))}\n"
        f"    {row['baseline']}: {side(row.get('torch_kernels'))}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the timings here as JSON")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-kernel GPU times")
    parser.add_argument(
        "--kernel-seconds", type=float, default=90.0, help="seconds for the per-kernel GPU times"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to time")
        return 1
    sparseroute.warm_up_cuda()
    rows, profiled = cases(args.repeats)
    device = torch.cuda.get_device_name()
    print(f"device: {device}")
    print(f"fused top-k baseline: {FUSED_TOPK[0]}")
    for row in rows:
        print(format_row(row))
    record = {"device": device, "fused_topk_baseline": FUSED_TOPK[0], "timings": rows}
    write(args.out, record)
    if not args.no_kernels:
        # After the timings are written: a profiler slower than expected costs only the
        # breakdowns it had no time for.
        deadline = time.monotonic() + args.kernel_seconds
        print("\nGPU time per call by kernel (us; torch.profiler):")
        for row, ours, theirs in profiled:
            if time.monotonic() < deadline:
                row["kernels"], row["torch_kernels"] = kernel_times(ours), kernel_times(theirs)
            else:
                row["kernels"] = row["torch_kernels"] = f"not profiled: over {args.kernel_seconds} s"
            print(format_kernels(row))
        write(args.out, record)
    return 0


def write(path: str | None, record: dict[str, object]) -> None:
    if path:
        with open(path, "w") as out:
            json.dump(record, out, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
