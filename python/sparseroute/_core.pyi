"""The compiled Rust extension (rust/python). Internal: use the functions of ``sparseroute``.

Arrays are zero-copy numpy views of contiguous CPU tensors; bfloat16 tensors arrive as
int16 views of their bits. Output arrays are written in place. ``threads`` is the size of
the thread pool the kernel runs on.
"""

from collections.abc import Callable
from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Batcher",
    "ExpertCache",
    "InvalidInputError",
    "__version__",
    "bucket_by_plan",
    "buffer_cache_info",
    "build_capacity_plan",
    "build_plan",
    "combine_rows",
    "expert_choice",
    "expert_choice_backward",
    "expert_choice_slots",
    "expert_counts",
    "gather_rows",
    "gather_tokens",
    "greedy_placement",
    "layer_plan",
    "logical_to_physical",
    "plan_placement",
    "pooled_empty",
    "prefetch_plan",
    "rebalance_placement",
    "replay_batching",
    "replica_map",
    "scatter_tokens",
    "score_sums",
    "score_sums_backward",
    "select_tokens",
    "set_buffer_cache_limit",
    "simd_level",
    "simulate_cache",
    "sinkhorn",
    "slot_dots",
    "sparsity_schedule",
    "token_dots",
    "topk_gating",
    "topk_gating_backward",
    "topp_gating",
    "z_loss",
    "z_loss_backward",
]

__version__: str

class InvalidInputError(ValueError):
    """A tensor or argument was rejected by a routing kernel (wrong size, out-of-range id,
    non-finite value)."""

def topk_gating(
    logits: npt.NDArray[np.generic],
    weights: npt.NDArray[np.floating],
    experts: npt.NDArray[np.int64],
    k: int,
    score: str,
    normalize: bool,
    expert_bias: npt.NDArray[np.floating] | None,
    num_groups: int | None,
    topk_groups: int | None,
    group_score_k: int,
    scale: float,
    threads: int,
) -> None: ...
def topk_gating_backward(
    logits: npt.NDArray[np.generic],
    experts: npt.NDArray[np.int64],
    grad_weights: npt.NDArray[np.floating],
    grad_logits: npt.NDArray[np.generic],
    score: str,
    normalize: bool,
    scale: float,
    threads: int,
) -> None: ...
def build_plan(
    experts: npt.NDArray[np.int64],
    num_experts: int,
    block_size: int,
    tokens_per_expert: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    row_to_slot: npt.NDArray[np.int64],
    slot_to_row: npt.NDArray[np.int64],
    threads: int,
) -> int: ...
def build_capacity_plan(
    experts: npt.NDArray[np.int64],
    num_experts: int,
    capacity: int,
    weights: npt.NDArray[np.float32] | None,
    pad: bool,
    block_size: int,
    tokens_per_expert: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    row_to_slot: npt.NDArray[np.int64],
    slot_to_row: npt.NDArray[np.int64],
    dropped: npt.NDArray[np.int64],
    threads: int,
) -> int: ...
def gather_rows(
    x: npt.NDArray[np.generic],
    row_to_slot: npt.NDArray[np.int64],
    k: int,
    slot_scale: npt.NDArray[np.floating] | None,
    out: npt.NDArray[np.generic],
    threads: int,
) -> None: ...
def combine_rows(
    rows: npt.NDArray[np.generic],
    slot_to_row: npt.NDArray[np.int64],
    weights: npt.NDArray[np.floating] | None,
    out: npt.NDArray[np.generic],
    threads: int,
) -> None: ...
def slot_dots(
    grad_y: npt.NDArray[np.generic],
    rows: npt.NDArray[np.generic],
    slot_to_row: npt.NDArray[np.int64],
    out: npt.NDArray[np.floating],
    threads: int,
) -> None: ...
def simd_level() -> str:
    """The instruction set of the CPU kernels: "avx512", "avx2" or "baseline"."""

def pooled_empty(shape: list[int], dtype: str) -> object:
    """A DLPack capsule of an uninitialised C-contiguous CPU tensor backed by a cached buffer."""

