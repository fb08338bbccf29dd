"""Expert placement for expert-parallel MoE serving: which GPU holds which expert, and how
many copies (replicas) of each.

A layer has ``E`` logical experts with a measured load (tokens routed to each, or an EMA)
and ``P >= E`` physical expert slots spread evenly over ``G = num_nodes * gpus_per_node``
GPUs. A placement gives every slot one logical expert, every expert at least one slot, and
splits an expert's load evenly over its replicas; a GPU's load is the sum over its slots.
The planners follow the semantics of DeepSeek's EPLB (hierarchical and global policies) and
run in Rust (rust/core/src/placement.rs), all layers in parallel. docs/placement.md states
the exact rules, ties included, and where they match or differ from EPLB.

>>> plan = plan_placement(load, num_slots=288, num_nodes=4, gpus_per_node=8, num_groups=8)
>>> slots = replica_map(experts, plan, layer=3)   # gating's expert ids -> physical slots
>>> result = rebalance(plan, new_load, target_imbalance=1.05)   # move few slots
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from sparseroute import _core
from sparseroute._threads import get_num_threads
from sparseroute.ops import _eager
from sparseroute.ops._bridge import numpy_view
from sparseroute.ops._checks import INDEX_DTYPES, check_int, check_tensor

__all__ = [
    "METHODS",
    "REPLICA_POLICIES",
    "PlacementPlan",
    "Rebalance",
    "greedy_placement",
    "plan_placement",
    "rebalance",
    "replica_map",
]

METHODS = ("auto", "hierarchical", "global")
"""The planners of ``plan_placement``."""

REPLICA_POLICIES = ("round_robin", "load")
"""How ``replica_map`` picks among an expert's replicas."""

LOAD_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.uint8,
)


class PlacementPlan(NamedTuple):
    """A placement of every layer's experts on the physical slots of a cluster.

    Slot ``s`` is on GPU ``s // slots_per_gpu``; GPU ``g`` is on node ``g // gpus_per_node``.

    Attributes:
        physical_to_logical: ``[L, P]`` int64, the logical expert in each slot.
        logical_to_physical: ``[L, E, R]`` int64, each expert's slots in ascending order,
            -1 past its replicas (``R`` = the most replicas any expert has).
        replica_counts: ``[L, E]`` int64, replicas per expert (>= 1, summing to ``P``).
        gpu_load: ``[L, G]`` float64, the load of each GPU: the sum over its slots of
            ``load[e] / replica_counts[e]``.
        imbalance: ``[L]`` float64, max GPU load / mean GPU load (1 for an unloaded layer).
        lower_bound: ``[L]`` float64, a lower bound on ``imbalance`` for *any* placement of
            the layer's load on this cluster (see docs/placement.md for the derivation).
        num_nodes: nodes of the cluster.
        gpus_per_node: GPUs per node.
        num_groups: expert groups (``None``: every expert its own group).
        method: "hierarchical" (every group on one node), "global" (no node constraint)
            or "greedy" (the round-robin baseline of ``greedy_placement``).
    """

    physical_to_logical: Tensor
    logical_to_physical: Tensor
    replica_counts: Tensor
    gpu_load: Tensor
    imbalance: Tensor
    lower_bound: Tensor
    num_nodes: int
    gpus_per_node: int
    num_groups: int | None
    method: str

    @property
    def num_layers(self) -> int:
        return int(self.physical_to_logical.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.physical_to_logical.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.replica_counts.shape[1])

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus


class Rebalance(NamedTuple):
    """The result of ``rebalance``.

    Attributes:
        plan: the new placement.
        moved_slots: ``[L]`` int64, slots whose logical expert changed (weights to load).
        replanned: ``[L]`` bool, layers where the moves stopped short of the target and a
            full re-plan (renumbered to keep as many slots as it can) balanced better.
    """

    plan: PlacementPlan
    moved_slots: Tensor
    replanned: Tensor


def _check_load(load: object) -> Tensor:
    """``load`` as a contiguous float64 ``[L, E]`` CPU tensor (values are checked in Rust)."""
    if isinstance(load, Tensor) and load.device.type != "cpu":
        # Planning runs on the host; loads counted on a GPU are copied over (one sync per
        # plan, which serving does between steps anyway).
        load = load.detach().cpu()
    tensor = check_tensor(load, "load", ndim=2, layout="[L, E]", dtypes=LOAD_DTYPES)
    if tensor.shape[1] < 1:
        raise ValueError(f"load: expected at least one expert (E >= 1), got shape {tuple(tensor.shape)}")
    return tensor.detach().to(torch.float64).contiguous()


