"""Print torch / sparseroute time ratios for the asv benchmarks, measured side by side.

    python benches/ratios.py            # the target shapes (T = 16384)
    python benches/ratios.py --quick    # a small subset (T = 4096), a minute or so

Timings on a shared 2-core machine are noisy: the two implementations run one after the
other in the same process, each the best of ``--repeats`` runs or of as many as fit in
``--min-seconds`` (whichever is more: a sub-millisecond op gets hundreds of runs, as with
``timeit``, since the best of five still moved its ratio by half), and the ratio is what counts.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from benchmarks.depth import LayerPlans, MixtureOfDepths
from benchmarks.moe_block import MoEBlock
from benchmarks.routing import DecodeStep, Dispatch, Gating, GroupLimitedGating
from benchmarks.variants import BalanceLoss, Capacity, ExpertChoiceAndSinkhorn, TopP

GATING_TARGETS = {8: 5.0, 256: 10.0}  # E -> required speed-up of the fp32 forward pass
DISPATCH_TARGET = 2.0  # permute + unpermute forward + backward, fp32
# MoE block forward + backward, fp32, T = 2048: required speed-up over each transformers impl.
VARIANT_TARGET = 3.0  # every routing variant at T = 16384, E = 64 (k = 8), fp32
DEPTH_TARGET = 3.0  # Mixture-of-Depths routing forward + backward, B=8, S=2048, d=1024, 12.5%
BLOCK_TARGETS = {("olmoe", "eager"): 10.0, ("olmoe", "grouped_mm"): 1.5, ("mixtral", "grouped_mm"): 1.15}


#: Each timing runs at least this long in total (``--min-seconds``).
MIN_SECONDS = 0.3


def best_of(bench, method: str, params: tuple, repeats: int) -> float:
    """The fastest of ``repeats`` runs, or of as many as fit in ``MIN_SECONDS``."""
    bench.setup(*params)
    fn = getattr(bench, method)
    fn(*params)
    best, runs, deadline = float("inf"), 0, time.perf_counter() + MIN_SECONDS
    while runs < repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn(*params)
        best = min(best, time.perf_counter() - start)
        runs += 1
    return best


def ratio(cls, method: str, params: tuple, repeats: int) -> tuple[float, float]:
    t_torch = best_of(cls(), method, (*params, "torch"), repeats)
    t_ours = best_of(cls(), method, (*params, "sparseroute"), repeats)
    return t_torch, t_ours


def milliseconds(seconds: float) -> str:
    """Two decimals, or four below a millisecond (decoding steps take tens of µs)."""
    return f"{seconds * 1e3:.2f}" if seconds >= 1e-3 else f"{seconds * 1e3:.4f}"


def print_row(name: str, shape: tuple, dtype: str, times: tuple[float, float], target: float | None) -> None:
    t_torch, t_ours = times
    cells = [name, *map(str, shape), dtype, milliseconds(t_torch), milliseconds(t_ours)]
    cells += [f"{t_torch / t_ours:.2f}x", f">= {target:g}x" if target else ""]
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    global MIN_SECONDS  # set once, from --min-seconds, before any timing
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset at T = 4096")
    parser.add_argument("--repeats", type=int, default=5, help="at least this many runs per timing")
    parser.add_argument(
        "--min-seconds", type=float, default=MIN_SECONDS, help="and runs for at least this long per timing"
    )
    parser.add_argument(
        "--only", choices=["routing", "variants", "depth", "blocks"], help="run one section only"
    )
    args = parser.parse_args()
    MIN_SECONDS = args.min_seconds
    if args.only in (None, "routing"):
        routing_ratios(args)
    if args.only in (None, "variants"):
        variant_ratios(args)
    if args.only in (None, "depth"):
        depth_ratios(args)
    if args.only in (None, "blocks"):
        block_ratios(args)


def depth_ratios(args: argparse.Namespace) -> None:
    """Mixture-of-Depths token routing and layer plans against their torch versions."""
    print("\n| op | shape | dtype | torch ms | sparseroute ms | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    batch = 2 if args.quick else 8
    for method, target in (("time_forward", None), ("time_forward_backward", DEPTH_TARGET)):
        params = (batch, 2048, 1024, 0.125)
        times = ratio(MixtureOfDepths, method, params, args.repeats)
        name = "MoD routing " + method.removeprefix("time_").replace("_", "+")
        print_row(
            name, ("x".join(map(str, params[:3])) + ", 12.5%",), "fp32", times, None if args.quick else target
        )
    for requests in (256, 4096):
        times = ratio(LayerPlans, "time_plan_and_bucket", (requests, 32), args.repeats)
        print_row("layer_plan + bucket_by_plan", (f"B={requests}, L=32",), "fp32", times, None)


def variant_ratios(args: argparse.Namespace) -> None:
    """Capacity-constrained dispatch and the balancing losses against their torch versions."""
    print("\n| op | T | E | k | d | dtype | torch ms | sparseroute ms | ratio | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    tokens = 4096 if args.quick else 16384
    target = None if args.quick else VARIANT_TARGET
    times = ratio(Capacity, "time_permute_with_capacity", (tokens, 64, 8, 1024), args.repeats)
    print_row("permute, capacity (probs)", (tokens, 64, 8, 1024), "fp32", times, target)
    for method in ("time_load_balancing_loss_forward_backward", "time_z_loss_forward_backward"):
        times = ratio(BalanceLoss, method, (tokens, 64, 8), args.repeats)
        name = method.removeprefix("time_").replace("_forward_backward", " fwd+bwd").replace("_", " ")
        print_row(name, (tokens, 64, 8, "-"), "fp32", times, target)
    times = ratio(TopP, "time_forward_backward", (tokens, 64), args.repeats)
    print_row("top-p gating fwd+bwd (p=0.6)", (tokens, 64, "-", "-"), "fp32", times, target)
    for method in ("time_expert_choice_forward_backward", "time_sinkhorn"):
        times = ratio(ExpertChoiceAndSinkhorn, method, (tokens, 64), args.repeats)
        name = method.removeprefix("time_").replace("_forward_backward", " fwd+bwd").replace("_", " ")
        print_row(name, (tokens, 64, "-", "-"), "fp32", times, target)


def block_ratios(args: argparse.Namespace) -> None:
    """Hugging Face MoE blocks: transformers' eager and grouped_mm against sparseroute.patch,
    and the sparseroute block against its expert matmuls alone (the routing overhead)."""
    print("\n| block | T | dtype | pass | baseline | baseline ms | sparseroute ms | ratio | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    tokens_list = [512] if args.quick else [512, 2048]
    for shape in ("mixtral", "olmoe"):
        for tokens in tokens_list:
            for dtype in ("fp32", "bf16"):
                for method in ("time_forward", "time_forward_backward"):
                    repeats = 2 if method == "time_forward_backward" else 3
                    params = (shape, tokens, dtype)
                    ours = best_of(MoEBlock(), method, (*params, "sparseroute"), repeats)
                    for baseline in ("eager", "grouped_mm", "matmuls"):
                        theirs = best_of(MoEBlock(), method, (*params, baseline), repeats)
                        training = method == "time_forward_backward" and dtype == "fp32" and tokens == 2048
                        target = BLOCK_TARGETS.get((shape, baseline)) if training else None
                        # For "matmuls" the ratio is block / floor: the routing overhead.
                        ratio = ours / theirs if baseline == "matmuls" else theirs / ours
                        label = "block / matmuls" if baseline == "matmuls" else baseline
                        cells = [
                            shape,
                            str(tokens),
                            dtype,
                            method.removeprefix("time_").replace("_", "+"),
                            label,
                        ]
                        cells += [f"{theirs * 1e3:.1f}", f"{ours * 1e3:.1f}", f"{ratio:.2f}x"]
                        cells.append(f">= {target:g}x" if target else "")
                        print("| " + " | ".join(cells) + " |", flush=True)


def routing_ratios(args: argparse.Namespace) -> None:
    tokens = 4096 if args.quick else 16384

    print("| op | T | E | k | d | dtype | torch ms | sparseroute ms | ratio | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in ("fp32", "bf16"):
        for num_experts in (8, 64, 256):
            for k in (2, 8):
                for method in ("time_forward", "time_forward_backward"):
                    times = ratio(Gating, method, (tokens, num_experts, k, dtype), args.repeats)
                    fp32_forward = method == "time_forward" and dtype == "fp32"
                    target = GATING_TARGETS.get(num_experts) if fp32_forward else None
                    name = "gating " + method.removeprefix("time_").replace("_", "+")
                    print_row(name, (tokens, num_experts, k, "-"), dtype, times, target)
    for dtype in ("fp32", "bf16"):
        times = ratio(GroupLimitedGating, "time_forward", (tokens, dtype), args.repeats)
        print_row("gating forward, DeepSeek-V3 groups and bias", (tokens, 256, 8, "-"), dtype, times, None)

    shapes = [(64, 2, 1024)] if args.quick else [(64, 2, 1024), (64, 8, 2048)]
    for dtype in ("fp32", "bf16"):
        for num_experts, k, d in shapes:
            methods = (
                "time_permute",
                "time_permute_blocks",
                "time_unpermute",
                "time_round_trip_forward_backward",
            )
            for method in methods:
                repeats = max(2, args.repeats // 2)
                times = ratio(Dispatch, method, (tokens, num_experts, k, d, dtype), repeats)
                target = DISPATCH_TARGET if method.startswith("time_round") and dtype == "fp32" else None
                name = method.removeprefix("time_").replace("_forward_backward", " fwd+bwd").replace("_", " ")
                print_row(name, (tokens, num_experts, k, d), dtype, times, target)

    # A decoding step: host work per call, best of many short runs.
    for decode_tokens in (1, 16):
        for num_experts, k in ((8, 2), (64, 8)):
            times = ratio(DecodeStep, "time_route", (decode_tokens, num_experts), args.repeats * 40)
            print_row(
                "decode step: gating + permute + unpermute",
                (decode_tokens, num_experts, k, 1024),
                "fp32",
                times,
                None,
            )


if __name__ == "__main__":
    main()
