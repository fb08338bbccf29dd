"""An MoE layer whose experts run as a block-sparse GEMM: every block of rows belongs to one
expert, the layout that vLLM's and SGLang's fused MoE Triton kernels (and MegaBlocks) take.

    python docs/examples/block_sparse_experts.py

``permute(..., block_size=B)`` lays each expert's rows out in whole blocks of B rows (zero
padding), ``PermutePlan.block_experts(B)`` names each block's expert, and with
``num_rows=max_permuted_rows(T * k, E, B)`` the row count is static, so the layer runs under
torch.compile(fullgraph=True) and in CUDA graphs. Here the block-sparse GEMM is a batched
matmul over the blocks, each with its expert's weight (a Triton kernel would read the same two
tensors); the result equals per-expert matmuls over the plain layout. Code that calls vLLM's
``moe_align_block_size`` can take ``sparseroute.moe_align_block_size`` instead: the same
outputs, with the slots of each expert in a fixed order.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sparseroute


class BlockSparseMoE(nn.Module):
    """Top-k routing to ``num_experts`` two-layer experts, whose matmuls run block by block."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, k: int, block_size: int = 16) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.up = nn.Parameter(torch.randn(num_experts, hidden, ffn) * hidden**-0.5)
        self.down = nn.Parameter(torch.randn(num_experts, ffn, hidden) * ffn**-0.5)
        self.k, self.block_size = k, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_experts, block = self.up.shape[0], self.block_size
        weights, experts = sparseroute.topk_gating(self.router(x), self.k)
        rows = sparseroute.max_permuted_rows(experts.numel(), num_experts, block)
        x_sorted, plan = sparseroute.permute(x, experts, num_experts, num_rows=rows, block_size=block)
        # Blocks past the plan are zero rows; any expert's weight gives zeros there.
        owner = plan.block_experts(block).clamp(min=0)
        blocks = x_sorted.view(-1, block, x.shape[1])
        hidden = torch.relu(torch.bmm(blocks, self.up[owner]))
        y_sorted = torch.bmm(hidden, self.down[owner]).view(-1, x.shape[1])
        return sparseroute.unpermute(y_sorted, plan, weights)

    def per_expert(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer with a loop of per-expert matmuls over the plain layout."""
        weights, experts = sparseroute.topk_gating(self.router(x), self.k)
        x_sorted, plan = sparseroute.permute(x, experts, self.up.shape[0])
        outputs = []
        for e in range(self.up.shape[0]):
            rows = x_sorted[plan.offsets[e] : plan.offsets[e + 1]]
            outputs.append(torch.relu(rows @ self.up[e]) @ self.down[e])
        return sparseroute.unpermute(torch.cat(outputs), plan, weights)


def run(tokens: int = 256, hidden: int = 32, ffn: int = 64, num_experts: int = 8, k: int = 2) -> float:
    """Trains the layer a few steps, compiled, and returns the largest difference between its
    output and the per-expert loop's."""
    torch.manual_seed(0)
    layer = BlockSparseMoE(hidden, ffn, num_experts, k)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    target = torch.randn(tokens, hidden)
    for _ in range(3):
        x = torch.randn(tokens, hidden)
        loss = (compiled(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = torch.randn(tokens, hidden)
        return float((layer(x) - layer.per_expert(x)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    difference = run(tokens=args.tokens)
    print(f"block-sparse layer against per-expert matmuls: largest difference {difference:.2e}")
    experts = torch.randint(0, 8, (6, 2))
    sorted_ids, expert_ids, padded = sparseroute.moe_align_block_size(experts, 4, 8)
    print(f"moe_align_block_size: {padded.item()} padded rows, block experts {expert_ids.tolist()}")
    print(f"  sorted slot ids (padding {experts.numel()}): {sorted_ids[: padded.item()].tolist()}")


if __name__ == "__main__":
    main()