def _check_topology(
    num_experts: int, num_slots: object, num_nodes: object, gpus_per_node: object, num_groups: object
) -> tuple[int, int, int, int | None]:
    num_nodes = check_int(num_nodes, "num_nodes", minimum=1)
    gpus_per_node = check_int(gpus_per_node, "gpus_per_node", minimum=1)
    num_slots = check_int(num_slots, "num_slots", minimum=num_experts, what=" (every expert needs a slot)")
    gpus = num_nodes * gpus_per_node
    if num_slots % gpus:
        raise ValueError(
            f"num_slots: expected a multiple of the GPU count num_nodes * gpus_per_node = {gpus}, "
            f"got {num_slots}"
        )
    if num_groups is not None:
        num_groups = check_int(num_groups, "num_groups", minimum=1)
        if num_experts % num_groups:
            raise ValueError(f"num_groups: expected a divisor of E = {num_experts}, got {num_groups}")
    return num_slots, num_nodes, gpus_per_node, num_groups


_Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
"""A plan's kernel outputs: physical_to_logical, replica_counts, gpu_load, imbalance, lower_bound."""


def _empty_outputs(layers: int, experts: int, slots: int, gpus: int) -> _Outputs:
    return (
        torch.empty(layers, slots, dtype=torch.int64),
        torch.empty(layers, experts, dtype=torch.int64),
        torch.empty(layers, gpus, dtype=torch.float64),
        torch.empty(layers, dtype=torch.float64),
        torch.empty(layers, dtype=torch.float64),
    )


