"""Expert caches for offloaded MoE serving: routing traces, policy replay, sweeps and plots.

On single-GPU or edge serving only some experts fit in GPU memory; the others are loaded
when a token routes to them. This module replays recorded routing through a cache of
experts under an eviction policy and counts hits, misses, bytes moved and stalls. The
replay runs in Rust (rust/core/src/cache.rs) with the GIL released; docs/cache.md has the
exact model and every policy's rule.

The model in short: a step visits layers ``0..L-1`` in order; each layer's experts must be
resident together while it runs, so they are pinned (none of them is evicted for another).
Within a layer, experts are handled in ascending id: a resident one is a hit, a missing
one a miss, loaded after evicting the policy's victims until it fits. A layer with a miss
is a stall. The cache starts empty and loads only on a miss.

>>> trace = RoutingTrace.from_lists([[[0, 1], [2]], [[1, 3], [2]]], num_experts=4)
>>> simulate(trace, capacity=3, policy="lru")
CacheStats(hits=2, misses=4, hit_ratio=0.333..., bytes_moved=4, stalls=3, evictions=1)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy.typing as npt
import torch
from torch import Tensor

from sparseroute import _core
from sparseroute.ops._bridge import numpy_view
from sparseroute.ops._checks import INDEX_DTYPES, check_int, check_tensor

__all__ = [
    "CAPACITY_UNITS",
    "POLICIES",
    "CacheAccess",
    "CacheStats",
    "ExpertCache",
    "RoutingTrace",
    "SweepRow",
    "format_table",
    "plot_hit_ratio",
    "run_cache_sim",
    "simulate",
    "sweep",
]

POLICIES = ("lru", "lfu", "lifo", "belady", "priority")
CAPACITY_UNITS = ("experts", "bytes")
#: The ``format`` field of a trace file's header line.
TRACE_FORMAT = "sparseroute-routing-trace"
TRACE_VERSION = 1
DEFAULT_DECAY = 0.9

Key = tuple[int, int]
ProgressFn = Callable[[int, int], object]


def _check_policy(policy: object, allowed: Sequence[str] = POLICIES) -> str:
    if not isinstance(policy, str) or policy not in allowed:
        raise ValueError(f"policy: expected one of {tuple(allowed)}, got {policy!r}")
    return policy


def _check_unit(capacity_unit: object) -> str:
    if not isinstance(capacity_unit, str) or capacity_unit not in CAPACITY_UNITS:
        raise ValueError(f"capacity_unit: expected one of {CAPACITY_UNITS}, got {capacity_unit!r}")
    return capacity_unit


class RoutingTrace:
    """Which experts every layer used at every step: per step, per layer, a sorted set of
    expert ids in ``[0, num_experts)``.

    Stored flat: ``experts`` (int64) holds the ids of visit ``v = step * num_layers + layer``
    at ``experts[offsets[v]:offsets[v + 1]]``, ascending and distinct. Build one with
    ``from_lists``, ``from_experts`` (routing outputs), ``from_dense`` (one tensor) or
    ``load`` (a trace file), or directly from the two tensors.
    """

    def __init__(self, experts: Tensor, offsets: Tensor, num_layers: int, num_experts: int) -> None:
        self.num_layers = check_int(num_layers, "num_layers", minimum=1)
        self.num_experts = check_int(num_experts, "num_experts", minimum=1)
        experts = check_tensor(experts, "experts", ndim=1, layout="[N]", dtypes=INDEX_DTYPES)
        offsets = check_tensor(offsets, "offsets", ndim=1, layout="[S * L + 1]", dtypes=INDEX_DTYPES)
        experts = experts.to(torch.int64).contiguous()
        offsets = offsets.to(torch.int64).contiguous()
        visits = offsets.shape[0] - 1
        if visits < 1 or visits % self.num_layers:
            raise ValueError(
                f"offsets: expected num_steps * {self.num_layers} + 1 values with num_steps >= 1 "
                f"(an empty trace has no steps), got {offsets.shape[0]}"
            )
        if int(offsets[0]) != 0 or int(offsets[-1]) != experts.shape[0]:
            raise ValueError(
                f"offsets: expected values from 0 to {experts.shape[0]} (the length of experts), "
                f"got {int(offsets[0])} to {int(offsets[-1])}"
            )
        sizes = offsets.diff()
        if bool((sizes < 0).any()):
            raise ValueError("offsets: expected non-decreasing values")
        if experts.numel():
            low, high = int(experts.min()), int(experts.max())
            if low < 0 or high >= self.num_experts:
                bad = low if low < 0 else high
                raise ValueError(f"experts: expected ids in [0, {self.num_experts}), got {bad}")
        # Within a visit each id must exceed the one before it: compare neighbours, except
        # across visit boundaries.
        first_of_visit = torch.zeros(experts.shape[0], dtype=torch.bool)
        first_of_visit[offsets[:-1][sizes > 0]] = True
        if experts.shape[0] > 1 and not bool(((experts.diff() > 0) | first_of_visit[1:]).all()):
            raise ValueError("experts: expected the ids of each (step, layer) sorted and distinct")
        self.experts = experts
        self.offsets = offsets

    # ---- construction ----

    @classmethod
    def from_lists(
        cls, steps: Sequence[Sequence[Sequence[int]]], *, num_experts: int | None = None
    ) -> RoutingTrace:
        """``steps[s][l]``: the expert ids layer ``l`` used at step ``s`` (any order,
        duplicates count once). ``num_experts`` defaults to the largest id + 1."""
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or len(steps) == 0:
            raise ValueError("steps: expected a non-empty list of steps (each a list over layers)")
        num_layers = None
        flat: list[int] = []
        offsets = [0]
        for s, step in enumerate(steps):
            if isinstance(step, (str, bytes)) or not isinstance(step, Sequence):
                raise TypeError(f"steps[{s}]: expected a list over layers, got {type(step).__name__}")
            if num_layers is None:
                num_layers = len(step)
                if num_layers == 0:
                    raise ValueError("steps[0]: expected at least one layer, got none")
            elif len(step) != num_layers:
                raise ValueError(f"steps[{s}]: expected {num_layers} layers (as steps[0]), got {len(step)}")
            for layer, ids in enumerate(step):
                if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, Tensor)):
                    raise TypeError(
                        f"steps[{s}][{layer}]: expected a list of expert ids, got {type(ids).__name__}"
                    )
                values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
                for e in values:
                    if isinstance(e, bool) or not isinstance(e, int):
                        raise TypeError(f"steps[{s}][{layer}]: expected int expert ids, got {e!r}")
                    if e < 0 or (num_experts is not None and e >= num_experts):
                        bound = f"[0, {num_experts})" if num_experts is not None else ">= 0"
                        raise ValueError(f"steps[{s}][{layer}]: expected expert ids {bound}, got {e}")
                flat.extend(sorted(set(values)))
                offsets.append(len(flat))
        assert num_layers is not None
        if num_experts is None:
            num_experts = max(flat, default=0) + 1
        return cls(
            torch.tensor(flat, dtype=torch.int64),
            torch.tensor(offsets, dtype=torch.int64),
            num_layers,
            num_experts,
        )

    @classmethod
    def from_dense(cls, experts: Tensor, *, num_experts: int | None = None) -> RoutingTrace:
        """``experts[s, l]``: ``[S, L, k]`` int ids the layer ``l`` used at step ``s``
        (``-1`` = none, duplicates count once). ``num_experts`` defaults to the largest
        id + 1."""
        experts = check_tensor(experts, "experts", ndim=3, layout="[S, L, k]", dtypes=INDEX_DTYPES)
        steps, layers, k = experts.shape
        if steps == 0 or layers == 0:
            raise ValueError(
                f"experts: expected at least one step and one layer, got shape {tuple(experts.shape)}"
            )
        experts = experts.to(torch.int64).reshape(steps * layers, k)
        num_experts = _check_ids(experts, "experts", num_experts)
        ordered = experts.sort(dim=1).values
        keep = ordered >= 0
        keep[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
        offsets = torch.zeros(steps * layers + 1, dtype=torch.int64)
        offsets[1:] = keep.sum(dim=1).cumsum(0)
        return cls(ordered[keep], offsets, layers, num_experts)

    @classmethod
    def from_experts(
        cls, steps: Sequence[Sequence[Tensor]], *, num_experts: int | None = None
    ) -> RoutingTrace:
        """From routing outputs: ``steps[s][l]`` is the ``experts`` tensor ``[T, k]`` (int64
        or int32, as returned by ``sparseroute.topk_gating``) of layer ``l`` at step ``s``;
        the layer's set is the unique ids in it (``-1`` = an empty slot, ignored).
        ``num_experts`` defaults to the largest id + 1."""
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or len(steps) == 0:
            raise ValueError("steps: expected a non-empty list of steps (each a list of [T, k] tensors)")
        num_layers = len(steps[0])
        if num_layers == 0:
            raise ValueError("steps[0]: expected at least one layer, got none")
        chunks: list[Tensor] = []
        sizes: list[int] = []
        for s, step in enumerate(steps):
            if len(step) != num_layers:
                raise ValueError(f"steps[{s}]: expected {num_layers} layers (as steps[0]), got {len(step)}")
            for layer, tensor in enumerate(step):
                name = f"steps[{s}][{layer}]"
                tensor = check_tensor(tensor, name, ndim=2, layout="[T, k]", dtypes=INDEX_DTYPES)
                _check_ids(tensor, name, num_experts)
                ids = torch.unique(tensor.to(torch.int64))
                ids = ids[ids >= 0]
                chunks.append(ids)
                sizes.append(ids.shape[0])
        flat = torch.cat(chunks)
        if num_experts is None:
            num_experts = int(flat.max()) + 1 if flat.numel() else 1
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
        return cls(flat, offsets, num_layers, num_experts)

    # ---- reading ----

    @property
    def num_steps(self) -> int:
        return (self.offsets.shape[0] - 1) // self.num_layers

    @property
    def num_requests(self) -> int:
        """(step, layer, expert) uses in the trace."""
        return int(self.experts.shape[0])

    def __len__(self) -> int:
        return self.num_steps

    def layer(self, step: int, layer: int) -> list[int]:
        """The sorted expert ids that ``layer`` used at ``step``."""
        check_int(step, "step", minimum=0, maximum=self.num_steps - 1)
        check_int(layer, "layer", minimum=0, maximum=self.num_layers - 1)
        v = step * self.num_layers + layer
        return [int(e) for e in self.experts[int(self.offsets[v]) : int(self.offsets[v + 1])].tolist()]

    def to_lists(self) -> list[list[list[int]]]:
        """``steps[s][l]``: the sorted ids layer ``l`` used at step ``s``."""
        ids: list[int] = self.experts.tolist()
        bounds: list[int] = self.offsets.tolist()
        visits = [ids[bounds[v] : bounds[v + 1]] for v in range(len(bounds) - 1)]
        return [visits[s * self.num_layers : (s + 1) * self.num_layers] for s in range(self.num_steps)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        return (
            (self.num_layers, self.num_experts) == (other.num_layers, other.num_experts)
            and torch.equal(self.offsets, other.offsets)
            and torch.equal(self.experts, other.experts)
        )

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(num_steps={self.num_steps}, num_layers={self.num_layers}, "
            f"num_experts={self.num_experts}, num_requests={self.num_requests})"
        )

    # ---- files ----

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the trace as JSON lines: a header object
        ``{"format": "sparseroute-routing-trace", "version": 1, "num_layers": L,
        "num_experts": E}``, then one line per step, a list over layers of sorted ids."""
        header = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
        }
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for step in self.to_lists():
                f.write(json.dumps(step, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingTrace:
        """Reads a file written by ``save``. The header line may be left out: then
        ``num_layers`` is the length of the first step and ``num_experts`` the largest id + 1.
        Blank lines are skipped."""
        num_layers: int | None = None
        num_experts: int | None = None
        steps: list[list[list[int]]] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{os.fspath(path)}, line {number}"
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"path: {where}: expected JSON, got {err}") from None
                if isinstance(value, dict):
                    if steps or num_layers is not None:
                        raise ValueError(f"path: {where}: expected a step (a list over layers), got a header")
                    num_layers, num_experts = _read_header(value, where)
                    continue
                if num_layers is None and isinstance(value, list):
                    num_layers = len(value)  # no header: the first step sets the layer count
                if not isinstance(value, list) or not all(
                    isinstance(ids, list) and all(type(e) is int for e in ids) for ids in value
                ):
                    raise ValueError(f"path: {where}: expected a step, a list over layers of int id lists")
                if num_layers is not None and len(value) != num_layers:
                    raise ValueError(f"path: {where}: expected {num_layers} layers, got {len(value)}")
                steps.append(value)
        if not steps:
            raise ValueError(f"path: expected at least one step in {os.fspath(path)}, got none (empty trace)")
        try:
            return cls.from_lists(steps, num_experts=num_experts)
        except (TypeError, ValueError) as err:
            raise ValueError(f"path: {os.fspath(path)}: {err}") from None


def _read_header(value: dict[str, object], where: str) -> tuple[int, int]:
    if value.get("format") != TRACE_FORMAT or value.get("version") != TRACE_VERSION:
        raise ValueError(
            f"path: {where}: expected a header with format {TRACE_FORMAT!r} and version {TRACE_VERSION}, "
            f"got {value!r}"
        )
    sizes = []
    for field in ("num_layers", "num_experts"):
        size = value.get(field)
        if type(size) is not int or size < 1:
            raise ValueError(f"path: {where}: expected {field} >= 1 in the header, got {size!r}")
        sizes.append(size)
    return sizes[0], sizes[1]


def _check_ids(experts: Tensor, name: str, num_experts: int | None) -> int:
    """Ids must be ``-1`` (none) or in ``[0, num_experts)``; returns ``num_experts``
    (default: the largest id + 1, at least 1)."""
    if num_experts is not None:
        check_int(num_experts, "num_experts", minimum=1)
    if experts.numel() == 0:
        return num_experts if num_experts is not None else 1
    low, high = int(experts.min()), int(experts.max())
    if low < -1:
        raise ValueError(f"{name}: expected expert ids >= -1 (-1 = none), got {low}")
    if num_experts is not None and high >= num_experts:
        raise ValueError(f"{name}: expected expert ids < num_experts = {num_experts}, got {high}")
    return num_experts if num_experts is not None else max(high + 1, 1)


# ---- cache configuration ----


def _per_key(value: object, name: str, num_layers: int, num_experts: int, dtype: torch.dtype) -> Tensor:
    """A per-(layer, expert) table as a flat contiguous tensor of ``num_layers *
    num_experts`` values; a scalar applies to every key."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a number or an [L, E] table, got a bool")
    if isinstance(value, (int, float)):
        table = torch.full((num_layers, num_experts), value, dtype=dtype)
    else:
        try:
            table = torch.as_tensor(value, dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as err:
            got = type(value).__name__
            raise TypeError(f"{name}: expected a number or an [L, E] table, got {got}") from err
        if table.shape != (num_layers, num_experts):
            raise ValueError(
                f"{name}: expected shape [L, E] = [{num_layers}, {num_experts}], got {list(table.shape)}"
            )
    return table.reshape(-1).contiguous()


def _expert_bytes(value: object, num_layers: int, num_experts: int, capacity_unit: str) -> Tensor | None:
    if value is None:
        if capacity_unit == "bytes":
            raise ValueError("expert_bytes: required with capacity_unit='bytes' (the size of each expert)")
        return None
    if isinstance(value, float) or (isinstance(value, Tensor) and value.is_floating_point()):
        raise TypeError("expert_bytes: expected integer sizes")
    table = _per_key(value, "expert_bytes", num_layers, num_experts, torch.int64)
    if table.numel() and int(table.min()) < 1:
        raise ValueError(f"expert_bytes: expected sizes >= 1, got {int(table.min())}")
    return table


def _aliases(value: object, num_layers: int, num_experts: int) -> Tensor | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"aliases: expected a mapping {{(layer, expert): (target layer, target expert)}}, "
            f"got {type(value).__name__}"
        )
    rows = []
    for key, target in value.items():
        row: list[int] = []
        for pair in (key, target):
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
            ):
                raise TypeError(f"aliases: expected (layer, expert) int pairs, got {pair!r}")
            layer, expert = pair
            if not (0 <= layer < num_layers and 0 <= expert < num_experts):
                bounds = f"[0, {num_layers}) x [0, {num_experts})"
                raise ValueError(f"aliases: expected (layer, expert) in {bounds}, got {pair!r}")
            row.extend(pair)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)


def _decay(value: object) -> float:
    if value is None:
        return DEFAULT_DECAY
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"decay: expected 0 < decay <= 1, got {value!r}")
    return float(value)


def _scores(value: object, num_layers: int, num_experts: int) -> Tensor | None:
    if value is None:
        return None
    table = _per_key(value, "scores", num_layers, num_experts, torch.float64)
    if not bool(table.isfinite().all()):
        raise ValueError("scores: expected finite values")
    return table


def _view(t: Tensor | None) -> npt.NDArray[Any] | None:
    return None if t is None else numpy_view(t)


class CacheStats(NamedTuple):
    """The counts of a replay: ``hits + misses`` requests ((step, layer, expert) uses,
    counting once experts that share one object through ``aliases``), ``hit_ratio = hits /
    (hits + misses)`` (0 without requests), ``bytes_moved`` (the sizes of the experts
    loaded; the miss count when sizes are not given), ``stalls`` (layers with a miss) and
    ``evictions``."""

    hits: int
    misses: int
    hit_ratio: float
    bytes_moved: int
    stalls: int
    evictions: int

    @classmethod
    def _from_core(cls, counts: tuple[int, int, int, int, int]) -> CacheStats:
        hits, misses, bytes_moved, stalls, evictions = counts
        ratio = hits / (hits + misses) if hits + misses else 0.0
        return cls(hits, misses, ratio, bytes_moved, stalls, evictions)


def simulate(
    trace: RoutingTrace,
    capacity: int,
    policy: str,
    *,
    capacity_unit: str = "experts",
    expert_bytes: int | Tensor | Sequence[Sequence[int]] | None = None,
    aliases: Mapping[Key, Key] | None = None,
    window: int | None = None,
    scores: Tensor | Sequence[Sequence[float]] | None = None,
    decay: float | None = None,
    progress: ProgressFn | None = None,
) -> CacheStats:
    """Replays ``trace`` through an empty cache of ``capacity`` experts (or bytes, with
    ``capacity_unit="bytes"``) under ``policy``.

    Args:
        policy: ``"lru"`` (least recently used), ``"lfu"`` (fewest uses since the start,
            ties: LRU), ``"lifo"`` (the latest loaded), ``"belady"`` (farthest next use
            within ``window`` steps; ties and objects beyond the window: LRU) or
            ``"priority"`` (lowest ``(score, decayed frequency)``, ties: LRU). Every final
            tie goes to the smaller (layer, expert).
        expert_bytes: an int (every expert) or an ``[L, E]`` table of sizes in bytes;
            default 1 each, so ``bytes_moved`` counts loads. Required with bytes capacity.
        aliases: ``{(layer, expert): (target layer, target expert)}``: the key shares its
            target's resident copy (an expert shared across layers). Targets may not be
            aliases; a key and its target must have the same size and score.
        window: belady only: steps seen ahead (``None``: the whole trace, which minimizes
            misses for uniform sizes; 0: nothing, which is LRU).
        scores: priority only: ``[L, E]`` (or a scalar), higher = keep (e.g. a predictor's
            probability of use); default 0.
        decay: priority only: the weight a use keeps per step, in (0, 1]; default 0.9.
        progress: called as ``progress(steps_done, num_steps)`` during the replay.

    Raises ``ValueError`` (``sparseroute.InvalidInputError`` from the kernel) when a layer
    needs more capacity than there is, naming the first such (step, layer).
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace: expected a RoutingTrace, got {type(trace).__name__}")
    check_int(capacity, "capacity", minimum=1)
    _check_policy(policy)
    unit = _check_unit(capacity_unit)
    if window is not None:
        if policy != "belady":
            raise ValueError(f"window: only policy 'belady' looks ahead, got policy {policy!r}")
        check_int(window, "window", minimum=0)
    if policy != "priority" and (scores is not None or decay is not None):
        raise ValueError(f"scores, decay: only used by policy 'priority', got policy {policy!r}")
    layers, experts = trace.num_layers, trace.num_experts
    sizes = _expert_bytes(expert_bytes, layers, experts, unit)
    alias_rows = _aliases(aliases, layers, experts)
    score_table = _scores(scores, layers, experts)
    steps = trace.num_steps
    report = None if progress is None else (lambda done: progress(done, steps))
    counts = _core.simulate_cache(
        numpy_view(trace.experts),
        numpy_view(trace.offsets),
        layers,
        experts,
        capacity,
        unit,
        policy,
        window,
        _view(sizes),
        _view(alias_rows),
        _view(score_table),
        _decay(decay),
        report,
        max(1, math.ceil(steps / 100)),
    )
    return CacheStats._from_core(counts)


class SweepRow(NamedTuple):
    """One (policy, capacity) cell of a sweep with its ``CacheStats`` fields."""

    policy: str
    capacity: int
    hits: int
    misses: int
    hit_ratio: float
    bytes_moved: int
    stalls: int
    evictions: int


def sweep(
    trace: RoutingTrace,
    capacities: Sequence[int],
    policies: Sequence[str] = POLICIES,
    *,
    capacity_unit: str = "experts",
    expert_bytes: int | Tensor | Sequence[Sequence[int]] | None = None,
    aliases: Mapping[Key, Key] | None = None,
    window: int | None = None,
    scores: Tensor | Sequence[Sequence[float]] | None = None,
    decay: float | None = None,
    progress: ProgressFn | None = None,
) -> list[SweepRow]:
    """``simulate`` for every policy and capacity: rows by policy (in the order given),
    then by capacity (in the order given). ``window`` goes to belady, ``scores`` and
    ``decay`` to priority. ``progress(steps_done, total)`` counts the steps of all replays."""
    if isinstance(capacities, int) or not isinstance(capacities, Sequence) or not capacities:
        raise ValueError(f"capacities: expected a non-empty list of ints, got {capacities!r}")
    for capacity in capacities:
        check_int(capacity, "capacities", minimum=1)
    if isinstance(policies, str) or not isinstance(policies, Sequence) or not policies:
        raise ValueError(f"policies: expected a non-empty list of policy names, got {policies!r}")
    for policy in policies:
        _check_policy(policy)
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace: expected a RoutingTrace, got {type(trace).__name__}")
    total = len(policies) * len(capacities) * trace.num_steps
    rows = []
    for p, policy in enumerate(policies):
        for c, capacity in enumerate(capacities):
            done_before = (p * len(capacities) + c) * trace.num_steps

            def report(done: int, _steps: int, done_before: int = done_before) -> None:
                if progress is not None:
                    progress(done_before + done, total)

            stats = simulate(
                trace,
                capacity,
                policy,
                capacity_unit=capacity_unit,
                expert_bytes=expert_bytes,
                aliases=aliases,
                window=window if policy == "belady" else None,
                scores=scores if policy == "priority" else None,
                decay=decay if policy == "priority" else None,
                progress=report if progress is not None else None,
            )
            rows.append(SweepRow(policy, capacity, *stats))
    return rows


def format_table(rows: Sequence[SweepRow]) -> str:
    """The rows of a sweep as an aligned text table (policy, capacity, hit ratio, misses,
    bytes moved, stalls)."""
    header = ("policy", "capacity", "hit ratio", "misses", "bytes moved", "stalls")
    cells = [header] + [
        (r.policy, str(r.capacity), f"{r.hit_ratio:.4f}", str(r.misses), str(r.bytes_moved), str(r.stalls))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        # The policy column reads left-aligned, the numbers right-aligned.
        numbers = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        parts = [row[0].ljust(widths[0]), *numbers]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_hit_ratio(
    rows: Sequence[SweepRow], path: str | os.PathLike[str], *, title: str | None = None
) -> None:
    """Saves a PNG of hit ratio against capacity, one line per policy (matplotlib, Agg)."""
    if not rows:
        raise ValueError("rows: expected the rows of a sweep, got none")
    # A Figure with an Agg canvas draws without pyplot, so the caller's backend and global
    # figure state stay untouched (and threads do not share a current figure).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    policies = list(dict.fromkeys(r.policy for r in rows))
    for policy in policies:
        points = sorted((r.capacity, r.hit_ratio) for r in rows if r.policy == policy)
        ax.plot([c for c, _ in points], [h for _, h in points], marker="o", label=policy)
    ax.set_xlabel("capacity")
    ax.set_ylabel("hit ratio")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or "Expert cache hit ratio")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


class CacheAccess(NamedTuple):
    """What one ``ExpertCache.access`` did: the (layer, expert) keys loaded (the misses, in
    ascending order) and evicted (in eviction order). Keys that share an object through
    ``aliases`` appear as their target."""

    loaded: list[Key]
    evicted: list[Key]


class ExpertCache:
    """An expert cache for online use, driven one layer at a time.

    Each ``access(layer, experts)`` is one layer visit under the replay model: the experts
    are pinned, hits are touched and misses loaded in ascending id, evicting the policy's
    victims. Time counts as in a replay: access ``i`` is visit ``i`` of step ``i //
    num_layers``, so accessing layers ``0..L-1`` in order each step reproduces ``simulate``.
    Policies: ``"lru"``, ``"lfu"``, ``"lifo"``, ``"priority"`` (Belady needs the future:
    use ``simulate``). Thread-safe: every method locks the cache.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        capacity: int,
        policy: str = "lru",
        *,
        capacity_unit: str = "experts",
        expert_bytes: int | Tensor | Sequence[Sequence[int]] | None = None,
        aliases: Mapping[Key, Key] | None = None,
        scores: Tensor | Sequence[Sequence[float]] | None = None,
        decay: float | None = None,
    ) -> None:
        self.num_layers = check_int(num_layers, "num_layers", minimum=1)
        self.num_experts = check_int(num_experts, "num_experts", minimum=1)
        check_int(capacity, "capacity", minimum=1)
        _check_policy(policy, ("lru", "lfu", "lifo", "priority"))
        unit = _check_unit(capacity_unit)
        if policy != "priority" and (scores is not None or decay is not None):
            raise ValueError(f"scores, decay: only used by policy 'priority', got policy {policy!r}")
        self._cache = _core.ExpertCache(
            num_layers,
            num_experts,
            capacity,
            unit,
            policy,
            _view(_expert_bytes(expert_bytes, num_layers, num_experts, unit)),
            _view(_aliases(aliases, num_layers, num_experts)),
            _view(_scores(scores, num_layers, num_experts)),
            _decay(decay),
        )

    def access(self, layer: int, experts: Tensor | Sequence[int]) -> CacheAccess:
        """Runs ``layer`` needing ``experts``: a list of ids, or a routing tensor (e.g.
        ``[T, k]`` from ``topk_gating``; ``-1`` entries ignored). Duplicates count once."""
        check_int(layer, "layer", minimum=0, maximum=self.num_layers - 1)
        if isinstance(experts, Tensor):
            if experts.dtype not in INDEX_DTYPES:
                raise TypeError(f"experts: expected dtype int64 or int32, got {experts.dtype}")
            _check_ids(experts, "experts", self.num_experts)
            ids: list[int] = torch.unique(experts[experts >= 0]).tolist()
        else:
            ids = list(experts)
            for e in ids:
                if isinstance(e, bool) or not isinstance(e, int):
                    raise TypeError(f"experts: expected int expert ids, got {e!r}")
        loaded, evicted = self._cache.access(layer, ids)
        return CacheAccess(loaded, evicted)

    def lookup(self, layer: int, expert: int) -> bool:
        """Whether ``(layer, expert)`` is resident (no effect on the policy)."""
        check_int(layer, "layer", minimum=0, maximum=self.num_layers - 1)
        check_int(expert, "expert", minimum=0, maximum=self.num_experts - 1)
        return self._cache.lookup(layer, expert)

    def evict_candidate(self) -> Key | None:
        """The (layer, expert) the policy would evict next, or None when empty."""
        return self._cache.evict_candidate()

    def resident(self) -> list[Key]:
        """The resident (layer, expert) keys, ascending (aliases appear as their target)."""
        return self._cache.resident()

    @property
    def used(self) -> int:
        """Capacity taken (experts or bytes)."""
        return self._cache.used()

    def stats(self) -> CacheStats:
        return CacheStats._from_core(self._cache.stats())


# ---- command line ----


class _ProgressBar:
    """A one-line progress bar redrawn in place with carriage returns (no dependencies)."""

    def __init__(self, total: int, stream: TextIO, *, label: str = "replay", width: int = 30) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.label = label
        self.width = width
        self.start = time.perf_counter()
        self.shown = -1

    def update(self, done: int, _total: int | None = None) -> None:
        percent = min(100, done * 100 // self.total)
        if percent == self.shown:
            return
        self.shown = percent
        filled = self.width * percent // 100
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar}] {percent:3d}% {done}/{self.total} steps {elapsed:.1f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.shown >= 0:
            self.stream.write("\n")
            self.stream.flush()


#: Auto mode shows the bar for sweeps of at least this many requests (about a second).
_PROGRESS_REQUESTS = 2_000_000


def run_cache_sim(
    trace_path: str,
    *,
    capacities: Sequence[int],
    policies: Sequence[str] | None = None,
    window: int | None = None,
    capacity_unit: str = "experts",
    expert_bytes: int | None = None,
    decay: float | None = None,
    plot: str | None = None,
    progress: bool | None = None,
) -> int:
    """``python -m sparseroute cache-sim``: loads a trace file, sweeps policies and
    capacities, prints the table to stdout (progress bar on stderr) and optionally saves
    the hit-ratio plot. ``progress=None`` shows the bar when stderr is a terminal and the
    sweep is long. Returns the exit status (2 for bad input, with the reason on stderr)."""
    try:
        trace = RoutingTrace.load(trace_path)
        chosen = list(policies) if policies else list(POLICIES)
        combos = len(chosen) * len(capacities)
        if progress is None:
            progress = sys.stderr.isatty() and combos * trace.num_requests >= _PROGRESS_REQUESTS
        bar = _ProgressBar(combos * trace.num_steps, sys.stderr) if progress else None
        try:
            rows = sweep(
                trace,
                list(capacities),
                chosen,
                capacity_unit=capacity_unit,
                expert_bytes=expert_bytes,
                window=window,
                decay=decay,
                progress=bar.update if bar is not None else None,
            )
        finally:
            if bar is not None:
                bar.close()
    except (OSError, TypeError, ValueError) as err:
        print(f"cache-sim: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{trace_path}: {trace.num_steps} steps x {trace.num_layers} layers, {trace.num_experts} experts, "
        f"{trace.num_requests} requests; capacity in {capacity_unit}"
    )
    print(format_table(rows))
    if plot is not None:
        plot_hit_ratio(rows, plot, title=Path(trace_path).name)
        print(f"saved {plot}")
    return 0
