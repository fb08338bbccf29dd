"""sparseroute.patch on transformers (>= 5) MoE models: identical results, faster code.

Every family in hf_models.FAMILIES is built tiny and random, run once with transformers'
"eager" experts and once patched; outputs, every gradient, the routers' logits and the
selected experts must agree.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import sparseroute  # noqa: E402
from sparseroute.integrations.routers import RULES  # noqa: E402
from sparseroute.integrations.transformers import (  # noqa: E402
    _ROUTER_FLAG,
    _router_candidates,
    experts_forward,
)

from hf_models import FAMILIES, build  # noqa: E402


def routers_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The routers of the model's MoE blocks (as patch finds them)."""
    return _router_candidates(model)


def run(model: torch.nn.Module, input_ids: torch.Tensor, probe: torch.Tensor | None = None):
    """Output, gradients of a random projection of it, and every router's outputs."""
    captured: dict[str, tuple] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
        for name, module in routers_of(model).items()
    ]
    model.zero_grad(set_to_none=True)
    try:
        out = model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if probe is None:
        probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * probe).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, captured, probe


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in the 2-norm."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} exceeds {rtol:g}"


def by_name(logits: torch.Tensor, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A run's output and gradients under the names the comparisons report."""
    return {"model output": logits, **{f"gradient of {n}": g for n, g in grads.items()}}


def eager_rounding_variants(eager: torch.nn.Module, input_ids: torch.Tensor, probe: torch.Tensor):
    """``(output, gradients)`` of eager under changes that only move float32 rounding: one
    thread instead of torch's default, and every weight one float32 step up or down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logits, grads, _, _ = run(eager, input_ids, probe)
    finally:
        torch.set_num_threads(threads)
    yield logits, grads
    for step in (2.0**-23, -(2.0**-24)):
        nudged = copy.deepcopy(eager)
        with torch.no_grad():
            for parameter in nudged.parameters():
                parameter.mul_(1 + step)
        logits, grads, _, _ = run(nudged, input_ids, probe)
        yield logits, grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_model_matches_eager(family):
    assert_patched_matches_eager(family)


#: Router options that select another rule of the same class: (family, config values).
RULE_VARIANTS = [
    # DeepSeek-V2's group-limited greedy routing: groups scored by their best expert.
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
]


@pytest.mark.parametrize(("family", "config"), RULE_VARIANTS, ids=[f for f, _ in RULE_VARIANTS])
def test_patched_variant_matches_eager(family, config):
    assert_patched_matches_eager(family, config)


def assert_patched_matches_eager(family: str, config: dict | None = None) -> None:
    """Patch a tiny ``family`` model (``config``: values over its tiny configuration) and
    compare it with eager: outputs and gradients, routers' logits, experts and dtypes."""
    eager = build(family, config=config)
    patched = copy.deepcopy(eager)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = sparseroute.patch(patched)
    assert layers == eager.config.num_hidden_layers
    known = {type(r).__name__ for r in routers_of(eager).values()} <= set(RULES)
    assert all(getattr(r, _ROUTER_FLAG, None) is not None for r in routers_of(patched).values()) == known
    assert bool([w for w in caught if "left router class" in str(w.message)]) != known

    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    logits_e, grads_e, routers_e, probe = run(eager, input_ids)
    logits_p, grads_p, routers_p, _ = run(patched, input_ids, probe)

    assert grads_p.keys() == grads_e.keys()
    patched_outputs = by_name(logits_p, grads_p)
    outputs = {what: (patched_outputs[what], e) for what, e in by_name(logits_e, grads_e).items()}
    ill_conditioned = [what for what, (a, e) in outputs.items() if relative_error(a, e) > 1e-5]
    if ill_conditioned:
        # Some models amplify float32 rounding beyond 1e-5 by themselves (e.g. HY-V4's
        # hyper-connection scales): there, sparseroute must be about as accurate as eager,
        # measured against the same model in float64. Eager's own error there moves by
        # several times under any change of rounding (HY-V4's hc_head.hc_scale: 8.6e-6; on
        # one thread instead of two, 1.2e-5; every weight one float32 step up or down, 2.9e-5
        # and 1.6e-6), so the bound is taken over such variants of eager, not one run.
        truth = copy.deepcopy(eager).double()
        logits_t, grads_t, _, _ = run(truth, input_ids, probe.double())
        truths = by_name(logits_t, grads_t)
        eager_errors = {what: relative_error(outputs[what][1], truths[what]) for what in ill_conditioned}
        for logits_v, grads_v in eager_rounding_variants(eager, input_ids, probe):
            variant = by_name(logits_v, grads_v)
            for what in ill_conditioned:
                eager_errors[what] = max(eager_errors[what], relative_error(variant[what], truths[what]))
        for what in ill_conditioned:
            actual, expected = outputs[what]
            assert relative_error(actual, truths[what]) <= max(4 * eager_errors[what], 1e-5), (
                f"{what}: differs from eager by {relative_error(actual, expected):.3g} and is less "
                f"accurate than eager ({eager_errors[what]:.3g} at worst) against float64"
            )
    assert routers_p.keys() == routers_e.keys() and routers_e
    for name, (router_logits, weights, experts) in routers_e.items():
        p_logits, p_weights, p_experts = routers_p[name]
        if name == min(routers_e):
            # The first router sees identical inputs: its logits must be bit-identical.
            assert torch.equal(p_logits, router_logits), f"{name}: router logits changed"
        assert_close_relative(p_logits, router_logits, 1e-5, f"{name} logits")
        assert p_logits.dtype == router_logits.dtype
        assert torch.equal(p_experts.sort(-1).values, experts.sort(-1).values), f"{name}: experts differ"
        assert p_weights.dtype == weights.dtype


@pytest.mark.parametrize(
    "family",
    [
        "mixtral",
        "qwen2_moe",
        "deepseek_v3",
        "gpt_oss",
        "minimax_m2",
        "ernie4_5_moe",
        "laguna",
        "hunyuan_v1_moe",
        "afmoe",
    ],
)
def test_patched_bfloat16_model_is_within_bfloat16_tolerance(family):
    eager = build(family).to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    sparseroute.patch(patched)
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = eager(input_ids=input_ids, use_cache=False).logits.float()
        actual = patched(input_ids=input_ids, use_cache=False).logits.float()
    assert_close_relative(actual, expected, 3e-2, "bf16 model output")


def test_experts_implementation_is_registered_by_import():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["sparseroute"] is experts_forward


def test_set_experts_implementation_and_from_config():
    eager = build("olmoe")
    model = copy.deepcopy(eager)
    model.set_experts_implementation("sparseroute")
    input_ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=input_ids).logits, eager(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5
        )
    config = copy.deepcopy(eager.config)
    config._experts_implementation = "sparseroute"
    fresh = type(eager)(config)
    assert fresh.config._experts_implementation == "sparseroute"


