"""asv benchmarks on a CUDA device: sparseroute's CUDA kernels next to the torch code they
replace, with the torch baselines of the CPU suites (routing.py, variants.py) and the same
Hugging Face MoE blocks (moe_block.py), in bfloat16 at T = 16384 (2048 for the blocks; the
DeepSeek-V3 routing in float32).

Every timed call ends with ``torch.cuda.synchronize()``, so a sample is one call's host work
and its GPU time, as a training step meets the op. ``benches/gpu_bench.py`` adds what asv
cannot time: the GPU time alone (CUDA graph replays), calls queued back to back, and the
device's copy bandwidth. Without a CUDA device, or without sparseroute's CUDA backend (CuPy),
setup raises NotImplementedError and asv skips these benchmarks.
"""

from __future__ import annotations

import torch

import sparseroute

from .moe_block import SHAPES, build_block
from .routing import (
    BLOCK_ROWS,
    IMPLS,
    deepseek_v3_gating,
    torch_block_permute,
    torch_gating,
    torch_permute,
    torch_unpermute,
)
from .variants import torch_expert_choice, torch_mixtral_loss, torch_sinkhorn, torch_topp

TOKENS = 16384


def cuda_ready() -> None:
    """Raises NotImplementedError (asv skips the benchmark) unless sparseroute's CUDA kernels
    run here, and compiles them all, so that no sample includes a compilation."""
    if not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device")
    try:
        sparseroute.warm_up_cuda()
    except Exception as err:  # CuPy or NVRTC missing: say why, then skip
        raise NotImplementedError(f"sparseroute's CUDA backend does not load: {err}") from err


def router_logits(num_tokens: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(num_tokens, num_experts, device="cuda", generator=g, dtype=torch.bfloat16)


class GpuGating:
    params = ([8, 64, 256], [2, 8], IMPLS)
    param_names = ["E", "k", "impl"]
    repeat = (3, 50, 20.0)
    number = 1

    def setup(self, E, k, impl):
        cuda_ready()
        self.logits = router_logits(TOKENS, E)
        self.grad = torch.randn(TOKENS, k, device="cuda")
        self.fn = torch_gating if impl == "torch" else sparseroute.topk_gating

    def time_forward(self, E, k, impl):
        self.fn(self.logits, k)
        torch.cuda.synchronize()

    def time_forward_backward(self, E, k, impl):
        logits = self.logits.detach().requires_grad_()
        weights, _ = self.fn(logits, k)
        weights.backward(self.grad)
        torch.cuda.synchronize()


class GpuGroupLimitedGating:
    """DeepSeek-V3's routing (E = 256, k = 8, sigmoid, selection bias, 8 groups of which 4
    compete, scale 2.5) on the GPU, against its Hugging Face router code, forward. float32
    logits, as the model's router computes them."""

    params = (IMPLS,)
    param_names = ["impl"]
    repeat = (3, 50, 20.0)
    number = 1

    def setup(self, impl):
        cuda_ready()
        self.logits = router_logits(TOKENS, 256).float()
        self.bias = (
            torch.randn(256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)) * 0.01
        )

    def time_forward(self, impl):
        deepseek_v3_gating(impl, self.logits, self.bias)
        torch.cuda.synchronize()


