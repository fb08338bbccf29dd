"""asv benchmarks: serving-side scheduling (sparseroute.schedule).

Lookahead batching on a synthetic trace: 4096 requests from 8 "topics" (each topic prefers
12 of 64 experts), 16 layers, 2 experts per layer, arriving in bursts of 64 every 4 rounds,
batches of 16, waits bounded by 4 rounds. ``track_*`` methods report quality (distinct
experts per batch, the longest wait) next to the time of the replay itself.
"""

from __future__ import annotations

import torch

from sparseroute import schedule

POLICIES = list(schedule.BATCH_POLICIES)


def topic_trace(requests: int, layers: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    topic = torch.randint(0, 8, (requests,), generator=g)
    experts = (
        (topic * 8).view(-1, 1, 1) + torch.randint(0, 12, (requests, layers, 2), generator=g)
    ) % num_experts
    arrivals = (torch.arange(requests) // 64) * 4
    return experts, arrivals


class LookaheadBatching:
    params = (POLICIES,)
    param_names = ["policy"]
    repeat = (3, 10, 20.0)
    number = 1

    def setup(self, policy):
        self.experts, self.arrivals = topic_trace(4096, 16, 64)

    def replay(self, policy):
        return schedule.replay_batching(
            self.experts, 64, self.arrivals, max_batch=16, max_wait=4, policy=policy
        )

    def time_replay(self, policy):
        self.replay(policy)

    def track_distinct_experts_per_batch(self, policy):
        return float(self.replay(policy).distinct_experts.float().mean())

    def track_longest_wait(self, policy):
        return int(self.replay(policy).wait.max())


class PrefetchPlan:
    repeat = (3, 10, 20.0)
    number = 1

    def setup(self):
        g = torch.Generator().manual_seed(0)
        # 61 layers of a 256-expert model, 8 experts per layer per step, 32 steps ahead.
        self.upcoming = [(j % 61, torch.randint(0, 256, (8,), generator=g).tolist()) for j in range(32)]
        self.resident = [(layer, e) for layer in range(61) for e in range(4)]

    def time_plan(self):
        schedule.prefetch_plan(self.resident, self.upcoming, capacity=256, depth=1)
