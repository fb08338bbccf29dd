"""Inputs of the kernel tests, shared by the CPU, emulated and GPU test files: the same
generator and seed give the same tensor in every file."""

import torch


def tie_heavy_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Integer logits in [0, 4]: exact in every dtype, many exact ties, and distinct values
    (and sums of two scores, for group limits) far apart, so the chosen experts are defined
    by the tie rule rather than by rounding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (num_tokens, num_experts), generator=g).to(dtype)


def random_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal logits of standard deviation 2: routing probabilities far from uniform."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, num_experts, generator=g) * 2).to(dtype)


def balance_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal logits of standard deviation 3, for the balancing losses' sums."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, num_experts, generator=g) * 3).to(dtype)


def balance_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """How far a GPU sum of scores may be from the CPU's (another order of additions)."""
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
