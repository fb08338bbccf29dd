"""asv benchmarks: expert placement for expert-parallel serving (``sparseroute.placement``).

The target shape is DeepSeek-V3 served on 4 nodes x 8 GPUs: 61 layers (58 of them MoE in
the model; all 61 here), 256 routed experts in 8 groups, 288 physical slots (32 redundant
experts, 9 per GPU). The load is skewed (``exp(6 u)``, ``u`` uniform), as measured expert
loads are.

``impl="torch"`` is a straightforward Python + torch implementation of the same
hierarchical algorithm, written here from its semantics (docs/placement.md), with the same
tie rules: it gives the same placement bit for bit (``python benches/benchmarks/placement.py``
checks that and prints both timings). Replication is vectorised over layers and nodes with
torch; the two balanced packings are Python loops, as in published implementations.
"""

from __future__ import annotations

import time

import torch

from sparseroute import placement

IMPLS = ["torch", "sparseroute"]
SHAPE = {"layers": 61, "experts": 256, "slots": 288, "nodes": 4, "gpus_per_node": 8, "groups": 8}


def skewed_load(layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(layers, experts, generator=g, dtype=torch.float64).mul(6).exp()


# --- the straightforward implementation ------------------------------------------------------


def python_pack(weights: list[float], bins: int, capacity: int) -> list[int]:
    """Balanced packing: heaviest first (lower index on ties), each item to the least-loaded
    bin with room (lower bin on ties)."""
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    load, filled, bin_of = [0.0] * bins, [0] * bins, [0] * len(weights)
    for item in order:
        best = min((b for b in range(bins) if filled[b] < capacity), key=lambda b: (load[b], b))
        bin_of[item] = best
        load[best] += weights[item]
        filled[best] += 1
    return bin_of


def torch_plan(
    load: torch.Tensor, slots: int, nodes: int, gpus_per_node: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(physical_to_logical [L, P], replica_counts [L, E])`` of the hierarchical method
    (``nodes = 1, groups = 1`` gives the global one)."""
    layers, experts = load.shape
    size, per_gpu = experts // groups, slots // (nodes * gpus_per_node)
    per_node = experts // nodes
    # 1. Groups to nodes by their summed load.
    group_load = load.view(layers, groups, size).sum(-1).tolist()
    node_of_group = torch.tensor([python_pack(row, nodes, groups // nodes) for row in group_load])
    node_of_expert = node_of_group.repeat_interleave(size, dim=1)
    # Each node's experts in ascending id order: rows of [L * N, E / N].
    members = torch.argsort(node_of_expert * experts + torch.arange(experts), dim=1).view(
        layers * nodes, per_node
    )
    member_load = load.gather(1, members.view(layers, experts)).view(layers * nodes, per_node)
    # 2. Replicate within nodes: each extra replica to the largest load per replica (argmax
    # returns the first maximum: the lower id).
    counts = torch.ones_like(member_load, dtype=torch.int64)
    rows = torch.arange(layers * nodes)
    for _ in range(slots // nodes - per_node):
        best = (member_load / counts).argmax(dim=1)
        counts[rows, best] += 1
    # 3. Replicas to the node's GPUs by balanced packing; slots ascending within a GPU.
    physical = torch.empty(layers * nodes, slots // nodes, dtype=torch.int64)
    for row, (ids, loads, reps) in enumerate(
        zip(members.tolist(), member_load.tolist(), counts.tolist(), strict=True)
    ):
        replica_ids = [e for e, c in zip(ids, reps, strict=True) for _ in range(c)]
        weights = [w / c for w, c in zip(loads, reps, strict=True) for _ in range(c)]
        bins = python_pack(weights, gpus_per_node, per_gpu)
        for gpu in range(gpus_per_node):
            held = sorted(e for e, b in zip(replica_ids, bins, strict=True) if b == gpu)
            physical[row, gpu * per_gpu : (gpu + 1) * per_gpu] = torch.tensor(held)
    replica_counts = torch.empty(layers, experts, dtype=torch.int64)
    replica_counts.scatter_(1, members.view(layers, experts), counts.view(layers, experts))
    return physical.view(layers, slots), replica_counts


# --- benchmarks -------------------------------------------------------------------------------


class PlanPlacement:
    params = (["hierarchical", "global"], IMPLS)
    param_names = ["method", "impl"]
    repeat = (3, 10, 30.0)
    number = 1
    timeout = 300

    def setup(self, method, impl):
        self.load = skewed_load(SHAPE["layers"], SHAPE["experts"])
        hierarchical = method == "hierarchical"
        self.nodes = SHAPE["nodes"] if hierarchical else 1
        self.groups = SHAPE["groups"] if hierarchical else 1

    def time_plan(self, method, impl):
        if impl == "torch":
            gpus_per_node = SHAPE["nodes"] * SHAPE["gpus_per_node"] // self.nodes
            torch_plan(self.load, SHAPE["slots"], self.nodes, gpus_per_node, self.groups)
        else:
            placement.plan_placement(
                self.load,
                SHAPE["slots"],
                SHAPE["nodes"],
                SHAPE["gpus_per_node"],
                num_groups=SHAPE["groups"],
                method=method,
            )


class Rebalance:
    """Incremental rebalancing after the load drifts (``load * exp(0.2 n)``, ``n`` normal)."""

    params = ([1.1, 1.05],)
    param_names = ["target"]
    repeat = (3, 10, 30.0)
    number = 1

    def setup(self, target):
        load = skewed_load(SHAPE["layers"], SHAPE["experts"])
        self.plan = placement.plan_placement(
            load, SHAPE["slots"], SHAPE["nodes"], SHAPE["gpus_per_node"], num_groups=SHAPE["groups"]
        )
        g = torch.Generator().manual_seed(1)
        self.new_load = load * torch.exp(0.2 * torch.randn(load.shape, generator=g, dtype=torch.float64))

    def time_rebalance(self, target):
        placement.rebalance(self.plan, self.new_load, target_imbalance=target)

    def track_moved_slots(self, target):
        return int(placement.rebalance(self.plan, self.new_load, target_imbalance=target).moved_slots.sum())


class ReplicaMap:
    params = ([16384], [8], list(placement.REPLICA_POLICIES))
    param_names = ["T", "k", "policy"]
    repeat = (3, 10, 20.0)
    number = 1

    def setup(self, T, k, policy):
        load = skewed_load(SHAPE["layers"], SHAPE["experts"])
        self.plan = placement.plan_placement(
            load, SHAPE["slots"], SHAPE["nodes"], SHAPE["gpus_per_node"], num_groups=SHAPE["groups"]
        )
        g = torch.Generator().manual_seed(2)
        self.experts = torch.randint(0, SHAPE["experts"], (T, k), generator=g)

    def time_replica_map(self, T, k, policy):
        placement.replica_map(self.experts, self.plan, 0, policy=policy)


def _best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    load = skewed_load(SHAPE["layers"], SHAPE["experts"])
    args = (SHAPE["slots"], SHAPE["nodes"], SHAPE["gpus_per_node"])
    ours = placement.plan_placement(load, *args, num_groups=SHAPE["groups"], method="hierarchical")
    theirs = torch_plan(load, *args, SHAPE["groups"])
    assert torch.equal(ours.physical_to_logical, theirs[0]) and torch.equal(ours.replica_counts, theirs[1])
    t_ours = _best_of(
        lambda: placement.plan_placement(load, *args, num_groups=SHAPE["groups"], method="hierarchical"), 20
    )
    t_torch = _best_of(lambda: torch_plan(load, *args, SHAPE["groups"]), 3)
    print(
        f"hierarchical plan, {SHAPE}: sparseroute {t_ours * 1e3:.2f} ms, python+torch {t_torch * 1e3:.1f} ms"
    )
    print(f"speed-up {t_torch / t_ours:.0f}x (same placement)")
