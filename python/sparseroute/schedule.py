"""Serving-side scheduling with lookahead routing: expert-aware batching, prefetch plans,
and batching requests by layer plan.

When the router is decoupled from the backbone (pre-gating, as in Read-ME), the experts a
request will use at every layer are known before it runs. A server can then batch requests
that share experts (each batch reads or loads fewer distinct experts) and load the experts
of upcoming layers while earlier layers compute. The algorithms run in the Rust core
(rust/core/src/batching.rs) with the GIL released; ``LookaheadBatcher`` may be shared
between threads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sparseroute import _core
from sparseroute.ops._bridge import numpy_view
from sparseroute.ops._checks import INDEX_DTYPES, check_int, check_tensor
from sparseroute.ops.layers import PlanBuckets, bucket_by_plan

__all__ = [
    "BATCH_POLICIES",
    "BatchingReplay",
    "LookaheadBatcher",
    "PlanBuckets",
    "PrefetchLoad",
    "bucket_by_plan",
    "prefetch_plan",
    "replay_batching",
]

BATCH_POLICIES = ("expert_aware", "fifo")


def _check_policy(policy: object) -> str:
    if policy not in BATCH_POLICIES:
        raise ValueError(f"policy: expected one of {BATCH_POLICIES}, got {policy!r}")
    return str(policy)


class LookaheadBatcher:
    """A queue of requests whose routing is known ahead, handing out one batch per round.

    ``policy="expert_aware"``: a batch takes first the requests that have waited
    ``max_wait`` rounds (oldest first), then the oldest request, then repeatedly the request
    that adds the fewest new (layer, expert) pairs to the batch (ties: the older request),
    up to ``max_batch``. ``policy="fifo"``: the oldest requests. A round is one batch.

    Fairness: no request waits more than ``max_wait`` rounds as long as at most
    ``max_batch`` requests arrive per round (the requests overdue in a round are at most
    those that arrived ``max_wait`` rounds earlier, and they all fit). Under heavier load
    the overdue requests go oldest first and some wait longer.

    Thread-safe: ``push`` and ``next_batch`` may be called from several threads.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        max_batch: int,
        max_wait: int,
        policy: str = "expert_aware",
    ) -> None:
        self.num_layers = check_int(num_layers, "num_layers", minimum=0)
        self.num_experts = check_int(num_experts, "num_experts", minimum=1)
        check_int(max_batch, "max_batch", minimum=1)
        check_int(max_wait, "max_wait", minimum=0)
        self._batcher = _core.Batcher(num_layers, num_experts, max_batch, max_wait, _check_policy(policy))
        self.last_distinct_experts = 0

    def push(self, request_id: int, experts: Tensor) -> None:
        """Queue ``request_id`` (an int), which uses ``experts[l]`` at layer ``l``:
        ``[L, k]`` int64 or int32 ids in ``[-1, E)`` (-1 = none; for a request of many
        tokens, the union of its tokens' experts at each layer)."""
        check_int(request_id, "request_id", minimum=-(2**63))
        experts = check_tensor(experts, "experts", ndim=2, layout="[L, k]", dtypes=INDEX_DTYPES)
        if experts.shape[0] != self.num_layers:
            raise ValueError(
                f"experts: expected [L, k] with L = {self.num_layers} (num_layers), "
                f"got {tuple(experts.shape)}"
            )
        self._batcher.push(request_id, numpy_view(experts.to(torch.int64).contiguous()))

    def next_batch(self) -> list[int]:
        """The request ids of the next batch, in the order chosen (empty when nothing is
        queued). ``last_distinct_experts`` is then its number of distinct (layer, expert)
        pairs."""
        requests, distinct, _ = self._batcher.next_batch()
        self.last_distinct_experts = distinct
        return requests

    def __len__(self) -> int:
        """Requests queued."""
        return int(self._batcher.pending())

    @property
    def round(self) -> int:
        """Batches handed out so far."""
        return int(self._batcher.round())


class BatchingReplay(NamedTuple):
    """The batches of ``replay_batching``.

    Attributes:
        requests: ``[R]`` int64 request ids, batch after batch.
        offsets: ``[N + 1]`` int64: batch ``i`` is ``requests[offsets[i]:offsets[i + 1]]``.
        distinct_experts: ``[N]`` int64 distinct (layer, expert) pairs per batch.
        rounds: ``[N]`` int64 the round each batch ran in (idle rounds included).
        wait: ``[R]`` int64 rounds each request waited (indexed by request id).
    """

    requests: Tensor
    offsets: Tensor
    distinct_experts: Tensor
    rounds: Tensor
    wait: Tensor