class GpuDispatch:
    params = ([8, 64], [2, 8], [2048], IMPLS)
    param_names = ["E", "k", "d", "impl"]
    repeat = (3, 30, 20.0)
    number = 1

    def setup(self, E, k, d, impl):
        cuda_ready()
        self.weights, self.experts = sparseroute.topk_gating(router_logits(TOKENS, E), k)
        g = torch.Generator(device="cuda").manual_seed(1)
        self.x = torch.randn(TOKENS, d, device="cuda", generator=g, dtype=torch.bfloat16)
        self.grad = torch.randn(TOKENS, d, device="cuda", generator=g, dtype=torch.bfloat16)
        # Static row counts (num_rows = T * k): the plan needs no host sync.
        self.num_rows = TOKENS * k
        if impl == "torch":
            self.y_sorted, self.order = torch_permute(self.x, self.experts)
        else:
            self.y_sorted, self.plan = sparseroute.permute(self.x, self.experts, E, num_rows=self.num_rows)

    def time_permute(self, E, k, d, impl):
        if impl == "torch":
            torch_permute(self.x, self.experts)
        else:
            sparseroute.permute(self.x, self.experts, E, num_rows=self.num_rows)
        torch.cuda.synchronize()

    def time_permute_blocks(self, E, k, d, impl):
        if impl == "torch":
            torch_block_permute(self.x, self.experts, E, BLOCK_ROWS)
        else:
            rows = sparseroute.max_permuted_rows(TOKENS * k, E, BLOCK_ROWS)
            sparseroute.permute(self.x, self.experts, E, num_rows=rows, block_size=BLOCK_ROWS)
        torch.cuda.synchronize()

    def time_unpermute(self, E, k, d, impl):
        if impl == "torch":
            torch_unpermute(self.y_sorted, self.order, self.weights, TOKENS)
        else:
            sparseroute.unpermute(self.y_sorted, self.plan, self.weights)
        torch.cuda.synchronize()

    def time_round_trip_forward_backward(self, E, k, d, impl):
        x = self.x.detach().requires_grad_()
        weights = self.weights.detach().requires_grad_()
        if impl == "torch":
            x_sorted, order = torch_permute(x, self.experts)
            y = torch_unpermute(x_sorted, order, weights, TOKENS)
        else:
            x_sorted, plan = sparseroute.permute(x, self.experts, E, num_rows=self.num_rows)
            y = sparseroute.unpermute(x_sorted, plan, weights)
        y.backward(self.grad)
        torch.cuda.synchronize()


class GpuVariants:
    """Top-p, expert choice, Sinkhorn and the two balancing losses, at E = 64."""

    params = ([64], IMPLS)
    param_names = ["E", "impl"]
    repeat = (3, 30, 20.0)
    number = 1

    def setup(self, E, impl):
        cuda_ready()
        self.logits = router_logits(TOKENS, E)
        self.float_logits = self.logits.float()
        self.capacity = 2 * TOKENS // E

    def time_topp_forward_backward(self, E, impl):
        logits = self.logits.detach().requires_grad_()
        if impl == "torch":
            weights, _ = torch_topp(logits, 0.6)
        else:
            weights, _ = sparseroute.topp_gating(logits, 0.6)
        weights.float().sum().backward()
        torch.cuda.synchronize()

    def time_expert_choice(self, E, impl):
        if impl == "torch":
            torch_expert_choice(self.logits, self.capacity)
        else:
            sparseroute.expert_choice(self.logits, self.capacity)
        torch.cuda.synchronize()

    def time_sinkhorn(self, E, impl):
        if impl == "torch":
            torch_sinkhorn(self.float_logits)
        else:
            sparseroute.sinkhorn(self.float_logits)
        torch.cuda.synchronize()

    def time_load_balancing_loss_forward_backward(self, E, impl):
        logits = self.logits.detach().requires_grad_()
        if impl == "torch":
            loss = torch_mixtral_loss(logits, 8)
        else:
            _, experts = sparseroute.topk_gating(logits.detach(), 8)
            loss = sparseroute.load_balancing_loss(logits, experts, scale="switch")
        loss.backward()
        torch.cuda.synchronize()

    def time_z_loss_forward_backward(self, E, impl):
        logits = self.logits.detach().requires_grad_()
        if impl == "torch":
            loss = torch.logsumexp(logits.float(), dim=-1).square().mean()
        else:
            loss = sparseroute.z_loss(logits)
        loss.backward()
        torch.cuda.synchronize()


class GpuMoEBlock:
    """One Hugging Face MoE block forward + backward, bfloat16, T = 2048: transformers'
    eager experts, its grouped_mm experts, and the block after sparseroute.patch."""

    params = (list(SHAPES), ["eager", "grouped_mm", "sparseroute"])
    param_names = ["shape", "impl"]
    repeat = (3, 20, 30.0)
    number = 1
    timeout = 600

    def setup(self, shape, impl):
        cuda_ready()
        self.block = build_block(shape, torch.bfloat16, impl).cuda()
        g = torch.Generator(device="cuda").manual_seed(1)
        hidden = SHAPES[shape]["hidden"]
        self.x = torch.randn(1, 2048, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        self.x.requires_grad_()

    def time_forward_backward(self, shape, impl):
        out = self.block(self.x)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        torch.cuda.synchronize()