def set_buffer_cache_limit(limit: int) -> None: ...
def buffer_cache_info() -> tuple[int, int]: ...
def score_sums(
    logits: npt.NDArray[np.generic],
    score: str,
    group_size: int,
    mask: npt.NDArray[np.uint8] | None,
    out: npt.NDArray[np.float64],
    threads: int,
) -> None: ...
def score_sums_backward(
    logits: npt.NDArray[np.generic],
    score: str,
    group_size: int,
    mask: npt.NDArray[np.uint8] | None,
    grad_sums: npt.NDArray[np.floating],
    grad_logits: npt.NDArray[np.generic],
    threads: int,
) -> None: ...
def expert_counts(
    experts: npt.NDArray[np.int64],
    num_experts: int,
    group_size: int,
    mask: npt.NDArray[np.uint8] | None,
    out: npt.NDArray[np.int64],
    threads: int,
) -> None: ...
def topp_gating(
    logits: npt.NDArray[np.generic],
    weights: npt.NDArray[np.floating],
    experts: npt.NDArray[np.int64],
    p: float,
    min_k: int,
    max_k: int,
    inclusive: bool,
    normalize: bool,
    threads: int,
) -> None: ...
def expert_choice_slots(
    indices: npt.NDArray[np.int64],
    gates: npt.NDArray[np.floating],
    experts: npt.NDArray[np.int64],
    weights: npt.NDArray[np.floating],
    threads: int,
) -> None: ...
def expert_choice_backward(
    logits: npt.NDArray[np.generic],
    indices: npt.NDArray[np.int64],
    grad_gates: npt.NDArray[np.floating],
    grad_logits: npt.NDArray[np.generic],
    threads: int,
) -> None: ...
def sinkhorn(
    logits: npt.NDArray[np.float32],
    tol: float,
    max_iters: int | None,
    out: npt.NDArray[np.float32],
    threads: int,
) -> int: ...
def expert_choice(
    logits: npt.NDArray[np.generic],
    capacity: int,
    indices: npt.NDArray[np.int64],
    gates: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    threads: int,
) -> None: ...
def z_loss(
    logits: npt.NDArray[np.generic],
    mask: npt.NDArray[np.uint8] | None,
    scale: float,
    stats: npt.NDArray[np.floating],
    threads: int,
) -> float: ...
def z_loss_backward(
    logits: npt.NDArray[np.generic],
    stats: npt.NDArray[np.floating],
    grad: float,
    out: npt.NDArray[np.generic],
    threads: int,
) -> None: ...
def select_tokens(
    scores: npt.NDArray[np.generic],
    lengths: npt.NDArray[np.int64] | None,
    rule: str,
    value: float,
    indices: npt.NDArray[np.int64],
    mask: npt.NDArray[np.uint8],
    threads: int,
) -> None: ...
def gather_tokens(
    x: npt.NDArray[np.generic],
    indices: npt.NDArray[np.int64],
    scale: npt.NDArray[np.floating] | None,
    out: npt.NDArray[np.generic],
    threads: int,
) -> None: ...
def scatter_tokens(
    base: npt.NDArray[np.generic] | None,
    rows: npt.NDArray[np.generic] | None,
    indices: npt.NDArray[np.int64],
    gate: npt.NDArray[np.floating] | None,
    out: npt.NDArray[np.generic],
    threads: int,
) -> None: ...
def token_dots(
    grad: npt.NDArray[np.generic],
    rows: npt.NDArray[np.generic],
    indices: npt.NDArray[np.int64],
    out: npt.NDArray[np.floating],
    threads: int,
) -> None: ...
def layer_plan(logits: npt.NDArray[np.generic], out: npt.NDArray[np.int64]) -> None: ...
def bucket_by_plan(plans: npt.NDArray[np.int64], max_batch: int | None) -> list[npt.NDArray[np.int64]]: ...
def sparsity_schedule(
    layer_costs: npt.NDArray[np.float64],
    layer_sensitivity: npt.NDArray[np.float64],
    ratios: npt.NDArray[np.float64],
    min_keep: npt.NDArray[np.float64],
    max_keep: npt.NDArray[np.float64],
    budget: float,
    method: str,
    max_states: int,
) -> tuple[npt.NDArray[np.int64], float, float, bool]: ...
def plan_placement(
    load: npt.NDArray[np.float64],
    num_slots: int,
    num_nodes: int,
    gpus_per_node: int,
    num_groups: int | None,
    method: str,
    physical_to_logical: npt.NDArray[np.int64],
    replica_counts: npt.NDArray[np.int64],
    gpu_load: npt.NDArray[np.float64],
    imbalance: npt.NDArray[np.float64],
    lower_bound: npt.NDArray[np.float64],
    threads: int,
) -> str: ...
def greedy_placement(
    load: npt.NDArray[np.float64],
    num_slots: int,
    num_nodes: int,
    gpus_per_node: int,
    physical_to_logical: npt.NDArray[np.int64],
    replica_counts: npt.NDArray[np.int64],
    gpu_load: npt.NDArray[np.float64],
    imbalance: npt.NDArray[np.float64],
    lower_bound: npt.NDArray[np.float64],
    threads: int,
) -> None: ...
def rebalance_placement(
    current: npt.NDArray[np.int64],
    load: npt.NDArray[np.float64],
    num_nodes: int,
    gpus_per_node: int,
    num_groups: int | None,
    method: str,
    target_imbalance: float,
    max_moves: int,
    physical_to_logical: npt.NDArray[np.int64],
    replica_counts: npt.NDArray[np.int64],
    gpu_load: npt.NDArray[np.float64],
    imbalance: npt.NDArray[np.float64],
    lower_bound: npt.NDArray[np.float64],
    moved_slots: npt.NDArray[np.int64],
    replanned: npt.NDArray[np.uint8],
    threads: int,
) -> None: ...
def logical_to_physical(physical_to_logical: npt.NDArray[np.int64], out: npt.NDArray[np.int64]) -> None: ...
def replica_map(
    experts: npt.NDArray[np.int64],
    logical_to_physical: npt.NDArray[np.int64],
    replica_counts: npt.NDArray[np.int64],
    num_slots: int,
    slots_per_gpu: int,
    policy: str,
    out: npt.NDArray[np.int64],
) -> None: ...

