"""asv benchmarks: routing variants (capacity-constrained dispatch, dynamic-k gating,
load-balancing losses), sparseroute next to the plain-torch code they replace (``impl`` =
"torch" or "sparseroute").

- capacity: Megatron-Core-style token dropping in torch: the ``[T, E]`` map of routing
  probabilities, ``torch.topk`` over tokens per expert for the capacity mask (drop policy
  "probs"), then the masked token indices gathered expert-major;
- load-balancing loss: Hugging Face's Mixtral ``load_balancing_loss_func`` (one-hot of the
  top-k, means over tokens), forward + backward;
- z-loss: ``logsumexp(logits).square().mean()``, forward + backward;
- top-p: softmax, descending sort, cumulative sum, mask of the prefix reaching p, gather.
"""

from __future__ import annotations

import torch

import sparseroute

IMPLS = ["torch", "sparseroute"]


def routed(num_tokens: int, num_experts: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    weights, experts = sparseroute.topk_gating(logits, k)
    return logits, weights, experts


def torch_capacity_permute(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = x.shape[0]
    probs = torch.zeros(num_tokens, num_experts).scatter(1, experts, weights)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, experts, True)
    top = torch.topk(probs, k=capacity, dim=0, sorted=False).indices
    capacity_mask = torch.zeros_like(routing_map).scatter(0, top, True)
    kept = (routing_map & capacity_mask).T.contiguous()
    token_index = torch.arange(num_tokens).unsqueeze(0).expand(num_experts, -1)
    rows = token_index.masked_select(kept)
    return x.index_select(0, rows), rows


def torch_mixtral_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    num_experts = logits.shape[1]
    routing_weights = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(routing_weights, k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected, num_experts)
    tokens_per_expert = expert_mask.float().mean(dim=0)
    router_prob = routing_weights.mean(dim=0)
    return (tokens_per_expert * router_prob.unsqueeze(0)).sum() * num_experts


class Capacity:
    params = ([4096, 16384], [64], [8], [1024], IMPLS)
    param_names = ["T", "E", "k", "d", "impl"]
    repeat = (2, 5, 20.0)
    number = 1
    timeout = 300

    def setup(self, T, E, k, d, impl):
        _, self.weights, self.experts = routed(T, E, k)
        self.x = torch.randn(T, d, generator=torch.Generator().manual_seed(1))
        self.capacity = sparseroute.expert_capacity(T, E, k, 1.0)

    def time_permute_with_capacity(self, T, E, k, d, impl):
        if impl == "torch":
            torch_capacity_permute(self.x, self.weights, self.experts, E, self.capacity)
        else:
            sparseroute.permute(
                self.x, self.experts, E, capacity=self.capacity, weights=self.weights, drop_policy="probs"
            )


class BalanceLoss:
    params = ([4096, 16384], [8, 64], [2, 8], IMPLS)
    param_names = ["T", "E", "k", "impl"]
    repeat = (3, 10, 20.0)
    number = 1

    def setup(self, T, E, k, impl):
        self.logits, _, self.experts = routed(T, E, k)

    def time_load_balancing_loss_forward_backward(self, T, E, k, impl):
        logits = self.logits.detach().requires_grad_()
        if impl == "torch":
            loss = torch_mixtral_loss(logits, k)
        else:
            _, experts = sparseroute.topk_gating(logits.detach(), k)
            loss = sparseroute.load_balancing_loss(logits, experts, scale="switch")
        loss.backward()

    def time_z_loss_forward_backward(self, T, E, k, impl):
        logits = self.logits.detach().requires_grad_()
        if impl == "torch":
            loss = torch.logsumexp(logits, dim=-1).square().mean()
        else:
            loss = sparseroute.z_loss(logits)
        loss.backward()


def torch_topp(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = before < p
    weights = torch.where(keep, sorted_probs, 0.0)
    experts = torch.where(keep, order, -1)
    return weights, experts


class TopP:
    params = ([4096, 16384], [64], IMPLS)
    param_names = ["T", "E", "impl"]
    repeat = (3, 10, 20.0)
    number = 1

    def setup(self, T, E, impl):
        self.logits, _, _ = routed(T, E, 1)
        self.grad = torch.randn(T, E)

    def time_forward_backward(self, T, E, impl):
        logits = self.logits.detach().requires_grad_()
        if impl == "torch":
            weights, _ = torch_topp(logits, 0.6)
        else:
            weights, _ = sparseroute.topp_gating(logits, 0.6)
        weights.backward(self.grad[:, : weights.shape[1]])


def torch_expert_choice(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    gates, indices = torch.topk(probs.T, capacity, dim=1)
    indices, order = torch.sort(indices, dim=1)
    return indices, gates.gather(1, order)


def torch_sinkhorn(cost: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Megatron-Core's sinkhorn, restated."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), dtype=cost.dtype, device=cost.device)
    d1 = torch.ones(cost.size(1), dtype=cost.dtype, device=cost.device)
    error, d1_old = 1e9, d1
    while error > tol:
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + 1e-8)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + 1e-8)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
    return d1 * cost * d0.unsqueeze(1)


class ExpertChoiceAndSinkhorn:
    params = ([4096, 16384], [64], IMPLS)
    param_names = ["T", "E", "impl"]
    repeat = (3, 10, 20.0)
    number = 1

    def setup(self, T, E, impl):
        self.logits, _, _ = routed(T, E, 1)
        self.capacity = 2 * T // E

    def time_expert_choice_forward_backward(self, T, E, impl):
        logits = self.logits.detach().requires_grad_()
        if impl == "torch":
            _, gates = torch_expert_choice(logits, self.capacity)
        else:
            gates = sparseroute.expert_choice(logits, self.capacity).gates
        gates.sum().backward()

    def time_sinkhorn(self, T, E, impl):
        if impl == "torch":
            torch_sinkhorn(self.logits)
        else:
            sparseroute.sinkhorn(self.logits)
