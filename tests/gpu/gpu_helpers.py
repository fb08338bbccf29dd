"""Shared inputs of the GPU tests."""

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# GPU weights against the CPU kernel's: exp on the GPU is within 2 ulp (float32) of the CPU's
# and reductions run in tree order, so a few float32 ulp (float64: a few float64 ulp).
WEIGHT_TOLERANCE = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-5, "atol": 1e-6},
}


def group_bias(num_experts, num_groups, seed):
    """One bias class (a multiple of 10) per group: groups of different classes never tie."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 3, (num_groups,), generator=g).float() * 10
    return classes.repeat_interleave(num_experts // num_groups)


def random_experts(num_tokens, k, num_experts, seed, empty=0.1):
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, num_experts, (num_tokens, k), generator=g)
    holes = torch.rand(num_tokens, k, generator=g) < empty
    return experts.masked_fill(holes, -1)


def to_acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32