def _views(outputs: _Outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    p2l, counts, gpu_load, imbalance, lower_bound = outputs
    return (
        numpy_view(p2l),
        numpy_view(counts),
        numpy_view(gpu_load),
        numpy_view(imbalance),
        numpy_view(lower_bound),
    )


def _finish(
    outputs: _Outputs, num_nodes: int, gpus_per_node: int, num_groups: int | None, method: str
) -> PlacementPlan:
    """Adds ``logical_to_physical`` to the kernel's outputs."""
    physical_to_logical, replica_counts, gpu_load, imbalance, lower_bound = outputs
    layers, experts = replica_counts.shape
    # The replica table is as wide as the most replicated expert, so its size is known
    # only now; planning runs on the host anyway.
    width = int(replica_counts.max()) if replica_counts.numel() else 1
    table = torch.empty(layers, experts, width, dtype=torch.int64)
    _core.logical_to_physical(numpy_view(physical_to_logical), numpy_view(table))
    return PlacementPlan(
        physical_to_logical,
        table,
        replica_counts,
        gpu_load,
        imbalance,
        lower_bound,
        num_nodes,
        gpus_per_node,
        num_groups,
        method,
    )


def plan_placement(
    load: Tensor,
    num_slots: int,
    num_nodes: int,
    gpus_per_node: int,
    *,
    num_groups: int | None = None,
    method: str = "auto",
) -> PlacementPlan:
    """Replicates and places every layer's experts, EPLB-style.

    ``method="hierarchical"``: groups of ``E / num_groups`` consecutive experts are packed
    onto nodes by balanced packing of their summed load (equally many groups per node),
    each node replicates its experts into its ``P / num_nodes`` slots (every extra replica
    to the expert with the highest load per replica), and packs the replicas onto its GPUs
    by balanced packing. Every group stays on one node, so group-limited routing (DeepSeek-V3)
    keeps its tokens on few nodes. ``"global"``: replicate all experts into all ``P`` slots,
    then pack onto all GPUs. ``"auto"``: hierarchical when ``num_groups`` is given and
    ``num_nodes`` divides it, global otherwise (EPLB's rule).

    Args:
        load: ``[L, E]`` per-layer expert load (token counts or an EMA), finite and >= 0,
            any float or integer dtype, on any device (it is copied to the CPU).
        num_slots: physical expert slots ``P`` per layer: at least ``E``, a multiple of the
            GPU count.
        num_nodes: nodes ``N``.
        gpus_per_node: GPUs per node (``G = N * gpus_per_node``).
        num_groups: expert groups (a divisor of ``E``); ``None`` = every expert its own group.
        method: "auto", "hierarchical" or "global".

    Returns:
        A ``PlacementPlan``; ``plan.method`` names the method used.

    Raises:
        TypeError, ValueError: bad arguments (the message names the argument).
        InvalidInputError: a negative, NaN or infinite load.
    """
    tensor = _check_load(load)
    layers, experts = tensor.shape
    num_slots, num_nodes, gpus_per_node, num_groups = _check_topology(
        experts, num_slots, num_nodes, gpus_per_node, num_groups
    )
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    groups = experts if num_groups is None else num_groups
    if method == "hierarchical" and groups % num_nodes:
        if num_groups is None:
            raise ValueError(
                f"num_nodes: expected a divisor of E = {experts} for the hierarchical method without "
                f"num_groups (every expert its own group, equally many per node), got {num_nodes}"
            )
        raise ValueError(
            f"num_groups: expected a multiple of num_nodes = {num_nodes} for the hierarchical method "
            f"(equally many groups per node), got {num_groups}"
        )
    outputs = _empty_outputs(layers, experts, num_slots, num_nodes * gpus_per_node)
    used = _core.plan_placement(
        numpy_view(tensor),
        num_slots,
        num_nodes,
        gpus_per_node,
        num_groups,
        method,
        *_views(outputs),
        get_num_threads(),
    )
    return _finish(outputs, num_nodes, gpus_per_node, num_groups, used)


def greedy_placement(load: Tensor, num_slots: int, num_nodes: int, gpus_per_node: int) -> PlacementPlan:
    """The straightforward baseline, for comparison: one replica per expert, the ``P - E``
    extra replicas to the experts in order of load descending (lower id on ties, cycling
    when ``P - E > E``), and the sequence "experts 0..E-1, then the extras" dealt onto the
    GPUs round-robin (item ``i`` to GPU ``i mod G``, position ``i div G``).

    Arguments and errors as for ``plan_placement``; ``plan.method`` is "greedy".
    """
    tensor = _check_load(load)
    layers, experts = tensor.shape
    num_slots, num_nodes, gpus_per_node, _ = _check_topology(
        experts, num_slots, num_nodes, gpus_per_node, None
    )
    outputs = _empty_outputs(layers, experts, num_slots, num_nodes * gpus_per_node)
    _core.greedy_placement(
        numpy_view(tensor),
        num_slots,
        num_nodes,
        gpus_per_node,
        *_views(outputs),
        get_num_threads(),
    )
    return _finish(outputs, num_nodes, gpus_per_node, None, "greedy")


def _check_plan(plan: object) -> PlacementPlan:
    if not isinstance(plan, PlacementPlan):
        raise TypeError(f"plan: expected a PlacementPlan, got {type(plan).__name__}")
    check_tensor(plan.physical_to_logical, "plan", ndim=2, layout="[L, P]", dtypes=(torch.int64,))
    return plan


def rebalance(
    plan: PlacementPlan,
    load: Tensor,
    *,
    target_imbalance: float,
    max_moves: int | None = None,
) -> Rebalance:
    """Adapts ``plan`` to a new ``load`` by moving as few slots as it finds necessary.

    Per layer, while ``max / mean`` GPU load is above ``target_imbalance``, the hottest GPU
    sheds load by the best of three greedy moves: give one of its slots (whose expert has
    another replica) to another expert; give one of its experts an extra replica in a slot
    elsewhere (whose expert has another replica); or swap one of its slots with a lighter
    replica on another GPU. A move that reaches the target with the fewest changed slots
    wins; otherwise the one leaving the lowest maximum. A hierarchical plan keeps every
    expert on its node. If the moves stop short of the target (no move helps, or
    ``max_moves`` are used up), the layer is re-planned from scratch with the plan's method,
    renumbered so that as many slots as possible keep their expert, and the re-plan is
    taken if its maximum load is lower (``replanned``). Layers already within the target
    are left untouched.

    Args:
        plan: the current placement (from ``plan_placement``, ``greedy_placement`` or an
            earlier ``rebalance``).
        load: ``[L, E]`` the new load, same ``L`` and ``E`` as ``plan``.
        target_imbalance: the max / mean GPU load to reach, >= 1.
        max_moves: moves (one swap or reassignment each) allowed per layer before falling
            back; default ``P``.

    Returns:
        ``Rebalance(plan, moved_slots, replanned)``. ``plan.method`` is the old method,
        except that a greedy plan comes back as "global" (its moves and re-plan follow the
        global rules, and the result is no longer round-robin).
    """
    plan = _check_plan(plan)
    tensor = _check_load(load)
    if tuple(tensor.shape) != (plan.num_layers, plan.num_experts):
        raise ValueError(
            f"load: expected shape [L, E] = {(plan.num_layers, plan.num_experts)} (the plan's layers "
            f"and experts), got {tuple(tensor.shape)}"
        )
    if isinstance(target_imbalance, bool) or not isinstance(target_imbalance, (int, float)):
        raise TypeError(f"target_imbalance: expected a float, got {type(target_imbalance).__name__}")
    if not (math.isfinite(target_imbalance) and target_imbalance >= 1.0):
        raise ValueError(
            f"target_imbalance: expected a finite value >= 1 (max GPU load / mean GPU load), "
            f"got {target_imbalance}"
        )
    moves = plan.num_slots if max_moves is None else check_int(max_moves, "max_moves", minimum=0)
    method = "hierarchical" if plan.method == "hierarchical" else "global"
    layers, experts = tensor.shape
    outputs = _empty_outputs(layers, experts, plan.num_slots, plan.num_gpus)
    moved = torch.empty(layers, dtype=torch.int64)
    replanned = torch.empty(layers, dtype=torch.uint8)
    _core.rebalance_placement(
        numpy_view(plan.physical_to_logical.contiguous()),
        numpy_view(tensor),
        plan.num_nodes,
        plan.gpus_per_node,
        plan.num_groups,
        method,
        float(target_imbalance),
        moves,
        *_views(outputs),
        numpy_view(moved),
        numpy_view(replanned),
        get_num_threads(),
    )
    new_plan = _finish(outputs, plan.num_nodes, plan.gpus_per_node, plan.num_groups, method)
    return Rebalance(new_plan, moved, replanned.bool())


# --- sparseroute::replica_map ----------------------------------------------------------------


@_eager.custom_op("replica_map", device_types="cpu")
def _replica_map_op(
    experts: Tensor,
    logical_to_physical: Tensor,
    replica_counts: Tensor,
    num_slots: int,
    slots_per_gpu: int,
    policy: str,
) -> Tensor:
    """``experts`` (int64, -1 = empty) mapped to physical slots with one layer's replica
    table; see ``replica_map``."""
    experts = experts.contiguous()
    slots = torch.empty_like(experts, memory_format=torch.contiguous_format)
    _core.replica_map(
        numpy_view(experts),
        numpy_view(logical_to_physical.contiguous()),
        numpy_view(replica_counts.contiguous()),
        num_slots,
        slots_per_gpu,
        policy,
        numpy_view(slots),
    )
    return slots


@_replica_map_op.register_fake
def _(
    experts: Tensor,
    logical_to_physical: Tensor,
    replica_counts: Tensor,
    num_slots: int,
    slots_per_gpu: int,
    policy: str,
) -> Tensor:
    return torch.empty_like(experts, memory_format=torch.contiguous_format)


def replica_map(experts: Tensor, plan: PlacementPlan, layer: int, *, policy: str = "round_robin") -> Tensor:
    """Maps the logical expert ids chosen by gating to physical slots of ``plan``'s layer.

    ``policy="round_robin"``: the n-th occurrence of expert ``e`` in row-major order goes to
    its replica ``n mod r_e`` (replicas in ascending slot order), so an expert's tokens are
    spread evenly over its replicas. ``policy="load"``: each occurrence, in row-major
    order, goes to the replica whose GPU has received the fewest tokens so far in this call;
    ties go to the replica that has itself received fewer (two replicas may share a GPU),
    then to the lower replica number. Both are deterministic.

    Args:
        experts: ``[T, k]`` int64 or int32 logical expert ids from gating, -1 = empty slot.
        plan: the placement.
        layer: which layer of ``plan``, in ``[0, L)``.
        policy: "round_robin" or "load".

    Returns:
        ``[T, k]`` int64 physical slot ids (-1 where ``experts`` is -1).

    Raises:
        InvalidInputError: an expert id outside ``[0, E)`` other than -1.
    """
    experts = check_tensor(experts, "experts", ndim=2, layout="[T, k]", dtypes=INDEX_DTYPES)
    plan = _check_plan(plan)
    # The plan's sizes from its fields rather than its properties: torch.compile before
    # torch 2.11 cannot trace a property of a NamedTuple.
    num_layers, num_slots = plan.physical_to_logical.shape
    layer = check_int(layer, "layer", minimum=0, maximum=num_layers - 1)
    if policy not in REPLICA_POLICIES:
        raise ValueError(f"policy: expected one of {REPLICA_POLICIES}, got {policy!r}")
    slots: Tensor = _eager.call(
        "replica_map",
        experts.to(torch.int64),
        plan.logical_to_physical[layer],
        plan.replica_counts[layer],
        num_slots,
        num_slots // (plan.num_nodes * plan.gpus_per_node),
        policy,
    )
    return slots
