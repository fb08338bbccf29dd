"""sparseroute.nn.SparseMoE on the GPU: the same layer on CUDA and on the CPU (CUDA gating,
dispatch and grouped experts against the Rust kernels), outputs, routing and every gradient;
bfloat16 on CUDA (torch's grouped GEMM) against the float32 layer."""

import copy

import pytest
import torch

from sparseroute.nn import SparseMoE

OPTIONS = {
    "dropless": dict(),
    "deepseek": dict(score="sigmoid", expert_bias=True, num_groups=4, topk_groups=2, scale=2.5),
    "plain-mlp-shared": dict(gated=False, shared_expert_size=12),
    "capacity-probs": dict(capacity_factor=1.0, drop_policy="probs"),
    "capacity-position-padded": dict(capacity_factor=1.25, drop_policy="position", pad_to_capacity=True),
    "capacity-renormalized": dict(capacity_factor=1.0, renormalize_after_drop=True),
}


def layer_pair(options, dtype=torch.float32):
    torch.manual_seed(0)
    cpu = SparseMoE(32, 16, 8, 2, **options)
    if cpu.expert_bias is not None:
        cpu.expert_bias.normal_(0, 0.1)
    gpu = copy.deepcopy(cpu).to(device="cuda", dtype=dtype)
    if gpu.expert_bias is not None:
        gpu.expert_bias.data = cpu.expert_bias.cuda()  # a float32 buffer whatever the layer's dtype
    return cpu, gpu


def forward_backward(layer, x, probe):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    (out.output.float() * probe).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out, x.grad, grads


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_sparse_moe_on_cuda_matches_the_cpu(options):
    cpu, gpu = layer_pair(options)
    x = torch.randn(4, 33, 32, generator=torch.Generator().manual_seed(1))
    probe = torch.randn(4, 33, 32, generator=torch.Generator().manual_seed(2))
    out_cpu, dx_cpu, grads_cpu = forward_backward(cpu, x, probe)
    out_gpu, dx_gpu, grads_gpu = forward_backward(gpu, x.cuda(), probe.cuda())
    assert torch.equal(out_gpu.experts.cpu(), out_cpu.experts)
    assert torch.equal(out_gpu.tokens_per_expert.cpu(), out_cpu.tokens_per_expert)
    assert torch.equal(out_gpu.dropped.cpu(), out_cpu.dropped)
    torch.testing.assert_close(out_gpu.output.cpu(), out_cpu.output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx_gpu.cpu(), dx_cpu, rtol=1e-4, atol=1e-5)
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name].cpu(), grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "options", [OPTIONS["dropless"], OPTIONS["capacity-probs"]], ids=["dropless", "capacity"]
)
def test_bfloat16_sparse_moe_on_cuda_is_close_to_float32(options):
    cpu, gpu = layer_pair(options, dtype=torch.bfloat16)
    # Inputs exact in bfloat16, so that both layers see the same values.
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(3)).bfloat16().float()
    probe = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(4))
    reference = copy.deepcopy(cpu)
    with torch.no_grad():
        for p_ref, p_gpu in zip(reference.parameters(), gpu.parameters(), strict=True):
            p_ref.copy_(p_gpu.float().cpu())  # the bfloat16 weights, exactly
    out_ref, dx_ref, _ = forward_backward(reference, x, probe)
    out_gpu, dx_gpu, _ = forward_backward(gpu, x.cuda().bfloat16(), probe.cuda())
    assert out_gpu.output.dtype == torch.bfloat16
    routed_alike = (out_gpu.experts.cpu() == out_ref.experts).all(dim=1)
    assert routed_alike.float().mean() > 0.95  # bfloat16 router logits may flip near-ties
    rows = routed_alike.reshape(-1)
    for actual, expected in ((out_gpu.output, out_ref.output), (dx_gpu, dx_ref)):
        actual = actual.detach().float().cpu().reshape(-1, 32)[rows]
        expected = expected.detach().reshape(-1, 32)[rows]
        assert float((actual - expected).norm() / expected.norm()) < 2e-2