def replay_batching(
    experts: Tensor,
    num_experts: int,
    arrivals: Tensor,
    *,
    max_batch: int,
    max_wait: int,
    policy: str = "expert_aware",
) -> BatchingReplay:
    """Replay a queue through ``LookaheadBatcher``: request ``r`` (using ``experts[r]``,
    ``[L, k]``) arrives at round ``arrivals[r]`` (requests arriving together queue in index
    order); one batch runs per round while requests are waiting; rounds with an empty queue
    pass idle.

    Args:
        experts: ``[R, L, k]`` int64 or int32 expert ids in ``[-1, E)``.
        num_experts: E.
        arrivals: ``[R]`` int64 or int32 arrival rounds, ``>= 0``.
    """
    experts = check_tensor(experts, "experts", ndim=3, layout="[R, L, k]", dtypes=INDEX_DTYPES)
    arrivals = check_tensor(arrivals, "arrivals", ndim=1, layout="[R]", dtypes=INDEX_DTYPES)
    if arrivals.shape[0] != experts.shape[0]:
        raise ValueError(
            f"arrivals: expected shape [R] = [{experts.shape[0]}] (the requests of experts), "
            f"got {list(arrivals.shape)}"
        )
    check_int(num_experts, "num_experts", minimum=1)
    check_int(max_batch, "max_batch", minimum=1)
    check_int(max_wait, "max_wait", minimum=0)
    arrivals = arrivals.to(torch.int64).contiguous()
    requests, offsets, distinct, rounds = (
        torch.from_numpy(a)
        for a in _core.replay_batching(
            numpy_view(experts.to(torch.int64).contiguous()),
            num_experts,
            numpy_view(arrivals),
            max_batch,
            max_wait,
            _check_policy(policy),
        )
    )
    wait = torch.empty_like(arrivals)
    sizes = offsets.diff()
    wait[requests] = torch.repeat_interleave(rounds, sizes) - arrivals[requests]
    return BatchingReplay(requests, offsets, distinct, rounds, wait)


class PrefetchLoad(NamedTuple):
    """One load of a prefetch plan: ``(layer, expert)`` is loaded, replacing ``evict`` (a
    resident ``(layer, expert)``, or None when memory had room); step ``needed_by`` of the
    upcoming layers needs it first, and it is issued during step ``issue_during`` (-1: before
    the first step)."""

    layer: int
    expert: int
    evict: tuple[int, int] | None
    needed_by: int
    issue_during: int


def prefetch_plan(
    resident: list[tuple[int, int]],
    upcoming: list[tuple[int, Tensor | list[int]]],
    capacity: int,
    *,
    depth: int = 1,
) -> list[PrefetchLoad]:
    """Which experts to load, in which order, and what to evict, to run the upcoming layers.

    ``upcoming[j] = (layer, experts)`` is step ``j``: the layer that runs and the experts it
    needs (-1 entries ignored). Every expert of a step is resident before the step runs;
    ``capacity`` experts fit in memory. The loads of step ``j`` are issued during step
    ``j - depth`` (``depth=1``: double buffering, one step ahead). Loads come in the order of
    the step that needs them, then by expert id. A load may not evict an expert of steps
    ``j - depth ..= j`` (they compute while it is in flight); among the others the victim is
    the one whose next use in the upcoming steps is farthest (never used: first), ties to
    the smallest ``(layer, expert)``.

    Raises ``InvalidInputError`` when ``capacity`` cannot hold the experts of ``depth + 1``
    consecutive steps, or ``resident`` already exceeds it.
    """
    check_int(capacity, "capacity", minimum=1)
    check_int(depth, "depth", minimum=0)
    resident_ids = torch.tensor([list(map(int, key)) for key in resident], dtype=torch.int64).reshape(-1, 2)
    if bool((resident_ids < 0).any()):
        raise ValueError("resident: expected (layer, expert) pairs of ids >= 0")
    layers, chunks = [], []
    for j, step in enumerate(upcoming):
        if not isinstance(step, tuple) or len(step) != 2:
            raise TypeError(f"upcoming: expected (layer, experts) pairs, got {step!r} at step {j}")
        layer, experts = step
        layers.append(check_int(layer, f"upcoming[{j}] layer", minimum=0))
        chunks.append(torch.as_tensor(experts, dtype=torch.int64).reshape(-1))
    offsets = torch.zeros(len(chunks) + 1, dtype=torch.int64)
    if chunks:
        offsets[1:] = torch.tensor([len(c) for c in chunks]).cumsum(0)
    flat = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)
    rows = _core.prefetch_plan(
        numpy_view(resident_ids.contiguous()),
        numpy_view(torch.tensor(layers, dtype=torch.int64)),
        numpy_view(flat.contiguous()),
        numpy_view(offsets),
        capacity,
        depth,
    ).tolist()
    return [
        PrefetchLoad(layer, expert, None if evict_layer < 0 else (evict_layer, evict_expert), needed, issued)
        for layer, expert, evict_layer, evict_expert, needed, issued in rows
    ]
