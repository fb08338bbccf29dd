"""Depth routing: per request and layer, skip, execute or repeat the layer (Dr.LLM- and
FiRST-style layer routers), and grouping requests with identical plans into batches.

A plan is decided once, at prefill, and reused for every decode step, so each request's
KV cache has one entry per layer execution (``layer_sequence``) for its whole life.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sparseroute import _core
from sparseroute.ops import _eager
from sparseroute.ops._bridge import as_dtype, numpy_view
from sparseroute.ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_tensor

SKIP, EXECUTE, REPEAT = 0, 1, 2
"""The decisions of a plan: the values of ``layer_plan``'s output."""


@_eager.custom_op("layer_plan", device_types="cpu")
def _layer_plan_op(logits: Tensor) -> Tensor:
    plans = torch.empty(logits.shape[:-1], dtype=torch.int64)
    _core.layer_plan(numpy_view(logits.contiguous()), numpy_view(plans))
    return plans


@_layer_plan_op.register_fake
def _(logits: Tensor) -> Tensor:
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


def layer_plan(logits: Tensor) -> Tensor:
    """Each request's decision for each layer, from a layer router's logits.

    Args:
        logits: ``[B, L, 3]`` (any leading dimensions) scores of skip, execute and repeat,
            float32, bfloat16, float16 or float64.

    Returns:
        ``[B, L]`` int64: ``SKIP`` (0), ``EXECUTE`` (1) or ``REPEAT`` (2), the argmax. A tie
        that involves execute is execute (when unsure, run the layer as trained); a tie
        between skip and repeat is skip.

    Raises:
        InvalidInputError: a NaN logit.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits: expected a torch.Tensor [B, L, 3], got {type(logits).__name__}")
    logits = check_tensor(logits, "logits", ndim=logits.dim(), layout="[B, L, 3]", dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] != 3:
        raise ValueError(
            f"logits: expected [B, L, 3] (skip, execute, repeat scores in the last dimension), "
            f"got shape {tuple(logits.shape)}"
        )
    plans: Tensor = _eager.call("layer_plan", logits.detach())
    return plans


class PlanBuckets(NamedTuple):
    """Requests grouped by identical layer plans (see ``bucket_by_plan``).

    Attributes:
        order: ``[B]`` int64 request ids, batch after batch, ascending within a batch.
        offsets: ``[num_batches + 1]`` int64: batch ``i`` is ``order[offsets[i]:offsets[i + 1]]``.
        group: ``[num_batches]`` int64: the plan of each batch, a row of ``plans``.
        plans: ``[G, L]`` int64, the distinct plans in order of their first request.
    """

    order: Tensor
    offsets: Tensor
    group: Tensor
    plans: Tensor

    @property
    def num_batches(self) -> int:
        return int(self.group.shape[0])

    def batch(self, i: int) -> tuple[Tensor, Tensor]:
        """``(requests, plan)`` of batch ``i``: the request ids and the ``[L]`` plan they share."""
        i = check_int(i, "i", minimum=0, maximum=self.num_batches - 1)
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.order[start:stop], self.plans[int(self.group[i])]


def bucket_by_plan(plans: Tensor, *, max_batch: int | None = None) -> PlanBuckets:
    """Group requests whose per-layer plans are identical, so each group runs as one batch.

    Groups come in order of their first request and hold their requests in ascending
    order; with ``max_batch``, a larger group is cut into consecutive batches of
    ``max_batch`` requests (the last one shorter). Deterministic. A host-side scheduling
    step: its output sizes depend on the data, so it is not a traced op.

    Args:
        plans: ``[B, L]`` int64 or int32 decisions (``layer_plan``'s output).
        max_batch: the most requests per batch (``None``: no limit).
    """
    plans = check_tensor(plans, "plans", ndim=2, layout="[B, L]", dtypes=INDEX_DTYPES)
    if max_batch is not None:
        max_batch = check_int(max_batch, "max_batch", minimum=1)
    plans = as_dtype(plans, torch.int64).contiguous()
    order, offsets, group = (torch.from_numpy(a) for a in _core.bucket_by_plan(numpy_view(plans), max_batch))
    # Batches come group by group, groups numbered in order: a group's first batch starts
    # with its first request.
    opens_group = torch.ones(group.shape[0], dtype=torch.bool)
    opens_group[1:] = group[1:] != group[:-1]
    first_of_group = order[offsets[:-1][opens_group]]
    return PlanBuckets(order, offsets, group, plans[first_of_group])


def layer_sequence(plan: Tensor) -> list[int]:
    """The layers one request runs, in order: a skipped layer not at all, an executed one
    once, a repeated one twice in a row. Position ``i`` of this list is the request's
    ``i``-th layer execution and needs its own KV-cache entry.

    Args:
        plan: ``[L]`` int64 or int32 decisions of one request (a row of ``layer_plan``).
    """
    plan = check_tensor(plan, "plan", ndim=1, layout="[L]", dtypes=INDEX_DTYPES)
    values = plan.tolist()
    bad = [v for v in values if v not in (SKIP, EXECUTE, REPEAT)]
    if bad:
        raise ValueError(f"plan: expected values 0 (skip), 1 (execute) or 2 (repeat), got {bad[0]}")
    return [layer for layer, decision in enumerate(values) for _ in range(decision)]