@final
class Batcher:
    """A queue of requests with known routing handing out batches (thread-safe)."""

    def __new__(
        cls, num_layers: int, num_experts: int, max_batch: int, max_wait: int, policy: str
    ) -> Batcher: ...
    def push(self, request_id: int, experts: npt.NDArray[np.int64]) -> None: ...
    def next_batch(self) -> tuple[list[int], int, int]: ...
    def pending(self) -> int: ...
    def round(self) -> int: ...

def replay_batching(
    experts: npt.NDArray[np.int64],
    num_experts: int,
    arrivals: npt.NDArray[np.int64],
    max_batch: int,
    max_wait: int,
    policy: str,
) -> list[npt.NDArray[np.int64]]: ...
def prefetch_plan(
    resident: npt.NDArray[np.int64],
    layers: npt.NDArray[np.int64],
    experts: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    capacity: int,
    depth: int,
) -> npt.NDArray[np.int64]: ...

@final
class ExpertCache:
    """An expert cache driven one layer at a time (thread-safe)."""

    def __new__(
        cls,
        num_layers: int,
        num_experts: int,
        capacity: int,
        capacity_unit: str,
        policy: str,
        expert_bytes: npt.NDArray[np.int64] | None,
        aliases: npt.NDArray[np.int64] | None,
        scores: npt.NDArray[np.float64] | None,
        decay: float,
    ) -> ExpertCache: ...
    def access(
        self, layer: int, experts: list[int]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]: ...
    def lookup(self, layer: int, expert: int) -> bool: ...
    def evict_candidate(self) -> tuple[int, int] | None: ...
    def resident(self) -> list[tuple[int, int]]: ...
    def used(self) -> int: ...
    def stats(self) -> tuple[int, int, int, int, int]: ...

def simulate_cache(
    experts: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    num_layers: int,
    num_experts: int,
    capacity: int,
    capacity_unit: str,
    policy: str,
    window: int | None,
    expert_bytes: npt.NDArray[np.int64] | None,
    aliases: npt.NDArray[np.int64] | None,
    scores: npt.NDArray[np.float64] | None,
    decay: float,
    progress: Callable[[int], object] | None,
    chunk_steps: int,
) -> tuple[int, int, int, int, int]: ...
