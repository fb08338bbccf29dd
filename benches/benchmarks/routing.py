"""asv benchmarks: sparseroute's routing ops next to the plain-torch code they replace.

Each benchmark takes an ``impl`` parameter, "torch" or "sparseroute", so asv reports both
in the same run; ``benches/ratios.py`` prints their ratios. The torch code is what Hugging
Face MoE blocks and Megatron-style dispatchers write by hand:

- gating: softmax over experts in fp32, ``torch.topk``, divide by the sum;
- permute: stable ``argsort`` of the flattened expert ids, ``index_select`` of the rows;
- permute in blocks (each expert's rows padded to whole blocks of ``BLOCK_ROWS``, the layout
  of block-sparse grouped GEMMs): the stable ``argsort``, ``bincount`` and ``cumsum`` of
  the padded counts, each row's place, the rows written into a zeroed buffer;
- unpermute: weight the rows, ``index_add_`` them into a zeroed [T, d] output.
"""

from __future__ import annotations

import torch

import sparseroute

IMPLS = ["torch", "sparseroute"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- the plain-torch code sparseroute replaces ---------------------------------------------


def torch_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(scores, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def torch_deepseek_v3_gating(
    logits: torch.Tensor, bias: torch.Tensor, k: int, num_groups: int, topk_groups: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's DeepSeek-V3 router after its logits: sigmoid scores, the selection bias,
    groups scored by their two best, the best topk_groups kept, top-k, renormalised, scaled."""
    num_tokens, num_experts = logits.shape
    scores = logits.float().sigmoid()
    keys = scores + bias
    group_scores = keys.view(num_tokens, num_groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    kept = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, kept, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, num_experts // num_groups).reshape(num_tokens, -1)
    keys = keys.masked_fill(~expert_mask.bool(), float("-inf"))
    experts = torch.topk(keys, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, experts)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scale, experts


def deepseek_v3_gating(impl: str, logits: torch.Tensor, bias: torch.Tensor) -> object:
    """DeepSeek-V3's routing (E = 256, k = 8, sigmoid, selection bias, 8 groups of which 4
    compete, scale 2.5) by ``impl``: its Hugging Face router code, or sparseroute."""
    if impl == "torch":
        return torch_deepseek_v3_gating(logits, bias, 8, 8, 4, 2.5)
    return sparseroute.topk_gating(
        logits, 8, score="sigmoid", expert_bias=bias, num_groups=8, topk_groups=4, scale=2.5
    )


def torch_permute(x: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(experts.reshape(-1), stable=True)
    return x.index_select(0, order // experts.shape[1]), order


#: Rows per block of the block-aligned permute benchmarks.
BLOCK_ROWS = 128


def torch_block_permute(
    x: torch.Tensor, experts: torch.Tensor, num_experts: int, block_size: int
) -> torch.Tensor:
    """The rows in expert order, each expert's rows in whole blocks of ``block_size`` (zero
    padding), in ``T * k + E * (block_size - 1)`` rows rounded up to whole blocks (a static
    bound)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    sorted_experts = flat[order]
    first_row = (torch.cumsum(padded, 0) - padded)[sorted_experts]
    rank = torch.arange(flat.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    rows = -(-(flat.numel() + num_experts * (block_size - 1)) // block_size) * block_size
    out = x.new_zeros(rows, x.shape[1])
    out[first_row + rank] = x[order // experts.shape[1]]
    return out


def torch_unpermute(
    y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    k = weights.shape[1]
    weighted = y_sorted * weights.reshape(-1)[order].unsqueeze(1).to(y_sorted.dtype)
    y = torch.zeros(num_tokens, y_sorted.shape[1], dtype=y_sorted.dtype, device=y_sorted.device)
    return y.index_add_(0, order // k, weighted)


def routed(num_tokens: int, num_experts: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits and the top-k choice they make, as a trained router would give."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    weights, experts = sparseroute.topk_gating(logits, k)
    return logits, (weights, experts)


# --- benchmarks ----------------------------------------------------------------------------


class Gating:
    params = ([4096, 16384], [8, 64, 256], [2, 8], list(DTYPES), IMPLS)
    param_names = ["T", "E", "k", "dtype", "impl"]
    repeat = (3, 10, 20.0)
    number = 1
    warmup_time = 0.1

    def setup(self, T, E, k, dtype, impl):
        logits, _ = routed(T, E, k)
        self.logits = logits.to(DTYPES[dtype])
        self.grad = torch.randn(T, k)
        self.fn = torch_gating if impl == "torch" else sparseroute.topk_gating

    def time_forward(self, T, E, k, dtype, impl):
        self.fn(self.logits, k)

    def time_forward_backward(self, T, E, k, dtype, impl):
        logits = self.logits.detach().requires_grad_()
        weights, _ = self.fn(logits, k)
        weights.backward(self.grad)


class GroupLimitedGating:
    """DeepSeek-V3's routing (E = 256, k = 8, sigmoid, selection bias, 8 groups of which 4
    compete, scale 2.5) against its Hugging Face router code."""

    params = ([4096, 16384], list(DTYPES), IMPLS)
    param_names = ["T", "dtype", "impl"]
    repeat = (3, 10, 20.0)
    number = 1
    warmup_time = 0.1

    def setup(self, T, dtype, impl):
        logits, _ = routed(T, 256, 8)
        self.logits = logits.to(DTYPES[dtype])
        self.bias = torch.randn(256, generator=torch.Generator().manual_seed(3)) * 0.01

    def time_forward(self, T, dtype, impl):
        deepseek_v3_gating(impl, self.logits, self.bias)


class Dispatch:
    params = ([4096, 16384], [8, 64, 256], [2, 8], [1024, 2048], list(DTYPES), IMPLS)
    param_names = ["T", "E", "k", "d", "dtype", "impl"]
    repeat = (2, 5, 20.0)
    number = 1
    warmup_time = 0.0
    timeout = 300

    def setup(self, T, E, k, d, dtype, impl):
        _, (weights, experts) = routed(T, E, k)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(T, d, generator=g).to(DTYPES[dtype])
        self.weights, self.experts, self.num_experts = weights, experts, E
        self.grad = torch.randn(T, d, generator=g).to(DTYPES[dtype])
        if impl == "torch":
            self.y_sorted, self.order = torch_permute(self.x, experts)
        else:
            self.y_sorted, self.plan = sparseroute.permute(self.x, experts, E)

    def time_permute(self, T, E, k, d, dtype, impl):
        if impl == "torch":
            torch_permute(self.x, self.experts)
        else:
            sparseroute.permute(self.x, self.experts, self.num_experts)

    def time_unpermute(self, T, E, k, d, dtype, impl):
        if impl == "torch":
            torch_unpermute(self.y_sorted, self.order, self.weights, T)
        else:
            sparseroute.unpermute(self.y_sorted, self.plan, self.weights)

    def time_permute_blocks(self, T, E, k, d, dtype, impl):
        if impl == "torch":
            torch_block_permute(self.x, self.experts, E, BLOCK_ROWS)
        else:
            rows = sparseroute.max_permuted_rows(T * k, E, BLOCK_ROWS)
            sparseroute.permute(self.x, self.experts, E, num_rows=rows, block_size=BLOCK_ROWS)

    def time_round_trip_forward_backward(self, T, E, k, d, dtype, impl):
        x = self.x.detach().requires_grad_()
        weights = self.weights.detach().requires_grad_()
        if impl == "torch":
            x_sorted, order = torch_permute(x, self.experts)
            y = torch_unpermute(x_sorted, order, weights, T)
        else:
            x_sorted, plan = sparseroute.permute(x, self.experts, self.num_experts)
            y = sparseroute.unpermute(x_sorted, plan, weights)
        y.backward(self.grad)


class DecodeStep:
    """One decoding step's routing (a few tokens): gating, permute and unpermute together,
    where the cost is the calls' host work rather than their arithmetic."""

    params = ([1, 16], [8, 64], IMPLS)
    param_names = ["T", "E", "impl"]
    repeat = (3, 200, 10.0)
    number = 20
    warmup_time = 0.1

    def setup(self, T, E, impl):
        g = torch.Generator().manual_seed(2)
        self.logits = torch.randn(T, E, generator=g)
        self.x = torch.randn(T, 1024, generator=g)
        self.k = 2 if E == 8 else 8

    def time_route(self, T, E, impl):
        if impl == "torch":
            weights, experts = torch_gating(self.logits, self.k)
            x_sorted, order = torch_permute(self.x, experts)
            torch_unpermute(x_sorted, order, weights, T)
        else:
            weights, experts = sparseroute.topk_gating(self.logits, self.k)
            x_sorted, plan = sparseroute.permute(self.x, experts, E)
            sparseroute.unpermute(x_sorted, plan, weights)
