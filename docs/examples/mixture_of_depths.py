"""A small causal transformer in which every other block is a Mixture-of-Depths block.

    python docs/examples/mixture_of_depths.py

Each MoD block's router scores every position; ``select_tokens`` keeps the best quarter of
each sequence (in position order, so causal attention over them stays causal);
``gather_tokens`` compacts them; the block runs on them alone; ``scatter_tokens`` adds its
output back to the residual stream scaled by the router's gate, which is how the router
learns. A small auxiliary predictor learns, from each position alone, whether the router
would keep it; at sampling time it decides causally with ``select_tokens(...,
threshold=0.5)``, since top-k over a whole sequence cannot be computed token by token.

The task: sequences of random symbols, a few of them "markers"; at every position the
model predicts the most recent marker (a marker, or "none" before the first one).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import sparseroute

VOCAB = 16
MARKERS = 4  # symbols 0..3 are markers, the others are noise
NONE = VOCAB  # the target before the first marker


def make_batch(batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and targets: the most recent marker at or before each position."""
    is_marker = torch.rand(batch, seq_len, generator=generator) < 0.1
    markers = torch.randint(0, MARKERS, (batch, seq_len), generator=generator)
    noise = torch.randint(MARKERS, VOCAB, (batch, seq_len), generator=generator)
    tokens = torch.where(is_marker, markers, noise)
    last = torch.full((batch,), NONE)
    targets = torch.empty_like(tokens)
    for position in range(seq_len):
        last = torch.where(is_marker[:, position], tokens[:, position], last)
        targets[:, position] = last
    return tokens, targets


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """What the block adds to its input (the block is ``x + residual(x)``)."""
        batch, seq_len, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seq_len, 3, self.heads, -1).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        update = self.proj(attended.transpose(1, 2).reshape(batch, seq_len, width))
        return update + self.mlp(self.norm2(x + update))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class MoDBlock(nn.Module):
    """A block that processes only the ``capacity`` best-scored positions of each sequence."""

    def __init__(self, width: int, heads: int, capacity: float) -> None:
        super().__init__()
        self.block = Block(width, heads)
        self.router = nn.Linear(width, 1)
        self.predictor = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        self.capacity = capacity

    def forward(
        self, x: torch.Tensor, sampling: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's output, the kept-position mask, and the predictor's loss."""
        scores = self.router(x).squeeze(-1)
        if sampling:
            probability = torch.sigmoid(self.predictor(x.detach()).squeeze(-1))
            selection = sparseroute.select_tokens(probability.detach(), 1.0, threshold=0.5)
        else:
            selection = sparseroute.select_tokens(scores.detach(), self.capacity)
        rows = sparseroute.gather_tokens(x, selection.indices)
        out = sparseroute.scatter_tokens(
            x, self.block.residual(rows), selection.indices, torch.sigmoid(scores)
        )
        # The predictor learns the router's (non-causal) top-k decision from each position
        # alone; it never changes the main model (its input is detached).
        logits = self.predictor(x.detach()).squeeze(-1)
        predictor_loss = F.binary_cross_entropy_with_logits(logits, selection.mask.float())
        return out, selection.mask, predictor_loss


class Model(nn.Module):
    def __init__(self, width: int = 32, heads: int = 2, layers: int = 4, capacity: float = 0.25) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(64, width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(width, heads) if i % 2 == 0 else MoDBlock(width, heads, capacity) for i in range(layers)
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, VOCAB + 1))

    def forward(
        self, tokens: torch.Tensor, sampling: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        masks, predictor_loss = [], x.new_zeros(())
        for block in self.blocks:
            if isinstance(block, MoDBlock):
                x, mask, loss = block(x, sampling)
                masks.append(mask)
                predictor_loss = predictor_loss + loss
            else:
                x = block(x)
        return self.head(x), masks, predictor_loss


@dataclass
class Report:
    first_loss: float
    final_loss: float
    kept_fraction: float
    router_change: float
    predictor_agreement: float


def train(steps: int = 300, batch: int = 32, seq_len: int = 32, seed: int = 0, log_every: int = 0) -> Report:
    """Trains the model and reports the loss, the kept fraction and what the routers keep."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Model()
    routers = [block.router.weight for block in model.blocks if isinstance(block, MoDBlock)]
    initial = [router.detach().clone() for router in routers]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        tokens, targets = make_batch(batch, seq_len, generator)
        logits, _, predictor_loss = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        (loss + 0.1 * predictor_loss).backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  predictor {predictor_loss.item():.3f}")
    with torch.no_grad():
        tokens, _ = make_batch(256, seq_len, generator)
        _, masks, _ = model(tokens)
        _, sampled_masks, _ = model(tokens, sampling=True)
        kept = torch.stack(masks)
        agreement = (torch.stack(sampled_masks) == kept).float().mean()
    window = max(1, steps // 10)
    return Report(
        first_loss=sum(losses[:window]) / window,
        final_loss=sum(losses[-window:]) / window,
        kept_fraction=float(kept.float().mean()),
        router_change=max(
            float((r.detach() - r0).norm() / r0.norm()) for r, r0 in zip(routers, initial, strict=True)
        ),
        predictor_agreement=float(agreement),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a small Mixture-of-Depths transformer.")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    report = train(args.steps, log_every=50)
    print(f"loss: {report.first_loss:.3f} (first 10% of steps) -> {report.final_loss:.3f} (last 10%)")
    print(f"kept fraction in the MoD blocks: {report.kept_fraction:.3f} (capacity 0.25)")
    print(f"router weights moved by {report.router_change:.0%} of their initial norm (through the gate)")
    print(f"causal predictor agrees with the router's top-k on {report.predictor_agreement:.1%} of positions")


if __name__ == "__main__":
    main()
