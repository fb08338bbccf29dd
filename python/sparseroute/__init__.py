"""sparseroute: sparse routing kernels for PyTorch.

Everything between a router's logits and the experts a token goes to, and back:

>>> weights, experts = sparseroute.topk_gating(logits, k=2)
>>> x_sorted, plan = sparseroute.permute(x, experts, num_experts)
>>> y = sparseroute.unpermute(expert_outputs, plan, weights)

or, for a Hugging Face transformers (>= 5) MoE model, ``sparseroute.patch(model)``.
"""

from sparseroute import _cuda_ops, budget, cache, nn, placement, schedule
from sparseroute._core import InvalidInputError, __version__
from sparseroute._cuda import check_errors as check_cuda_errors
from sparseroute._cuda import warm_up as warm_up_cuda
from sparseroute._info import info
from sparseroute._memory import buffer_cache_info, set_buffer_cache_limit
from sparseroute._threads import get_num_threads, set_num_threads
from sparseroute.budget import BudgetMeter, SparsitySchedule, sparsity_schedule
from sparseroute.integrations import transformers as _transformers_integration
from sparseroute.integrations.transformers import patch, unpatch
from sparseroute.ops import (
    ExpertChoice,
    PermutePlan,
    PlanBuckets,
    RoutingStats,
    TokenSelection,
    bucket_by_plan,
    expert_capacity,
    expert_choice,
    gather_tokens,
    grouped_linear,
    grouped_mlp,
    jitter,
    layer_plan,
    layer_sequence,
    load_balancing_loss,
    max_permuted_rows,
    moe_align_block_size,
    permute,
    renormalize_kept,
    routing_stats,
    scatter_tokens,
    select_tokens,
    sinkhorn,
    token_capacity,
    topk_gating,
    topp_gating,
    unpermute,
    update_expert_bias,
    z_loss,
)

__all__ = [
    "BudgetMeter",
    "ExpertChoice",
    "InvalidInputError",
    "PermutePlan",
    "PlanBuckets",
    "RoutingStats",
    "SparsitySchedule",
    "TokenSelection",
    "__version__",
    "bucket_by_plan",
    "budget",
    "buffer_cache_info",
    "cache",
    "check_cuda_errors",
    "expert_capacity",
    "expert_choice",
    "gather_tokens",
    "get_num_threads",
    "grouped_linear",
    "grouped_mlp",
    "info",
    "jitter",
    "layer_plan",
    "layer_sequence",
    "load_balancing_loss",
    "max_permuted_rows",
    "moe_align_block_size",
    "nn",
    "patch",
    "permute",
    "placement",
    "renormalize_kept",
    "routing_stats",
    "scatter_tokens",
    "schedule",
    "select_tokens",
    "set_buffer_cache_limit",
    "set_num_threads",
    "sinkhorn",
    "sparsity_schedule",
    "token_capacity",
    "topk_gating",
    "topp_gating",
    "unpatch",
    "unpermute",
    "update_expert_bias",
    "warm_up_cuda",
    "z_loss",
]

# Register the "sparseroute" experts implementation with transformers once it is imported.
_transformers_integration.install()

# Register the CUDA kernels of the ops (and a clear error for the ops without one).
_cuda_ops.register()
