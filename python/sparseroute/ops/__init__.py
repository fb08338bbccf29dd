"""The torch custom ops of sparseroute (``torch.ops.sparseroute.*``) and their Python faces."""

from sparseroute.ops.dispatch import PermutePlan, expert_capacity, permute, renormalize_kept, unpermute
from sparseroute.ops.experts import grouped_linear, grouped_mlp
from sparseroute.ops.gating import topk_gating

__all__ = [
    "PermutePlan",
    "expert_capacity",
    "grouped_linear",
    "grouped_mlp",
    "permute",
    "renormalize_kept",
    "topk_gating",
    "unpermute",
]
