"""Router rules: how each transformers router class maps onto ``topk_gating``.

A transformers 5 router computes ``logits = F.linear(x, weight)`` and then scores, selects
and normalises in a handful of torch ops. Most families differ only in parameters of one
formula, which is exactly ``topk_gating``'s: softmax or sigmoid scores in float32, selection
on ``score + expert_bias`` with an optional group limit (group score = sum of its two best),
weights = the unbiased scores of the selected experts, optionally renormalised (no epsilon
for softmax, ``+1e-20`` for sigmoid), times a scale. A ``RouterRule`` records those
parameters for one router class, plus how it computes its logits and which dtype it returns
its weights in; the patched forward keeps the logits computation exactly as it was, because
transformers records them for the load-balancing loss.

An epsilon of 1e-20 added to the sum of the k selected scores, or left out, changes no
float32 weight unless that sum is below about 1e-12 (all k scores vanishingly small), so
rules ignore that difference. Classes whose math differs (a larger epsilon, such as LFM2's
1e-6, a bias added in logit space, a sparsemixer, an MLP router, scores in the model's
dtype, a score function other than softmax and sigmoid) have no rule and are left alone,
and so are routers configured outside their rule's formula (a rule may require attribute
values, e.g. DeepSeek-V2's ``topk_method="greedy"``).
``patch`` also checks every rule against the original forward on random weights before
using it (``verify_rule``), so a future change of a router class makes the patch decline
rather than compute something else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute.ops.gating import topk_gating


@dataclass(frozen=True)
class RouterRule:
    """The parameters of one router class's math (see the module docstring).

    Attributes:
        score: "softmax" or "sigmoid".
        normalize: True / False, or the name of the router's boolean attribute that decides.
        logits: how the router computes its logits: "model" (``F.linear`` in the model's
            dtype), "model_then_fp32" (the same, then ``.float()``), "fp32" (inputs and
            weight cast to float32 first), "weight_dtype" (inputs cast to the weight's dtype).
        weights_dtype: the dtype of the weights it returns: "float32", "logits" (its logits'
            dtype) or "hidden" (its input's dtype).
        linear_bias: whether ``F.linear`` adds the router's ``bias``.
        weight: the router attribute holding its ``[E, H]`` weight (a dotted path for a
            submodule's, e.g. ``"gate.weight"`` for an ``nn.Linear`` named gate, whose
            ``bias`` is then the one ``linear_bias`` adds).
        expert_bias: the router attribute holding the selection-only bias, if any (a dotted
            path for a submodule's attribute; its values are read flat, as ``[E]``).
        expert_bias_argument: whether the MoE block passes that bias to the router's forward
            as its second argument instead.
        groups: whether the router limits selection to ``topk_group`` of ``num_group``
            groups (attributes of those names).
        group_score_k: how many of a group's best keys make its score (``topk_gating``'s
            argument of that name).
        scale: the router attribute holding the factor applied to the weights, if any.
        batched_input: whether the router takes ``[B, S, H]`` hidden states (its block does
            not flatten them first); the check of the rule then probes it with such.
        conditions: ``(attribute, value)`` pairs the router must have for this formula to be
            its math (options of the router that the rule does not express).
    """

    score: str
    normalize: bool | str
    logits: str
    weights_dtype: str
    linear_bias: bool = False
    weight: str = "weight"
    expert_bias: str | None = None
    expert_bias_argument: bool = False
    groups: bool = False
    group_score_k: int = 2
    scale: str | None = None
    batched_input: bool = False
    conditions: tuple[tuple[str, object], ...] = ()


# softmax, top-k, always renormalised, float32 weights.
_MIXTRAL = RouterRule("softmax", True, "model", "float32")
# softmax in float32, top-k, renormalised iff norm_topk_prob, weights in the logits' dtype.
_QWEN = RouterRule("softmax", "norm_topk_prob", "model", "logits")
# As _QWEN, always renormalised.
_QWEN_ALWAYS = RouterRule("softmax", True, "model", "logits")
# DeepSeek-V3: float32 logits, sigmoid, bias and group limit for selection, +1e-20, scale.
_DEEPSEEK_V3 = RouterRule(
    "sigmoid",
    "norm_topk_prob",
    "fp32",
    "float32",
    expert_bias="e_score_correction_bias",
    groups=True,
    scale="routed_scaling_factor",
)
# Top-k on the logits, then softmax over the k selected: the renormalised softmax top-k.
_GRANITE = RouterRule("softmax", True, "model_then_fp32", "hidden")
# MiniMax-M3-VL: sigmoid scores of logits computed in the weight's dtype, the
# router's selection bias, always renormalised. (MiniMax-M2: the same, its block passing
# the bias.)
_MINIMAX_M3 = RouterRule("sigmoid", True, "weight_dtype", "float32", expert_bias="e_score_correction_bias")
# DeepSeek-V2: float32 softmax, top-k, no renormalisation, scale; "group_limited_greedy"
# first keeps the topk_group groups whose best expert scores highest.
_DEEPSEEK_V2 = (
    RouterRule(
        "softmax",
        False,
        "fp32",
        "float32",
        scale="routed_scaling_factor",
        conditions=(("topk_method", "greedy"),),
    ),
    RouterRule(
        "softmax",
        False,
        "fp32",
        "float32",
        groups=True,
        group_score_k=1,
        scale="routed_scaling_factor",
        conditions=(("topk_method", "group_limited_greedy"),),
    ),
)

#: Each router class's rule, or rules for routers whose options select other formulas (the
#: first whose ``conditions`` the router meets applies; see ``rule_for``).
RULES: dict[str, RouterRule | tuple[RouterRule, ...]] = {
    "MixtralTopKRouter": _MIXTRAL,
    "MiniMaxTopKRouter": _MIXTRAL,
    "Qwen2MoeTopKRouter": _QWEN,
    "Qwen3MoeTopKRouter": _QWEN,
    "Qwen3NextTopKRouter": _QWEN,
    "Qwen4ExpTextTopKRouter": _QWEN,
    "Qwen3OmniMoeThinkerTextTopKRouter": _QWEN,
    "Qwen3OmniMoeTalkerTextTopKRouter": _QWEN,
    "OlmoeTopKRouter": _QWEN,
    "FlexOlmoTopKRouter": _QWEN,
    "MellumTopKRouter": _QWEN,
    "Qwen3_5MoeTopKRouter": _QWEN_ALWAYS,
    "Qwen3VLMoeTextTopKRouter": _QWEN_ALWAYS,
    "JambaTopKRouter": RouterRule("softmax", False, "model", "hidden"),
    "GptOssTopKRouter": RouterRule("softmax", True, "model", "logits", linear_bias=True),
    "AriaTextTopKRouter": RouterRule("softmax", True, "model", "logits"),
    "GraniteMoeTopKRouter": _GRANITE,
    "GraniteMoeSWATopKRouter": _GRANITE,
    "GraniteMoeHybridTopKRouter": _GRANITE,
    "GraniteMoeSharedTopKRouter": _GRANITE,
    "DeepseekV3TopkRouter": _DEEPSEEK_V3,
    "DeepseekV32TopkRouter": _DEEPSEEK_V3,
    "Glm4MoeTopkRouter": _DEEPSEEK_V3,
    "Glm4MoeLiteTopkRouter": _DEEPSEEK_V3,
    "Glm4vMoeTextTopkRouter": _DEEPSEEK_V3,
    "Glm5NextTextTopkRouter": _DEEPSEEK_V3,
    "GlmMoeDsaTopkRouter": _DEEPSEEK_V3,
    "Dots1TopkRouter": _DEEPSEEK_V3,
    "Dots3NoteTextTopkRouter": _DEEPSEEK_V3,
    "SolarOpenTopkRouter": _DEEPSEEK_V3,
    "ExaoneMoeTopkRouter": _DEEPSEEK_V3,
    "MiMoV2FlashTopkRouter": _DEEPSEEK_V3,
    "AXK1TopkRouter": _DEEPSEEK_V3,
    "BailingHybridTopkRouter": _DEEPSEEK_V3,
    "HYV4TopkRouter": _DEEPSEEK_V3,
    "HYV4VLTopkRouter": _DEEPSEEK_V3,
    "KimiLinearTopkRouter": _DEEPSEEK_V3,
    "NemotronHTopkRouter": _DEEPSEEK_V3,
    # Beam's block applies the scaling factor, not its router.
    "BeamTopKRouter": replace(_DEEPSEEK_V3, scale=None),
    # AXK2 fills the scores of excluded groups with 0 rather than excluding them, which
    # differs once a bias makes keys negative: only its group-free form has a rule.
    "AXK2TopkRouter": replace(_DEEPSEEK_V3, groups=False, conditions=(("num_group", None),)),
    "MistralLarge4TextTopkRouter": RouterRule(
        "softmax", True, "fp32", "float32", groups=True, scale="routed_scaling_factor"
    ),
    "MiniMaxM2TopKRouter": RouterRule("sigmoid", True, "weight_dtype", "float32", expert_bias_argument=True),
    "MiniMaxM3VLTopKRouter": _MINIMAX_M3,
    "HYV3TopKRouter": RouterRule(
        "sigmoid", True, "fp32", "float32", expert_bias_argument=True, scale="router_scaling_factor"
    ),
    "FlintTopKRouter": RouterRule("sigmoid", "norm_topk_prob", "fp32", "float32"),
    "LaraMiniTopKRouter": RouterRule("softmax", "norm_topk_prob", "fp32", "hidden"),
    "Ernie4_5_MoeTopKRouter": RouterRule(
        "softmax", True, "fp32", "hidden", expert_bias="moe_statics.e_score_correction_bias"
    ),
    "LagunaTopKRouter": RouterRule(
        "sigmoid",
        True,
        "model_then_fp32",
        "hidden",
        expert_bias="e_score_correction_bias",
        conditions=(("router_logit_softcapping", 0.0),),
    ),
    # Its linear layer's weight is kept in float32: then the inputs are cast to it.
    "HunYuanMoEV1Gate": RouterRule("softmax", True, "weight_dtype", "logits", weight="wg.weight"),
    "AfmoeTokenChoiceRouter": RouterRule(
        "sigmoid",
        True,
        "model_then_fp32",
        "float32",
        weight="gate.weight",
        expert_bias_argument=True,
        scale="route_scale",
        batched_input=True,
    ),
    # Top-k on the logits, then softmax over the k selected; its sigmoid option computes
    # the scores in the model's dtype.
    "Cohere2MoeTopKRouter": RouterRule(
        "softmax", True, "model", "hidden", conditions=(("expert_selection_fn", "softmax"),)
    ),
    "DeepseekV2TopkRouter": _DEEPSEEK_V2,
    "DeepseekOcr2TextTopkRouter": _DEEPSEEK_V2,
    "UnlimitedOcrTextTopkRouter": _DEEPSEEK_V2,
}


def _unmet_condition(router: Any, rule: RouterRule) -> str | None:
    """Which of ``rule.conditions`` the router does not meet (None: all met)."""
    for attribute, value in rule.conditions:
        actual = getattr(router, attribute, None)
        if actual != value:
            return f"{attribute} = {value!r}, the router has {actual!r}"
    return None


def rule_for(router: Any, rules: RouterRule | tuple[RouterRule, ...]) -> tuple[RouterRule | None, str]:
    """The first of ``rules`` (a class's entry in ``RULES``) whose conditions ``router``
    meets, or None and what they need."""
    unmet = []
    for rule in rules if isinstance(rules, tuple) else (rules,):
        problem = _unmet_condition(router, rule)
        if problem is None:
            return rule, ""
        unmet.append(problem)
    return None, "its rule needs " + "; or ".join(unmet)


def _attribute(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _linear(router: Any, rule: RouterRule) -> tuple[Tensor, Tensor | None]:
    """The router's weight (at ``rule.weight``) and, with ``rule.linear_bias``, the bias of
    the same module."""
    owner, _, name = rule.weight.rpartition(".")
    layer = _attribute(router, owner) if owner else router
    return getattr(layer, name), (layer.bias if rule.linear_bias else None)


def _router_logits(x: Tensor, weight: Tensor, bias: Tensor | None, rule: RouterRule) -> Tensor:
    if rule.logits == "fp32":
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if rule.logits == "weight_dtype":
        x = x.to(weight.dtype)
    logits = F.linear(x, weight, bias)
    return logits.float() if rule.logits == "model_then_fp32" else logits


def make_forward(rule: RouterRule) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The replacement ``forward(hidden_states) -> (logits, weights, indices)`` for ``rule``
    (``forward(hidden_states, expert_bias)`` where the block passes the bias)."""

    def forward(
        self: Any, hidden_states: Tensor, expert_bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        weight, bias = _linear(self, rule)
        x = hidden_states.reshape(-1, weight.shape[1])
        logits = _router_logits(x, weight, bias, rule)
        normalize = (
            rule.normalize if isinstance(rule.normalize, bool) else bool(getattr(self, rule.normalize))
        )
        if rule.expert_bias_argument:
            if expert_bias is None:
                raise TypeError(
                    f"{type(self).__name__}.forward: expected the selection bias as its second "
                    "argument (the MoE block passes it), got None"
                )
        elif rule.expert_bias:
            expert_bias = _attribute(self, rule.expert_bias)
        weights, experts = topk_gating(
            logits,
            self.top_k,
            score=rule.score,
            normalize=normalize,
            expert_bias=None if expert_bias is None else expert_bias.float().reshape(-1),
            num_groups=self.num_group if rule.groups else None,
            topk_groups=self.topk_group if rule.groups else None,
            group_score_k=rule.group_score_k,
            scale=float(getattr(self, rule.scale)) if rule.scale else 1.0,
        )
        if rule.weights_dtype == "logits":
            weights = weights.to(logits.dtype)
        elif rule.weights_dtype == "hidden":
            weights = weights.to(hidden_states.dtype)
        return logits, weights, experts

    return forward


def verify_rule(router: torch.nn.Module, rule: RouterRule, original: Callable[..., Any]) -> str | None:
    """Compare ``rule``'s forward with the router's ``original`` forward on a copy of the
    router with random weights and random inputs. Returns None when they agree (identical
    logits and expert sets, weights within float32 rounding), else what differed."""
    try:
        weight = _attribute(router, rule.weight)
    except AttributeError:
        weight = None
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.is_meta:
        return f"the router has no materialised [num_experts, hidden] weight at {rule.weight}"
    probe = copy.deepcopy(router).float()
    generator = torch.Generator(device=weight.device).manual_seed(0)
    with torch.no_grad():
        for tensor in [*probe.parameters(), *probe.buffers()]:
            if tensor.is_floating_point():
                std = weight.shape[1] ** -0.5 if tensor.dim() > 1 else 0.1
                tensor.copy_(torch.randn(tensor.shape, generator=generator, device=tensor.device) * std)
        x = torch.randn(64, weight.shape[1], generator=generator, device=weight.device)
        if rule.batched_input:
            x = x.unsqueeze(0)
        # (A bias passed by the block: random, like the router's own buffers.)
        extra = (
            (torch.randn(weight.shape[0], generator=generator, device=weight.device) * 0.1,)
            if rule.expert_bias_argument
            else ()
        )
        try:
            expected = original(probe, x, *extra)
        except Exception as error:  # the original forward needs something this probe lacks
            return f"its forward failed on a probe input ({type(error).__name__}: {error})"
        actual = make_forward(rule)(probe, x, *extra)
    if not (isinstance(expected, tuple) and len(expected) == 3):
        return "its forward does not return (logits, weights, indices)"
    logits, weights, experts = expected
    if not torch.equal(actual[0], logits):
        return "the logits differ"
    order, actual_order = experts.argsort(-1), actual[2].argsort(-1)
    if not torch.equal(experts.gather(-1, order), actual[2].gather(-1, actual_order)):
        return "the selected experts differ"
    if actual[1].dtype != weights.dtype:
        return f"the weights' dtype differs ({actual[1].dtype} vs {weights.dtype})"
    if not torch.allclose(
        actual[1].gather(-1, actual_order).double(), weights.gather(-1, order).double(), rtol=1e-5, atol=1e-6
    ):
        return "the weights differ"
    return None
