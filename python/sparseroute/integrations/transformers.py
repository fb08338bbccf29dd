"""Hugging Face transformers (>= 5) integration: an experts implementation and router patching.

transformers 5 splits every MoE block into a router module (logits -> top-k weights and
indices) and an experts module whose ``forward(hidden_states, top_k_index, top_k_weights)``
is looked up by name in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``. This module

* registers ``experts_forward`` there as ``"sparseroute"``: permute, ``grouped_linear`` per
  projection, the experts class's own gate and activation, unpermute. It happens as soon as
  both sparseroute and ``transformers.integrations.moe`` are imported, whichever comes first,
  so ``from_pretrained(..., experts_implementation="sparseroute")`` and
  ``model.set_experts_implementation("sparseroute")`` work after ``import sparseroute``;
* provides ``patch(model)`` / ``unpatch(model)``, which also replace the routers' forward
  with ``topk_gating`` (see ``sparseroute.integrations.routers``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute.ops.dispatch import permute, unpermute
from sparseroute.ops.experts import gated_activation, grouped_linear

IMPLEMENTATION_NAME = "sparseroute"
_MOE_MODULE = "transformers.integrations.moe"


def experts_forward(self: Any, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The "sparseroute" experts implementation of transformers 5's experts classes.

    ``self`` is an experts module decorated by transformers' ``use_experts_implementation``:
    it carries the layout flags (``has_gate``, ``has_bias``, ``is_transposed``,
    ``has_post_expert_norm``) and the class's own ``_apply_gate`` (which knows whether gate
    and up are concatenated or interleaved, and any clamping) and ``act_fn``.
    """
    weight_up = self.gate_up_proj if self.has_gate else self.up_proj
    bias_up = None
    bias_down = None
    if self.has_bias:
        bias_up = self.gate_up_proj_bias if self.has_gate else self.up_proj_bias
        bias_down = self.down_proj_bias
    experts = top_k_index
    # Every slot holds one of the experts, so the rows are exactly T * k: a static count
    # spares permute reading its row count back from the device (a host synchronisation on
    # CUDA, which would stall the queue of kernels) and keeps shapes static under compile.
    num_rows: int | None = experts.numel()
    if getattr(self, "_is_expert_parallel", False):
        # Expert parallelism marks slots of experts held by other ranks with ids >= num_experts;
        # they become empty slots, which get no row and contribute nothing. The local rows are
        # then counted (T * k would pad the buffers with every other rank's share).
        experts = torch.where(top_k_index < self.num_experts, top_k_index, -1)
        num_rows = None
    x = hidden_states.to(weight_up.dtype)
    x_sorted, plan = permute(x, experts, self.num_experts, num_rows=num_rows)
    h = grouped_linear(x_sorted, plan.offsets, weight_up, bias_up, transposed=self.is_transposed)
    if not self.has_gate:
        h = self.act_fn(h)
    elif _is_default_silu_gate(self):
        h = gated_activation(h, F.silu, "concatenated")
    else:
        h = self._apply_gate(h)
    y_sorted = grouped_linear(h, plan.offsets, self.down_proj, bias_down, transposed=self.is_transposed)
    if getattr(self, "has_post_expert_norm", False):
        y_sorted = self.post_expert_norm(y_sorted)
    y: Tensor = unpermute(y_sorted, plan, top_k_weights)
    return y.to(hidden_states.dtype)


def _is_default_silu_gate(experts: Any) -> bool:
    """Whether the class gates with transformers' default ``act_fn(gate) * up`` on
    concatenated halves and ``act_fn`` is a plain SiLU: then the fused SiLU gate computes
    the same values with a cheaper backward."""
    gate = getattr(type(experts), "_apply_gate", None)
    if (
        getattr(gate, "__name__", None) != "_default_apply_gate"
        or getattr(gate, "__module__", None) != _MOE_MODULE
    ):
        return False
    act = getattr(experts, "act_fn", None)
    if isinstance(act, torch.nn.Module) and "forward" in vars(act):
        return False  # a forward replaced on the instance (e.g. by a kernel hub)
    is_silu_module = type(act) is torch.nn.SiLU or (
        type(act).__name__ == "SiLUActivation" and type(act).__module__ == "transformers.activations"
    )
    return is_silu_module or act is F.silu


def register() -> None:
    """Register ``experts_forward`` in transformers' experts registry (idempotent).

    Importing sparseroute arranges this automatically; call it directly only when
    transformers' registry was replaced after both were imported.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, experts_forward)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the experts implementation right after transformers' MoE module loads.

    Importing transformers costs seconds, so sparseroute never imports it itself; this
    finder waits for the user's own import instead. It only wraps the loader that the
    regular finders return for that one module name.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MOE_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            original_exec(module)
            module.ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, experts_forward)
            _uninstall_hook()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_HOOK = _RegisterOnImport()


def _uninstall_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register now if transformers' MoE module is loaded, else as soon as it is."""
    if _MOE_MODULE in sys.modules:
        register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


