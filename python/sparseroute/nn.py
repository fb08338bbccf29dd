"""``torch.nn`` modules built from sparseroute's ops, for models written from scratch."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.ops.dispatch import DROP_POLICIES, expert_capacity, permute, unpermute
from sparseroute.ops.experts import ACTIVATIONS, gated_activation, grouped_mlp
from sparseroute.ops.gating import SCORE_FUNCTIONS, topk_gating


class MoEOutput(NamedTuple):
    """What ``SparseMoE.forward`` returns.

    Attributes:
        output: ``[..., H]``, the layer output in the input's shape and dtype.
        router_logits: ``[T, E]`` router logits of the ``T`` flattened tokens (for auxiliary
            losses such as the z-loss).
        experts: ``[T, k]`` int64, the experts each token was routed to.
        tokens_per_expert: ``[E]`` int64, how many tokens each expert received.
        dropped: ``[E]`` int64, tokens each expert dropped for lack of capacity.
    """

    output: Tensor
    router_logits: Tensor
    experts: Tensor
    tokens_per_expert: Tensor
    dropped: Tensor

    def load_balancing_loss(self) -> Tensor:
        """The Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e``, normalised as
        Megatron-Core does: ``f_e`` = tokens routed to expert ``e`` / (T * k), ``P_e`` = mean
        softmax probability of expert ``e``. Equals 1 for a perfectly balanced router;
        differentiable with respect to the router logits (``f`` is a count)."""
        num_tokens, num_experts = self.router_logits.shape
        if num_tokens == 0:
            return self.router_logits.new_zeros((), dtype=torch.float32)
        k = self.experts.shape[1]
        # The router's demand, before capacity drops.
        demand = self.tokens_per_expert + self.dropped
        fraction = demand.to(torch.float32) / (num_tokens * k)
        probability = torch.softmax(self.router_logits.float(), dim=-1).mean(dim=0)
        return num_experts * (fraction * probability).sum()


class SparseMoE(nn.Module):
    """A complete MoE layer: router, ``num_experts`` MLP experts, optional shared expert,
    dropless or with an expert capacity.

    ``y = sum_j w_j * expert_{e_j}(x) (+ shared(x))`` for the ``k`` experts ``e_j`` that
    ``topk_gating`` selects from the router logits ``x @ router.T``, computed as
    ``topk_gating`` -> ``permute`` -> ``grouped_mlp`` -> ``unpermute``.

    Args:
        hidden_size: H, the model width.
        ffn_size: F, the hidden width of each expert.
        num_experts: E.
        k: experts per token.
        score, normalize, num_groups, topk_groups, group_score_k, scale: router options, as
            in ``topk_gating``.
        expert_bias: keep a float32 ``[E]`` buffer ``expert_bias`` (zeros) added to the scores
            for selection only (auxiliary-loss-free balancing, as in DeepSeek-V3); update it
            between steps.
        activation: an activation name of ``grouped_mlp``.
        gated: SwiGLU-style experts (``gate_up_proj`` holds gate and up) or plain MLPs.
        shared_expert_size: hidden width of a shared expert applied to every token (0: none).
        capacity_factor: ``None`` for dropless routing; else each expert takes at most
            ``expert_capacity(T, E, k, capacity_factor, min_capacity=min_capacity)`` tokens
            per forward and drops the rest (a dropped slot contributes nothing; a token that
            loses every slot passes through as zeros, plus the shared expert).
        drop_policy: ``"probs"`` (keep the highest routing weights) or ``"position"`` (keep
            the earliest tokens); see ``permute``.
        pad_to_capacity: run the experts on the static ``[E * capacity, H]`` layout.
        min_capacity: lower bound of the capacity.
        renormalize_after_drop: renormalise each token's kept weights (GShard / DeepSpeed).
        dtype, device: of the parameters.

    Parameters follow transformers 5's layout: ``router.weight [E, H]``,
    ``gate_up_proj [E, 2F, H]`` (``[E, F, H]`` when not gated), ``down_proj [E, H, F]``.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        k: int,
        *,
        score: str = "softmax",
        normalize: bool = True,
        num_groups: int | None = None,
        topk_groups: int | None = None,
        group_score_k: int = 2,
        scale: float = 1.0,
        expert_bias: bool = False,
        activation: str = "silu",
        gated: bool = True,
        shared_expert_size: int = 0,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        pad_to_capacity: bool = False,
        min_capacity: int = 0,
        renormalize_after_drop: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("hidden_size", hidden_size, 1),
            ("ffn_size", ffn_size, 1),
            ("num_experts", num_experts, 1),
            ("k", k, 1),
            ("shared_expert_size", shared_expert_size, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
        if k > num_experts:
            raise ValueError(f"k: expected k <= num_experts = {num_experts}, got {k}")
        if score not in SCORE_FUNCTIONS:
            raise ValueError(f"score: expected one of {SCORE_FUNCTIONS}, got {score!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if capacity_factor is not None:
            # Validates the factor and the bound once, here, rather than on the first batch.
            expert_capacity(1, num_experts, k, capacity_factor, min_capacity=min_capacity)
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy: expected one of {DROP_POLICIES}, got {drop_policy!r}")
        self.capacity_factor, self.drop_policy, self.min_capacity = capacity_factor, drop_policy, min_capacity
        self.pad_to_capacity, self.renormalize_after_drop = pad_to_capacity, renormalize_after_drop
        self.hidden_size, self.ffn_size, self.num_experts, self.k = hidden_size, ffn_size, num_experts, k
        self.score, self.normalize, self.scale = score, normalize, scale
        self.num_groups, self.topk_groups, self.group_score_k = num_groups, topk_groups, group_score_k
        self.activation, self.gated = activation, gated
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype, device=device)
        up_size = 2 * ffn_size if gated else ffn_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, up_size, hidden_size, dtype=dtype, device=device)
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, ffn_size, dtype=dtype, device=device)
        )
        self.expert_bias: Tensor | None
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.expert_bias = None
        self.shared_expert: nn.ModuleDict | None = None
        if shared_expert_size:
            shared_up = 2 * shared_expert_size if gated else shared_expert_size
            self.shared_expert = nn.ModuleDict(
                {
                    "gate_up_proj": nn.Linear(hidden_size, shared_up, bias=False, dtype=dtype, device=device),
                    "down_proj": nn.Linear(
                        shared_expert_size, hidden_size, bias=False, dtype=dtype, device=device
                    ),
                }
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts initialised like ``nn.Linear``: uniform in +-1/sqrt(fan_in)."""
        with torch.no_grad():
            bound_up, bound_down = 1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.ffn_size)
            self.gate_up_proj.uniform_(-bound_up, bound_up)
            self.down_proj.uniform_(-bound_down, bound_down)
        self.router.reset_parameters()
        if self.shared_expert is not None:
            for layer in self.shared_expert.values():
                layer.reset_parameters()  # type: ignore[operator]

    def _shared(self, x: Tensor) -> Tensor:
        assert self.shared_expert is not None
        act = ACTIVATIONS[self.activation]
        h = self.shared_expert["gate_up_proj"](x)
        h = gated_activation(h, act, "concatenated") if self.gated else act(h)
        out: Tensor = self.shared_expert["down_proj"](h)
        return out

    def forward(self, x: Tensor) -> MoEOutput:
        """Route ``x [..., H]`` (any leading shape) through the layer."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected last dimension H = {self.hidden_size}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.hidden_size)
        logits = F.linear(flat, self.router.weight)
        weights, experts = topk_gating(
            logits,
            self.k,
            score=self.score,
            normalize=self.normalize,
            expert_bias=self.expert_bias,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
            group_score_k=self.group_score_k,
            scale=self.scale,
        )
        capacity = None
        # A static row count (T * k slots, or at most E * C kept ones) rather than the exact
        # one: reading that back from a GPU would stall its queue of kernels. The extra rows
        # are zero padding past plan.offsets[E], which the expert matmuls skip.
        num_rows: int | None = experts.numel()
        if self.capacity_factor is not None:
            capacity = expert_capacity(
                flat.shape[0], self.num_experts, self.k, self.capacity_factor, min_capacity=self.min_capacity
            )
            num_rows = None if self.pad_to_capacity else min(experts.numel(), self.num_experts * capacity)
        x_sorted, plan = permute(
            flat,
            experts,
            self.num_experts,
            num_rows=num_rows,
            capacity=capacity,
            weights=weights,
            drop_policy=self.drop_policy,
            pad_to_capacity=self.pad_to_capacity and capacity is not None,
        )
        y_sorted = grouped_mlp(
            x_sorted,
            plan.offsets,
            self.gate_up_proj,
            self.down_proj,
            activation=self.activation,
            gated=self.gated,
        )
        y = unpermute(y_sorted, plan, weights, renormalize_after_drop=self.renormalize_after_drop)
        if self.shared_expert is not None:
            y = y + self._shared(flat)
        return MoEOutput(y.view(x.shape), logits, experts, plan.tokens_per_expert, plan.dropped)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, num_experts={self.num_experts}, "
            f"k={self.k}, score={self.score!r}, activation={self.activation!r}, gated={self.gated}, "
            f"capacity_factor={self.capacity_factor}"
        )
