"""asv benchmarks: conditional computation (Mixture-of-Depths token routing, layer plans),
sparseroute next to the plain-torch code it replaces (``impl`` = "torch" or "sparseroute").

The torch Mixture-of-Depths routing is the form published implementations use:
``torch.topk`` of the router scores per sequence, ``torch.sort`` of the kept positions (so
attention over them stays causal), ``torch.gather`` of the kept rows and
``torch.scatter_add`` of ``gate * block(rows)`` back into the residual stream. The block
itself is the identity here, so that the routing is what is timed.
"""

from __future__ import annotations

import torch

import sparseroute

IMPLS = ["torch", "sparseroute"]


def torch_mod_routing(x: torch.Tensor, scores: torch.Tensor, capacity: int) -> torch.Tensor:
    gate, positions = torch.topk(scores, capacity, dim=1, sorted=False)
    positions, order = torch.sort(positions, dim=1)
    gate = gate.gather(1, order)
    index = positions.unsqueeze(-1).expand(-1, -1, x.shape[2])
    rows = torch.gather(x, 1, index)
    return torch.scatter_add(x, 1, index, rows * gate.unsqueeze(-1))


def sparseroute_mod_routing(x: torch.Tensor, scores: torch.Tensor, capacity: float) -> torch.Tensor:
    selection = sparseroute.select_tokens(scores.detach(), capacity)
    rows = sparseroute.gather_tokens(x, selection.indices)
    return sparseroute.scatter_tokens(x, rows, selection.indices, scores)


class MixtureOfDepths:
    params = ([8], [2048], [1024], [0.125], IMPLS)
    param_names = ["B", "S", "d", "capacity", "impl"]
    repeat = (2, 7, 30.0)
    number = 1
    timeout = 300

    def setup(self, B, S, d, capacity, impl):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(B, S, d, generator=g).requires_grad_()
        self.scores = torch.randn(B, S, generator=g).requires_grad_()
        self.grad = torch.randn(B, S, d, generator=g)
        self.capacity = capacity if impl == "sparseroute" else sparseroute.token_capacity(capacity, S)
        self.routing = sparseroute_mod_routing if impl == "sparseroute" else torch_mod_routing

    def time_forward(self, B, S, d, capacity, impl):
        with torch.no_grad():
            self.routing(self.x, self.scores, self.capacity)

    def time_forward_backward(self, B, S, d, capacity, impl):
        out = self.routing(self.x, self.scores, self.capacity)
        torch.autograd.grad(out, (self.x, self.scores), self.grad)


def torch_bucket_by_plan(plans: torch.Tensor) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for request, plan in enumerate(plans.tolist()):
        groups.setdefault(tuple(plan), []).append(request)
    return list(groups.values())


class LayerPlans:
    params = ([256, 4096], [32], IMPLS)
    param_names = ["B", "L", "impl"]
    repeat = (3, 10, 20.0)
    number = 1

    def setup(self, B, L, impl):
        g = torch.Generator().manual_seed(0)
        # Routers that mostly execute: few distinct plans, as trained layer routers give.
        self.logits = torch.randn(B, L, 3, generator=g)
        self.logits[..., 1] += 2.5

    def time_plan_and_bucket(self, B, L, impl):
        if impl == "torch":
            torch_bucket_by_plan(self.logits.argmax(dim=-1))
        else:
            sparseroute.bucket_by_plan(sparseroute.layer_plan(self.logits))