def test_unpatch_restores_the_original_model():
    model = build("deepseek_v3")
    before = model.get_experts_implementation()
    sparseroute.patch(model)
    assert model.get_experts_implementation() != before
    restored = sparseroute.unpatch(model)
    assert restored == model.config.num_hidden_layers
    assert model.get_experts_implementation() == before
    assert not any(hasattr(m, _ROUTER_FLAG) or "forward" in vars(m) for m in model.modules())


def test_patch_is_idempotent():
    model = build("mixtral")
    assert sparseroute.patch(model) == sparseroute.patch(model) == 2
    sparseroute.unpatch(model)
    assert model.get_experts_implementation()[""] == "eager"


def test_patch_a_bare_moe_block():
    model = build("qwen3_moe")
    block = model.model.layers[0].mlp
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = block(x)
        assert sparseroute.patch(block) == 1
        actual = block(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    sparseroute.unpatch(block)
    assert block.experts.config._experts_implementation == "eager"


def test_model_without_moe_layers_raises():
    with pytest.raises(ValueError, match=r"model: expected a transformers .* MoE experts modules"):
        sparseroute.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_rule_that_does_not_match_is_declined(monkeypatch):
    """A router whose math changed (here: a rule with the wrong score function) is left
    alone with a warning rather than silently computing something else."""
    from sparseroute.integrations import routers

    wrong = routers.RouterRule("sigmoid", True, "model", "float32")
    monkeypatch.setitem(routers.RULES, "MixtralTopKRouter", wrong)
    model = build("mixtral")
    with pytest.warns(UserWarning, match="MixtralTopKRouter .* rule does not match the original"):
        sparseroute.patch(model)
    assert not any(hasattr(m, _ROUTER_FLAG) for m in model.modules())


@pytest.mark.parametrize(
    ("family", "config", "needs"),
    [
        # Cohere2-MoE's sigmoid option computes scores in the model's dtype.
        ("cohere2_moe", dict(expert_selection_fn="sigmoid"), "expert_selection_fn"),
        ("laguna", dict(moe_router_logit_softcapping=30.0), "router_logit_softcapping"),
        # AXK2 fills excluded groups' keys with 0 rather than excluding them.
        ("axk2", dict(n_group=2, topk_group=1), "num_group"),
    ],
)
@pytest.mark.parametrize("verify", [True, False])
def test_a_router_configured_outside_its_rule_is_declined(family, config, needs, verify):
    """A rule that needs router options (``RouterRule.conditions``) is not used where the
    router has others, with or without verification; the experts are still switched, and
    the model computes what eager computes."""
    eager = build(family, config=config)
    patched = copy.deepcopy(eager)
    with pytest.warns(UserWarning, match=f"its rule needs {needs} = "):
        assert sparseroute.patch(patched, verify=verify) == eager.config.num_hidden_layers
    assert not any(hasattr(m, _ROUTER_FLAG) for m in patched.modules())
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    logits_e, grads_e, _, probe = run(eager, input_ids)
    logits_p, grads_p, _, _ = run(patched, input_ids, probe)
    assert_close_relative(logits_p, logits_e, 1e-5, "model output")
    for name, grad in grads_e.items():
        assert_close_relative(grads_p[name], grad, 1e-5, f"gradient of {name}")


def test_expert_parallel_sentinels_contribute_nothing():
    model = build("mixtral")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(8))
    index = torch.tensor([[0, 8], [1, 2], [9, 3], [4, 5], [6, 7], [8, 9]])
    weights = torch.rand(6, 2, generator=torch.Generator().manual_seed(9))
    experts._is_expert_parallel = True
    kept = index < experts.num_experts
    with torch.no_grad():
        actual = experts_forward(experts, x, index, weights)
        expected = experts_forward(experts, x, torch.where(kept, index, 0), weights * kept)
    torch.testing.assert_close(actual, expected)


def test_from_pretrained_with_the_sparseroute_experts_implementation(tmp_path):
    eager = build("qwen2_moe")
    eager.save_pretrained(tmp_path)
    loaded = type(eager).from_pretrained(tmp_path, experts_implementation="sparseroute")
    assert loaded.config._experts_implementation == "sparseroute"
    input_ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=input_ids).logits, eager(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5
        )