# --- patch / unpatch ---------------------------------------------------------------------

_PATCH_STATE = "_sparseroute_patch_state"
_ROUTER_FLAG = "_sparseroute_router_rule"


def _is_experts_module(module: torch.nn.Module) -> bool:
    """An experts module of transformers' ``use_experts_implementation`` kind."""
    return hasattr(module, "has_gate") and hasattr(module, "down_proj") and hasattr(module, "config")


def _router_candidates(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The routers of the MoE blocks: the siblings named gate or router of experts modules."""
    found: dict[str, torch.nn.Module] = {}
    for block_name, block in model.named_modules():
        children = dict(block.named_children())
        if not any(_is_experts_module(child) for child in children.values()):
            continue
        for name in ("gate", "router"):
            child = children.get(name)
            if child is not None and not _is_experts_module(child):
                found[f"{block_name}.{name}" if block_name else name] = child
    return found


def patch(model: torch.nn.Module, *, routers: bool = True, verify: bool = True) -> int:
    """Accelerate the MoE layers of a transformers (>= 5) model in place.

    Switches every experts module to the "sparseroute" experts implementation and, with
    ``routers=True``, replaces the forward of every router whose class has a rule (see
    ``sparseroute.integrations.routers.RULES``) with ``topk_gating`` configured like the
    original: score function, renormalisation, selection bias, group limit and scaling
    factor. Router logits (recorded by transformers for the load-balancing loss) are
    computed exactly as before. Router classes without a rule, or whose rule fails the
    check against the original forward (``verify=True``), are left alone with a warning
    naming them.

    Returns:
        The number of MoE layers (experts modules) switched.

    Raises:
        ValueError: if ``model`` has no transformers MoE experts modules.
    """
    import warnings

    from sparseroute.integrations.routers import RULES, RouterRule, make_forward, rule_for, verify_rule

    experts_modules = [m for m in model.modules() if _is_experts_module(m)]
    if not experts_modules:
        raise ValueError(
            f"model: expected a transformers (>= 5) model with MoE experts modules, found none in "
            f"{type(model).__name__}"
        )
    install()
    register()
    if not hasattr(model, _PATCH_STATE):
        setattr(model, _PATCH_STATE, _experts_implementations(model, experts_modules))
    _set_experts_implementation(model, experts_modules, IMPLEMENTATION_NAME)

    if routers:
        declined: dict[str, str] = {}
        verified: dict[tuple[type, RouterRule], str | None] = {}
        for name, router in _router_candidates(model).items():
            cls = type(router)
            rules = RULES.get(cls.__name__)
            if rules is None:
                declined.setdefault(cls.__name__, f"no rule for this router class (at {name})")
                continue
            rule, unmet = rule_for(router, rules)
            if rule is None:
                declined.setdefault(cls.__name__, f"{unmet} (at {name})")
                continue
            if getattr(router, _ROUTER_FLAG, None) is rule:
                continue
            if verify:
                if (cls, rule) not in verified:
                    verified[cls, rule] = verify_rule(router, rule, cls.forward)
                problem = verified[cls, rule]
                if problem is not None:
                    declined.setdefault(cls.__name__, f"its rule does not match the original: {problem}")
                    continue
            router.forward = types.MethodType(make_forward(rule), router)
            setattr(router, _ROUTER_FLAG, rule)
        for cls_name, reason in declined.items():
            warnings.warn(
                f"sparseroute.patch: left router class {cls_name} alone ({reason}); its experts "
                "still use sparseroute",
                stacklevel=2,
            )
    return len(experts_modules)


def unpatch(model: torch.nn.Module) -> int:
    """Undo ``patch``: restore the routers' forward and the previous experts implementation.

    Returns:
        The number of routers restored.
    """
    restored = 0
    for module in model.modules():
        if hasattr(module, _ROUTER_FLAG):
            del module.forward
            delattr(module, _ROUTER_FLAG)
            restored += 1
    previous = getattr(model, _PATCH_STATE, None)
    if previous is not None:
        experts_modules = [m for m in model.modules() if _is_experts_module(m)]
        _set_experts_implementation(model, experts_modules, previous)
        delattr(model, _PATCH_STATE)
    return restored


def _experts_implementations(model: torch.nn.Module, experts_modules: list[torch.nn.Module]) -> Any:
    getter = getattr(model, "get_experts_implementation", None)
    if getter is not None:
        return getter()
    configs: list[Any] = [getattr(m, "config") for m in experts_modules]  # noqa: B009
    return {id(config): config._experts_implementation for config in configs}


def _set_experts_implementation(
    model: torch.nn.Module, experts_modules: list[torch.nn.Module], value: Any
) -> None:
    """Set through the model's own API when it is a PreTrainedModel, else on the configs the
    experts modules hold (a bare MoE block)."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter(value)
        return
    for module in experts_modules:
        config: Any = getattr(module, "config")  # noqa: B009
        config._experts_implementation = value[id(config)] if isinstance(value, dict) else value
