"""GPU time alone of sparseroute's CUDA ops, one line per case, for comparing kernel sources;
or, with ``--host``, the host time of each call, for comparing the Python code around them.

    python benches/gpu_ab.py LABEL [--host] [CASE_GROUP ...]

``scripts/gpu-ab.sh run`` calls this once per installed set of sources (the wheel's, and
those of other commits) and in turn, so that old and new code is timed side by side in one
run on one machine. Each case is a CUDA graph of ten calls replayed (``gpu_bench.graph_ms``:
the GPU time of one call, no host work), or with ``--host`` the median over five batches of
the time until HOST_CALLS calls have returned, per call (the GPU is synchronised between
batches, never inside one, so this is the Python and driver work of a call, whatever its
kernels take); each line reads ``LABEL  case  shape  us``.
Case groups: gating, keyed, dispatch, tokens, balance, variants (default: all).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

import sparseroute

#: A case: (name, shape, the call timed).
Case = tuple[str, str, Callable[[], object]]


def case_groups(device: str, shrink: int = 1) -> dict[str, Callable[[], list[Case]]]:
    """The case groups, each a function building its inputs on ``device`` (tensors are made
    only for the groups asked for); ``shrink`` divides the token and sequence counts (the
    tests run every case on the CPU at 1/64)."""
    g = torch.Generator(device=device).manual_seed(0)

    def n(count: int) -> int:
        return max(count // shrink, 1)

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=g, dtype=dtype)

    def gating() -> list[Case]:
        cases: list[Case] = []
        for tokens, experts, k in [(4096, 8, 2), (16384, 64, 8), (16384, 256, 8), (16384, 64, 20)]:
            logits = randn(n(tokens), experts)
            cases.append(
                (
                    "topk_gating softmax",
                    f"T={tokens} E={experts} k={k} bf16",
                    lambda logits=logits, k=k: sparseroute.topk_gating(logits, k),
                )
            )
        return cases

    def keyed() -> list[Case]:
        cases: list[Case] = []
        for name, experts, dtype, options in [
            (
                "deepseek-v3 (sigmoid, bias, 8 groups / 4)",
                256,
                torch.float32,
                {"num_groups": 8, "topk_groups": 4},
            ),
            ("kimi-k2 (sigmoid, bias)", 384, torch.float32, {}),
            ("glm-4.5 (sigmoid, bias)", 160, torch.float32, {}),
            ("softmax, bias", 64, torch.bfloat16, {}),
        ]:
            logits = randn(n(16384), experts, dtype=dtype)
            bias = randn(experts, dtype=torch.float32) * 0.01
            score = "sigmoid" if "sigmoid" in name else "softmax"
            cases.append(
                (
                    f"topk_gating {name}",
                    f"T=16384 E={experts} k=8 {str(dtype).removeprefix('torch.')}",
                    lambda logits=logits, bias=bias, score=score, options=options: sparseroute.topk_gating(
                        logits, 8, score=score, expert_bias=bias, **options
                    ),
                )
            )
        return cases

    def dispatch() -> list[Case]:
        cases: list[Case] = []
        for tokens, experts, k, hidden in [(4096, 8, 2, 4096), (16384, 64, 8, 2048)]:
            x = randn(n(tokens), hidden)
            ids = torch.randint(0, experts, (n(tokens), k), device=device, generator=g)
            weights = torch.rand(n(tokens), k, device=device, generator=g)
            shape = f"T={tokens} E={experts} k={k} d={hidden} bf16"
            x_sorted, plan = sparseroute.permute(x, ids, experts, num_rows=ids.numel())
            cases += [
                (
                    "permute (static rows)",
                    shape,
                    lambda x=x, ids=ids, e=experts: sparseroute.permute(x, ids, e, num_rows=ids.numel()),
                ),
                (
                    "unpermute (weighted)",
                    shape,
                    lambda x_sorted=x_sorted, plan=plan, w=weights: sparseroute.unpermute(x_sorted, plan, w),
                ),
            ]
        return cases

    def tokens() -> list[Case]:
        seq_len = n(4096)
        capacity = max(seq_len // 8, 1)
        scores = randn(8, seq_len, dtype=torch.float32)
        x = randn(8, seq_len, 2048)
        indices = sparseroute.select_tokens(scores, capacity).indices
        y = randn(8, capacity, 2048)
        gate = torch.sigmoid(scores)
        shape = "B=8 S=4096 C=512 d=2048 bf16"
        return [
            ("select_tokens (top-C)", shape, lambda: sparseroute.select_tokens(scores, capacity)),
            ("gather_tokens", shape, lambda: sparseroute.gather_tokens(x, indices)),
            ("scatter_tokens (gated)", shape, lambda: sparseroute.scatter_tokens(x, y, indices, gate=gate)),
        ]

    def balance() -> list[Case]:
        tokens = n(16384)
        logits = randn(tokens, 64)
        ids = torch.randint(0, 64, (tokens, 8), device=device, generator=g)
        ops = torch.ops.sparseroute
        shape = "T=16384 E=64 k=8 bf16"
        return [
            ("score_sums (softmax, batch)", shape, lambda: ops.score_sums(logits, "softmax", tokens, None)),
            ("expert_counts", shape, lambda: ops.expert_counts(ids, 64, tokens, None)),
            ("z_loss", shape, lambda: sparseroute.z_loss(logits)),
        ]

    def variants() -> list[Case]:
        tokens = n(16384)
        logits = randn(tokens, 64)
        weights, ids = sparseroute.topk_gating(logits, 8)
        x = randn(tokens, 2048)
        capacity = sparseroute.expert_capacity(tokens, 64, 8, 1.0)
        chosen = min(2048, tokens)
        return [
            (
                "permute capacity (probs, padded)",
                "T=16384 E=64 k=8 d=2048 bf16",
                lambda: sparseroute.permute(
                    x, ids, 64, capacity=capacity, weights=weights, drop_policy="probs", pad_to_capacity=True
                ),
            ),
            (
                "topp_gating (p=0.9, max_k=8)",
                "T=16384 E=64 bf16",
                lambda: sparseroute.topp_gating(logits, 0.9, max_k=8),
            ),
            (
                "expert_choice (C=2048)",
                "T=16384 E=64 bf16",
                lambda: sparseroute.expert_choice(logits, chosen),
            ),
        ]

    return {
        "gating": gating,
        "keyed": keyed,
        "dispatch": dispatch,
        "tokens": tokens,
        "balance": balance,
        "variants": variants,
    }


#: The case groups' names, in the order they run.
GROUPS = ("gating", "keyed", "dispatch", "tokens", "balance", "variants")


#: Calls per timed batch of ``--host`` (each queues one op's launches: a few hundred calls
#: stay within the driver's launch queue, so the host never waits for the GPU).
HOST_CALLS = 200


def host_ms(call: Callable[[], object], calls: int = HOST_CALLS, batches: int = 5) -> float:
    """The host time of one call of ``call`` in milliseconds: the median over ``batches`` of
    the time until ``calls`` calls have returned, per call, with the GPU synchronised before
    and after each batch."""
    for _ in range(3):
        call()
    per_call = []
    for _ in range(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        per_call.append((time.perf_counter() - start) / calls * 1000)
    torch.cuda.synchronize()
    return statistics.median(per_call)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    label, options = argv[0], argv[1:]
    host = "--host" in options
    wanted = [option for option in options if option != "--host"]
    unknown = sorted(set(wanted) - set(GROUPS))
    if unknown:
        print(f"unknown case groups {unknown}; expected some of {list(GROUPS)}")
        return 2
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to time")
        return 1
    from gpu_bench import graph_ms

    sparseroute.warm_up_cuda()
    run_groups(
        label,
        case_groups("cuda"),
        wanted or list(GROUPS),
        (lambda call, name: host_ms(call)) if host else (lambda call, name: graph_ms(call, 30, name)),
    )
    return 0


def run_groups(
    label: str,
    groups: dict[str, Callable[[], list[Case]]],
    wanted: list[str],
    time_ms: Callable[[Callable[[], object], str], float | None],
) -> None:
    """Prints one line per case of the ``wanted`` groups: ``time_ms(call, " (name)")``, in
    milliseconds, or why there is none. A group whose inputs cannot be built (its setup calls
    a kernel whose parameters differ in this set of sources) says so, and the others run."""
    for group in wanted:
        try:
            cases = groups[group]()
        except Exception as err:
            print(f"{label:<10} {group}: inputs not built: {type(err).__name__}: {err}", flush=True)
            continue
        for name, shape, call in cases:
            ms = time_ms(call, f" ({name})")
            timing = "capture failed" if ms is None else f"{ms * 1000:9.2f} us"
            print(f"{label:<10} {name:<48} {shape:<30} {timing}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
