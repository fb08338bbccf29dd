"""The torch custom ops of sparseroute (``torch.ops.sparseroute.*``) and their Python faces."""

from sparseroute.ops.dispatch import PermutePlan, permute, unpermute
from sparseroute.ops.experts import grouped_linear, grouped_mlp
from sparseroute.ops.gating import topk_gating

__all__ = ["PermutePlan", "grouped_linear", "grouped_mlp", "permute", "topk_gating", "unpermute"]
