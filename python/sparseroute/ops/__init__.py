"""The torch custom ops of sparseroute (``torch.ops.sparseroute.*``) and their Python faces."""

from sparseroute.ops.balance import (
    RoutingStats,
    load_balancing_loss,
    routing_stats,
    sinkhorn,
    update_expert_bias,
    z_loss,
)
from sparseroute.ops.dispatch import (
    PermutePlan,
    expert_capacity,
    max_permuted_rows,
    moe_align_block_size,
    permute,
    renormalize_kept,
    unpermute,
)
from sparseroute.ops.experts import grouped_linear, grouped_mlp
from sparseroute.ops.gating import ExpertChoice, expert_choice, jitter, topk_gating, topp_gating
from sparseroute.ops.layers import PlanBuckets, bucket_by_plan, layer_plan, layer_sequence
from sparseroute.ops.tokens import (
    TokenSelection,
    gather_tokens,
    scatter_tokens,
    select_tokens,
    token_capacity,
)

__all__ = [
    "ExpertChoice",
    "PermutePlan",
    "PlanBuckets",
    "RoutingStats",
    "TokenSelection",
    "bucket_by_plan",
    "expert_capacity",
    "expert_choice",
    "gather_tokens",
    "grouped_linear",
    "grouped_mlp",
    "jitter",
    "layer_plan",
    "layer_sequence",
    "load_balancing_loss",
    "max_permuted_rows",
    "moe_align_block_size",
    "permute",
    "renormalize_kept",
    "routing_stats",
    "scatter_tokens",
    "select_tokens",
    "sinkhorn",
    "token_capacity",
    "topk_gating",
    "topp_gating",
    "unpermute",
    "update_expert_bias",
    "z_loss",
]
