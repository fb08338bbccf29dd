"""The CPU kernels pick AVX2 versions at run time where the processor has them (gating,
softmax rows, z-loss, Sinkhorn), and where it has AVX-512, top-k selection for many experts
and softmax / z-loss exponentials sixteen at a time; ``SPARSEROUTE_SIMD=avx2`` stops at AVX2
and ``SPARSEROUTE_SIMD=baseline`` turns both off. Every level must give the same bits."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import sparseroute

# (T, E, k, score, normalize, dtype): token-parallel shapes (E * k small), the per-token
# filter (E >= 32; AVX-512 collection from E = 128), and the token-by-token path (k > 8),
# for every input dtype.
CASES = [
    (T, E, k, score, normalize, dtype)
    for T, E, k in [
        (37, 8, 2),
        (40, 8, 8),
        (29, 16, 4),
        (37, 60, 4),
        (45, 64, 8),
        (21, 160, 6),
        (33, 128, 2),
        (70, 256, 2),
        (19, 256, 8),
        (17, 300, 1),
        (9, 64, 12),
    ]
    for score, normalize in [("softmax", True), ("softmax", False), ("sigmoid", True)]
    for dtype in ["float32", "bfloat16", "float16"]
]

SCRIPT = textwrap.dedent(
    """
    import sys, torch, sparseroute
    from test_simd_dispatch import run_all, to_bytes
    assert sparseroute.info()["cpu_simd"] == sys.argv[2], sparseroute.info()["cpu_simd"]
    with open(sys.argv[1], "wb") as out:
        out.write(to_bytes(run_all()))
    """
)


# The results cross from the subprocess as each tensor's dtype, shape and raw bytes rather
# than through torch.save, whose storage bookkeeping (storages keyed by their C++ address,
# sizes read once when pickled and again when written) once failed to load in a full run.
def to_bytes(results: list[tuple[torch.Tensor, ...]]) -> bytes:
    return pickle.dumps(
        [
            [
                (
                    str(t.dtype).removeprefix("torch."),
                    tuple(t.shape),
                    t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(),
                )
                for t in entry
            ]
            for entry in results
        ]
    )


def from_bytes(data: bytes) -> list[tuple[torch.Tensor, ...]]:
    return [
        tuple(
            torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)
            if raw
            else torch.empty(shape, dtype=getattr(torch, dtype))
            for dtype, shape, raw in entry
        )
        for entry in pickle.loads(data)
    ]


def softmax_row_ops(logits: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Top-p, expert choice and the unnormalised gating gradient (the softmax row kernels):
    weights, experts and the gradient of a fixed linear function of the weights."""
    T, E = logits.shape
    results = []
    for op in ("topp", "topp_exclusive", "expert_choice", "gating"):
        x = logits.clone().requires_grad_()
        if op == "topp":
            weights, experts = sparseroute.topp_gating(x, 0.7, max_k=min(E, 12))
        elif op == "topp_exclusive":
            weights, experts = sparseroute.topp_gating(x, 0.5, inclusive=False, normalize=True)
        elif op == "expert_choice":
            choice = sparseroute.expert_choice(x, max(1, T // E))
            weights, experts = choice.gates, choice.indices
        else:
            weights, experts = sparseroute.topk_gating(x, min(E, 4), normalize=False)
        (weights * torch.linspace(-1, 1, weights.numel()).view_as(weights)).sum().backward()
        results.append((weights.detach(), experts, x.grad))
    return results


def run_all() -> list[tuple[torch.Tensor, ...]]:
    results: list[tuple[torch.Tensor, ...]] = []
    for i, (T, E, k, score, normalize, dtype) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        logits = torch.randn(T, E, generator=g) * 3
        logits[:, ::5] = logits[:, ::5].round()  # ties
        logits = logits.to(getattr(torch, dtype))
        results.append(sparseroute.topk_gating(logits, k, score=score, normalize=normalize, scale=1.5))
    for i, (T, E) in enumerate([(37, 8), (300, 61), (1030, 64)]):
        g = torch.Generator().manual_seed(100 + i)
        logits = (torch.randn(T, E, generator=g) * 4).requires_grad_()
        loss = sparseroute.z_loss(logits)
        loss.backward()
        results.append((loss.detach(), logits.grad))
        results.append((sparseroute.sinkhorn(logits.detach()),))
        results.extend(softmax_row_ops(logits.detach()))
    # Wide rows: softmax scores down through the subnormals and to 0 (logits up to about
    # 200 below their row's maximum), where every level's exp must give the portable bits.
    for i, E in enumerate([61, 64]):
        wide = torch.randn(300, E, generator=torch.Generator().manual_seed(300 + i)) * 40
        bias = torch.zeros(E)
        results.append(sparseroute.topk_gating(wide, 4, expert_bias=bias, normalize=False))
        results.append(sparseroute.topk_gating(wide, 4, score="sigmoid", expert_bias=bias))
        x = wide.clone().requires_grad_()
        loss = sparseroute.z_loss(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
        results.extend(softmax_row_ops(wide))
    # The z-loss runs eight rows at a time where E is a multiple of sixteen (with AVX-512):
    # masked rows, other storage types, and a NaN in any position of any row.
    g = torch.Generator().manual_seed(200)
    logits = torch.randn(1030, 64, generator=g) * 4
    mask = torch.rand(1030, generator=g) > 0.1
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype).detach().requires_grad_()
        loss = sparseroute.z_loss(x, attention_mask=mask)
        loss.backward()
        results.append((loss.detach(), x.grad))
    x = (torch.randn(40, 160, generator=g) * 4).requires_grad_()
    loss = sparseroute.z_loss(x)
    loss.backward()
    results.append((loss.detach(), x.grad))
    results.append((z_loss_nan_rejections(logits),))
    # Sinkhorn's exp over its whole range: one logit per row between 80 and 88 (above 88 is
    # rejected; 88 itself is in row 0), some with subnormal exponentials (below -87.3) and
    # some whose exponential rounds to 0 (below -103.97), E not a multiple of 8.
    wide = torch.randn(1030, 61, generator=g) * 4
    columns = torch.randint(0, 61, (1030,), generator=g)
    wide[torch.arange(1030), columns] = torch.rand(1030, generator=g) * 8 + 80
    wide[0, 0], wide[1:40, 1], wide[40:60, 2] = 88.0, -90.0, -110.0
    results.append((sparseroute.sinkhorn(wide, iters=3, tol=0.0),))
    return results


def z_loss_nan_rejections(logits: torch.Tensor) -> torch.Tensor:
    """Whether the z-loss rejects a NaN placed at each of a few positions of `logits`
    ([1030, 64]: inside a group of eight rows and in the rows after the last group)."""
    rejected = []
    for token, expert in [(0, 0), (9, 5), (9, 17), (15, 63), (1027, 8), (1029, 40)]:
        bad = logits.clone()
        bad[token, expert] = float("nan")
        try:
            sparseroute.z_loss(bad)
            rejected.append(False)
        except sparseroute.InvalidInputError:
            rejected.append(True)
    return torch.tensor(rejected)


def test_z_loss_rejects_a_nan_anywhere():
    # At this level; the lower levels give the same answers (in `run_all`).
    assert z_loss_nan_rejections(torch.randn(1030, 64)).all()


def test_info_names_the_instruction_set():
    assert sparseroute.info()["cpu_simd"] in ("avx512", "avx2", "baseline")


LEVELS = ["baseline", "avx2", "avx512"]


@pytest.mark.parametrize("level", ["baseline", "avx2"])
def test_lower_levels_give_the_same_bits(tmp_path, level):
    best = sparseroute.info()["cpu_simd"]
    if LEVELS.index(level) >= LEVELS.index(best):
        pytest.skip(f"this CPU runs {best}: {level} is not a lower level")
    out = tmp_path / f"{level}.pickle"
    env = dict(os.environ, SPARSEROUTE_SIMD=level, PYTHONPATH=os.path.dirname(__file__))
    subprocess.run([sys.executable, "-c", SCRIPT, str(out), level], env=env, check=True, timeout=600)
    lower = from_bytes(out.read_bytes())
    for i, (ours, base) in enumerate(zip(run_all(), lower, strict=True)):
        for a, b in zip(ours, base, strict=True):
            bits = torch.int32 if a.dtype == torch.float32 else a.dtype
            assert torch.equal(a.view(bits), b.view(bits)), CASES[i] if i < len(CASES) else i
