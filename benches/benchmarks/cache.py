"""asv benchmarks: expert cache replay (sparseroute.cache).

A synthetic decode trace: 10,000 steps x 32 layers, each layer choosing 8 of 64 experts
without replacement by a Zipf(1) popularity (a different ranking of the experts per layer),
2.56 M requests over 2,048 (layer, expert) keys. Each policy replays it at capacities of 256
and 1,024 experts, next to ``python-lru``: the same LRU model written as a straightforward
pure-Python replay (an ``OrderedDict``), which gives identical counts. ``track_hit_ratio``
reports what each policy achieves.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

from sparseroute import cache

IMPLS = [*cache.POLICIES, "python-lru"]
STEPS, LAYERS, EXPERTS, K = 10_000, 32, 64, 8


@functools.cache
def zipf_trace(steps: int = STEPS, layers: int = LAYERS, num_experts: int = EXPERTS, k: int = K):
    g = torch.Generator().manual_seed(0)
    popularity = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64)
    # Layer l's expert e has the popularity of rank ranking[l, e].
    ranking = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(layers)])
    weights = popularity[ranking]
    picks = torch.multinomial(weights.repeat(steps, 1), k, replacement=False, generator=g)
    return cache.RoutingTrace.from_dense(picks.reshape(steps, layers, k), num_experts=num_experts)


@functools.cache
def visit_keys(steps: int = STEPS) -> list[list[int]]:
    """Per visit, the sorted keys ``layer * E + expert`` it needs (the Python replay's input)."""
    trace = zipf_trace(steps)
    return [
        [layer * trace.num_experts + e for e in ids]
        for step in trace.to_lists()
        for layer, ids in enumerate(step)
    ]


def python_lru(visits: list[list[int]], capacity: int) -> tuple[int, int]:
    """LRU under the replay model: a visit's keys are pinned, handled in ascending order."""
    resident: OrderedDict[int, None] = OrderedDict()
    hits = misses = 0
    for keys in visits:
        pinned = set(keys)
        for key in keys:
            if key in resident:
                hits += 1
                resident.move_to_end(key)
                continue
            misses += 1
            if len(resident) >= capacity:
                victim = next(k for k in resident if k not in pinned)
                del resident[victim]
            resident[key] = None
    return hits, misses


class CacheReplay:
    params = (IMPLS, [256, 1024])
    param_names = ["policy", "capacity"]
    repeat = (2, 5, 60.0)
    number = 1
    timeout = 600

    def setup(self, policy, capacity):
        self.trace = zipf_trace()
        if policy == "python-lru":
            self.visits = visit_keys()

    def replay(self, policy, capacity):
        if policy == "python-lru":
            hits, misses = python_lru(self.visits, capacity)
            return hits / (hits + misses)
        return cache.simulate(self.trace, capacity, policy).hit_ratio

    def time_replay(self, policy, capacity):
        self.replay(policy, capacity)

    def track_hit_ratio(self, policy, capacity):
        return self.replay(policy, capacity)
