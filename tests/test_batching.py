"""Serving-side scheduling (sparseroute.schedule): lookahead batching against a pure-Python
reference, its fairness bound and its gain over FIFO, prefetch plans, threads, errors."""

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute
from sparseroute import schedule

from reference import batcher_reference


def _routing_sets(experts):
    return [
        {(layer, int(e)) for layer in range(experts.shape[1]) for e in experts[r, layer] if e >= 0}
        for r in range(experts.shape[0])
    ]


@given(
    requests=st.integers(0, 40),
    layers=st.integers(1, 4),
    k=st.integers(1, 3),
    num_experts=st.integers(1, 9),
    spread=st.integers(1, 6),
    max_batch=st.integers(1, 6),
    max_wait=st.integers(0, 5),
    policy=st.sampled_from(schedule.BATCH_POLICIES),
    seed=st.integers(0, 2**16),
)
def test_replay_matches_reference(
    requests, layers, k, num_experts, spread, max_batch, max_wait, policy, seed
):
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(-1, num_experts, (requests, layers, k), generator=g)
    arrivals = torch.randint(0, spread * max(requests, 1) // 4 + 1, (requests,), generator=g)
    replay = schedule.replay_batching(
        experts, num_experts, arrivals, max_batch=max_batch, max_wait=max_wait, policy=policy
    )
    expected = batcher_reference(_routing_sets(experts), arrivals.tolist(), max_batch, max_wait, policy)
    assert replay.offsets.shape[0] == len(expected) + 1
    for i, (requests_i, distinct, round_) in enumerate(expected):
        assert replay.requests[replay.offsets[i] : replay.offsets[i + 1]].tolist() == requests_i
        assert int(replay.distinct_experts[i]) == distinct
        assert int(replay.rounds[i]) == round_
    assert sorted(replay.requests.tolist()) == list(range(requests))
    assert bool((replay.wait >= 0).all())


@given(
    max_batch=st.integers(1, 6),
    max_wait=st.integers(0, 4),
    policy=st.sampled_from(schedule.BATCH_POLICIES),
    seed=st.integers(0, 2**16),
)
def test_waits_stay_within_the_bound_unless_overloaded(max_batch, max_wait, policy, seed):
    """At most max_batch arrivals per round can always be served within max_wait rounds."""
    g = torch.Generator().manual_seed(seed)
    per_round = torch.randint(0, max_batch + 1, (30,), generator=g)
    arrivals = torch.repeat_interleave(torch.arange(30), per_round)
    experts = torch.randint(0, 8, (arrivals.shape[0], 3, 2), generator=g)
    replay = schedule.replay_batching(
        experts, 8, arrivals, max_batch=max_batch, max_wait=max_wait, policy=policy
    )
    assert all(wait <= max_wait for wait in replay.wait.tolist())


def _topic_routing(requests=512, layers=8, num_experts=64, seed=0):
    """Requests drawn from 8 topics, each preferring 12 of the experts."""
    g = torch.Generator().manual_seed(seed)
    topic = torch.randint(0, 8, (requests,), generator=g)
    return (
        (topic * 8).view(-1, 1, 1) + torch.randint(0, 12, (requests, layers, 2), generator=g)
    ) % num_experts


def test_expert_aware_batches_touch_fewer_experts_than_fifo():
    experts = _topic_routing()
    arrivals = (torch.arange(512) // 64) * 4  # bursts of 64 requests every 4 rounds
    results = {
        policy: schedule.replay_batching(experts, 64, arrivals, max_batch=16, max_wait=4, policy=policy)
        for policy in schedule.BATCH_POLICIES
    }
    fifo, aware = results["fifo"], results["expert_aware"]
    assert aware.distinct_experts.float().mean() < 0.8 * fifo.distinct_experts.float().mean()
    assert int(aware.wait.max()) <= 4
    assert aware.rounds.shape == fifo.rounds.shape


def test_lookahead_batcher_online_and_across_threads():
    batcher = schedule.LookaheadBatcher(2, 4, max_batch=2, max_wait=3)
    for request, routing in enumerate([[[0], [1]], [[2], [3]], [[0], [1]], [[2], [3]]]):
        batcher.push(request, torch.tensor(routing))
    assert len(batcher) == 4
    assert batcher.next_batch() == [0, 2] and batcher.last_distinct_experts == 2
    assert batcher.next_batch() == [1, 3] and batcher.round == 2
    assert batcher.next_batch() == [] and batcher.round == 2

    shared = schedule.LookaheadBatcher(4, 16, max_batch=8, max_wait=2)
    experts = _topic_routing(400, 4, 16)
    served: list[int] = []

    def producer(start):
        for r in range(start, 400, 2):
            shared.push(r, experts[r])

    def consumer():
        while len(served) < 400:
            served.extend(shared.next_batch())

    threads = [threading.Thread(target=producer, args=(s,)) for s in (0, 1)] + [
        threading.Thread(target=consumer)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(served) == list(range(400))


def _prefetch_reference(resident, upcoming, capacity, depth):
    memory = set(resident)
    needs = [sorted({(layer, e) for e in experts if e >= 0}) for layer, experts in upcoming]
    plan = []
    for j, keys in enumerate(needs):
        pinned = {key for s in range(max(0, j - depth), j + 1) for key in needs[s]}
        for key in keys:
            if key in memory:
                continue
            evict = None
            if len(memory) >= capacity:

                def next_use(candidate, j=j):
                    return next((s for s in range(j, len(needs)) if candidate in needs[s]), len(needs) + 1)

                evict = min((m for m in memory if m not in pinned), key=lambda m: (-next_use(m), m))
                memory.remove(evict)
            memory.add(key)
            plan.append(schedule.PrefetchLoad(key[0], key[1], evict, j, j - depth))
    return plan


@given(
    steps=st.integers(0, 8),
    num_experts=st.integers(1, 6),
    per_step=st.integers(1, 3),
    depth=st.integers(0, 2),
    spare=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_prefetch_plan_matches_reference(steps, num_experts, per_step, depth, spare, seed):
    g = torch.Generator().manual_seed(seed)
    upcoming = [
        (
            int(torch.randint(0, 3, (), generator=g)),
            torch.randint(-1, num_experts, (per_step,), generator=g).tolist(),
        )
        for _ in range(steps)
    ]
    capacity = (depth + 1) * per_step + spare
    resident = sorted({(int(a), int(b)) for a, b in torch.randint(0, 3, (capacity, 2), generator=g).tolist()})
    resident = resident[:capacity]
    plan = schedule.prefetch_plan(resident, upcoming, capacity, depth=depth)
    assert plan == _prefetch_reference(resident, upcoming, capacity, depth)
    # Replaying the plan: every step finds its experts resident, memory never overflows.
    memory = set(resident)
    loads = iter(plan)
    pending = next(loads, None)
    for j, (layer, experts) in enumerate(upcoming):
        while pending is not None and pending.needed_by == j:
            if pending.evict is not None:
                memory.remove(pending.evict)
            memory.add((pending.layer, pending.expert))
            assert len(memory) <= capacity
            pending = next(loads, None)
        assert {(layer, e) for e in experts if e >= 0} <= memory


def test_plan_bucketing_is_exposed_here():
    assert schedule.bucket_by_plan is sparseroute.bucket_by_plan


def test_bad_input():
    with pytest.raises(ValueError, match="policy: expected one of"):
        schedule.LookaheadBatcher(2, 4, max_batch=2, max_wait=1, policy="lru")
    with pytest.raises(ValueError, match="max_batch: expected 1 <= max_batch"):
        schedule.LookaheadBatcher(2, 4, max_batch=0, max_wait=1)
    batcher = schedule.LookaheadBatcher(2, 4, max_batch=2, max_wait=1)
    with pytest.raises(
        sparseroute.InvalidInputError, match=r"experts: expected ids in \[-1, 4\), got 4 at layer 1"
    ):
        batcher.push(0, torch.tensor([[0], [4]]))
    with pytest.raises(ValueError, match=r"experts: expected \[L, k\] with L = 2"):
        batcher.push(0, torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match=r"arrivals: expected shape \[R\] = \[3\]"):
        schedule.replay_batching(
            torch.zeros(3, 2, 1, dtype=torch.int64),
            4,
            torch.zeros(2, dtype=torch.int64),
            max_batch=1,
            max_wait=0,
        )
    with pytest.raises(sparseroute.InvalidInputError, match="arrivals: expected rounds >= 0"):
        schedule.replay_batching(
            torch.zeros(1, 2, 1, dtype=torch.int64), 4, torch.tensor([-1]), max_batch=1, max_wait=0
        )
    with pytest.raises(sparseroute.InvalidInputError, match="capacity: expected room for the experts"):
        schedule.prefetch_plan([], [(0, [0, 1]), (1, [0, 1])], 3, depth=1)
    with pytest.raises(sparseroute.InvalidInputError, match="resident: expected at most capacity = 1"):
        schedule.prefetch_plan([(0, 0), (0, 1)], [], 1)
