"""The Python wrappers around the CUDA kernels: the load-balancing and z-losses (with masks on
the logits' device) and Gumbel routing noise, on CUDA tensors against the CPU."""

import pytest
import torch

import sparseroute


def _logits(seed, tokens=96, experts=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, experts, generator=g).to(dtype)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_the_cpu(scope, masked):
    logits = _logits(0)
    _, experts = sparseroute.topk_gating(logits, 2)
    mask = (torch.arange(96).view(4, 24) % 5 != 0) if masked else None
    kwargs = {"scope": scope, "seq_len": 24 if scope == "sequence" else None}
    cpu_logits = logits.clone().requires_grad_()
    gpu_logits = logits.cuda().requires_grad_()
    cpu = sparseroute.load_balancing_loss(cpu_logits, experts, attention_mask=mask, **kwargs)
    gpu = sparseroute.load_balancing_loss(
        gpu_logits, experts.cuda(), attention_mask=None if mask is None else mask.cuda(), **kwargs
    )
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    (cpu_grad,) = torch.autograd.grad(cpu, cpu_logits)
    (gpu_grad,) = torch.autograd.grad(gpu, gpu_logits)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-6)


def test_z_loss_with_a_mask_matches_the_cpu():
    logits = _logits(1)
    mask = torch.arange(96) % 3 != 0
    cpu_logits = logits.clone().requires_grad_()
    gpu_logits = logits.cuda().requires_grad_()
    cpu = sparseroute.z_loss(cpu_logits, mask)
    gpu = sparseroute.z_loss(gpu_logits, mask.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    (cpu_grad,) = torch.autograd.grad(cpu, cpu_logits)
    (gpu_grad,) = torch.autograd.grad(gpu, gpu_logits)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-6)


def test_masks_must_be_on_the_logits_device():
    with pytest.raises(ValueError, match="attention_mask: expected a tensor on the device of logits"):
        sparseroute.z_loss(_logits(2).cuda(), torch.ones(96, dtype=torch.bool))


def test_gumbel_noise_is_drawn_on_the_logits_device_and_reproducible():
    logits = _logits(3).cuda()

    def draw():
        generator = torch.Generator(device="cuda").manual_seed(7)
        return sparseroute.topk_gating(logits, 2, gumbel_noise=True, generator=generator)

    (w1, e1), (w2, e2) = draw(), draw()
    assert e1.device.type == "cuda" and torch.equal(e1, e2) and torch.equal(w1, w2)
    assert bool(((e1 >= 0) & (e1 < 12)).all())
