"""sparseroute.patch on transformers MoE models on the GPU: the patched model (CUDA gating,
dispatch, grouped experts) against transformers' eager experts on the same device, outputs and
every gradient."""

import copy
import warnings

import pytest
import torch

import sparseroute

transformers = pytest.importorskip("transformers", minversion="5.0")

from hf_models import FAMILIES, build  # noqa: E402

FAMILIES_ON_GPU = [f for f in ("mixtral", "olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss") if f in FAMILIES]


def run(model, input_ids, probe=None):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if probe is None:
        probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)).to(logits.device)
    (logits * probe).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, probe


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("family", FAMILIES_ON_GPU)
def test_patched_model_on_cuda_matches_eager(family):
    try:
        eager = build(family).cuda()
    except (ImportError, AttributeError, TypeError) as err:  # not in this transformers version
        pytest.skip(f"{family}: {err}")
    patched = copy.deepcopy(eager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sparseroute.patch(patched) == eager.config.num_hidden_layers
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3)).cuda()
    logits_e, grads_e, probe = run(eager, input_ids)
    logits_p, grads_p, _ = run(patched, input_ids, probe)
    assert logits_p.device.type == "cuda"
    assert relative_error(logits_p, logits_e) <= 1e-4
    assert grads_p.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        assert relative_error(grads_p[name], grad) <= 1e-4, name
