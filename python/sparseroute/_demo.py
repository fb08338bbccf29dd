"""The demo behind ``make demo``: one MoE layer computed two ways on CPU.

- "torch": the dispatch Hugging Face's MoE blocks write by hand (softmax, ``torch.topk``,
  renormalise; a one-hot expert mask; per expert ``torch.where`` to find its tokens, gather,
  MLP, scale by the routing weight, ``index_add_`` back).
- "sparseroute": ``topk_gating`` -> ``permute`` -> the same per-expert MLP on contiguous
  row slices -> ``unpermute``.

Both use the same weights; the table reports forward and forward+backward time, their
ratio, and the largest difference in outputs and gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import sparseroute


@dataclass(frozen=True)
class LayerShape:
    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    k: int


SHAPES = [
    LayerShape("Mixtral-like", tokens=2048, hidden=256, ffn=512, experts=8, k=2),
    LayerShape("OLMoE-like", tokens=1024, hidden=256, ffn=128, experts=64, k=8),
]


@dataclass
class Experts:
    """SwiGLU experts: ``down(silu(x @ gate) * (x @ up))``."""

    gate: Tensor  # [E, H, F]
    up: Tensor  # [E, H, F]
    down: Tensor  # [E, F, H]

    identity: bool = False
    """Route only: every expert returns its input (isolates the routing cost)."""

    def mlp(self, e: int, x: Tensor) -> Tensor:
        if self.identity:
            return x
        return (F.silu(x @ self.gate[e]) * (x @ self.up[e])) @ self.down[e]

    def parameters(self) -> list[Tensor]:
        return [self.gate, self.up, self.down]


def torch_moe(x: Tensor, router_logits: Tensor, experts: Experts, k: int) -> Tensor:
    """The Hugging Face (Mixtral-style) eager MoE dispatch."""
    num_experts = router_logits.shape[1]
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected = torch.topk(routing_weights, k, dim=-1)
    routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(x.dtype)
    out = torch.zeros_like(x)
    expert_mask = F.one_hot(selected, num_classes=num_experts).permute(2, 1, 0)
    for e in range(num_experts):
        slot, token = torch.where(expert_mask[e])
        if token.numel() == 0:
            continue
        y = experts.mlp(e, x[token]) * routing_weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def sparseroute_moe(x: Tensor, router_logits: Tensor, experts: Experts, k: int) -> Tensor:
    num_experts = router_logits.shape[1]
    weights, selected = sparseroute.topk_gating(router_logits, k)
    x_sorted, plan = sparseroute.permute(x, selected, num_experts)
    # One split (not many slices): its backward is a single concatenation of the gradients.
    chunks = torch.split(x_sorted, plan.tokens_per_expert.tolist())
    y_sorted = torch.cat([experts.mlp(e, chunk) for e, chunk in enumerate(chunks)])
    return sparseroute.unpermute(y_sorted, plan, weights)


MoE = Callable[[Tensor, Tensor, Experts, int], Tensor]


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(
    moe: MoE, shape: LayerShape, inputs: tuple[Tensor, Tensor, Experts], repeats: int
) -> dict[str, Any]:
    x, logits, experts = inputs
    leaves = [x, logits] + ([] if experts.identity else experts.parameters())

    def forward() -> Tensor:
        with torch.no_grad():
            return moe(x, logits, experts, shape.k)

    def forward_backward() -> list[Tensor]:
        out = moe(x, logits, experts, shape.k)
        return list(torch.autograd.grad(out.square().mean(), leaves))

    return {
        "forward": best_time(forward, repeats),
        "forward_backward": best_time(forward_backward, repeats),
        "output": forward(),
        "grads": forward_backward(),
    }


def make_inputs(shape: LayerShape, seed: int = 0) -> tuple[Tensor, Tensor, Experts]:
    g = torch.Generator().manual_seed(seed)
    scale = shape.hidden**-0.5

    def param(*size: int, std: float) -> Tensor:
        return (torch.randn(*size, generator=g) * std).requires_grad_()

    x = param(shape.tokens, shape.hidden, std=1.0)
    logits = param(shape.tokens, shape.experts, std=1.0)
    experts = Experts(
        gate=param(shape.experts, shape.hidden, shape.ffn, std=scale),
        up=param(shape.experts, shape.hidden, shape.ffn, std=scale),
        down=param(shape.experts, shape.ffn, shape.hidden, std=shape.ffn**-0.5),
    )
    return x, logits, experts


def run_demo(repeats: int = 5) -> None:
    versions = f"sparseroute {sparseroute.__version__}, torch {torch.__version__}"
    print(f"{versions}, {torch.get_num_threads()} threads")
    print("One MoE layer (SwiGLU experts), float32 on CPU; best of", repeats, "runs.\n")
    columns = ("layer", "what", "pass", "torch ms", "sparseroute ms", "speed-up", "max |diff|")
    header = "{:<34} {:<13} {:<17} {:>9} {:>15} {:>9} {:>11}".format(*columns)
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        x, logits, experts = make_inputs(shape)
        label = f"{shape.name} T={shape.tokens} E={shape.experts} k={shape.k}"
        for what, identity in (("routing only", True), ("whole layer", False)):
            inputs = (x, logits, Experts(experts.gate, experts.up, experts.down, identity=identity))
            ours = measure(sparseroute_moe, shape, inputs, repeats)
            theirs = measure(torch_moe, shape, inputs, repeats)
            out_diff = (ours["output"] - theirs["output"]).abs().max().item()
            grads = zip(ours["grads"], theirs["grads"], strict=True)
            grad_diff = max((a - b).abs().max().item() for a, b in grads)
            for stage, diff in (("forward", out_diff), ("forward_backward", grad_diff)):
                t_torch, t_ours = theirs[stage] * 1e3, ours[stage] * 1e3
                row = f"{label:<34} {what:<13} {stage:<17}"
                print(f"{row} {t_torch:>9.1f} {t_ours:>15.1f} {t_torch / t_ours:>8.2f}x {diff:>11.2e}")
    print(
        "\nrouting only: every expert is the identity, so the times are gating + dispatch + combine."
        "\nmax |diff|: largest difference of the layer output (forward) or of any gradient"
        " (input, router logits, expert weights) between the two implementations."
    )
