"""The torch custom ops of sparseroute (``torch.ops.sparseroute.*``) and their Python faces."""

from sparseroute.ops.balance import (
    RoutingStats,
    load_balancing_loss,
    routing_stats,
    sinkhorn,
    update_expert_bias,
    z_loss,
)
from sparseroute.ops.dispatch import PermutePlan, expert_capacity, permute, renormalize_kept, unpermute
from sparseroute.ops.experts import grouped_linear, grouped_mlp
from sparseroute.ops.gating import ExpertChoice, expert_choice, jitter, topk_gating, topp_gating

__all__ = [
    "ExpertChoice",
    "PermutePlan",
    "RoutingStats",
    "expert_capacity",
    "expert_choice",
    "grouped_linear",
    "grouped_mlp",
    "jitter",
    "load_balancing_loss",
    "permute",
    "renormalize_kept",
    "routing_stats",
    "sinkhorn",
    "topk_gating",
    "topp_gating",
    "unpermute",
    "update_expert_bias",
    "z_loss",
]
