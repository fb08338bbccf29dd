"""asv benchmarks: one Hugging Face MoE block, transformers' experts vs sparseroute.patch.

Shapes from the performance targets: a Mixtral block (E=8, k=2, H=1024, F=2816) and an
OLMoE block (E=64, k=8, H=1024, F=256), T in {512, 2048}, float32 and bfloat16. ``impl``:

- "eager": transformers' per-expert loop (one-hot mask, ``torch.where``, ``index_add_``);
- "grouped_mm": transformers' default (sort, ``grouped_mm``, gather back);
- "sparseroute": the block after ``sparseroute.patch`` (router on ``topk_gating``, experts
  on ``permute`` -> ``grouped_linear`` -> ``unpermute``);
- "matmuls": the expert matmuls alone on the same rows (the floor any implementation pays),
  to report routing overhead as a fraction of the block.
"""

from __future__ import annotations

import warnings

import torch

import sparseroute

IMPLS = ["eager", "grouped_mm", "sparseroute", "matmuls"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = {
    "mixtral": dict(config="MixtralConfig", experts=8, k=2, hidden=1024, ffn=2816),
    "olmoe": dict(config="OlmoeConfig", experts=64, k=8, hidden=1024, ffn=256),
}


def build_block(shape: str, dtype: torch.dtype, impl: str) -> torch.nn.Module:
    import transformers

    spec = SHAPES[shape]
    experts_key = "num_local_experts" if shape == "mixtral" else "num_experts"
    config = getattr(transformers, spec["config"])(
        hidden_size=spec["hidden"],
        intermediate_size=spec["ffn"],
        num_experts_per_tok=spec["k"],
        **{experts_key: spec["experts"]},
    )
    config._experts_implementation = "eager" if impl in ("sparseroute", "matmuls") else impl
    module = __import__(f"transformers.models.{shape}.modeling_{shape}", fromlist=["x"])
    block_class = getattr(module, "MixtralSparseMoeBlock" if shape == "mixtral" else "OlmoeSparseMoeBlock")
    torch.manual_seed(0)
    block = block_class(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block = block.to(dtype)
    if impl == "sparseroute":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sparseroute.patch(block)
    return block


class MoEBlock:
    params = (list(SHAPES), [512, 2048], list(DTYPES), IMPLS)
    param_names = ["shape", "T", "dtype", "impl"]
    repeat = (2, 5, 30.0)
    number = 1
    timeout = 600

    def setup(self, shape: str, tokens: int, dtype: str, impl: str) -> None:
        spec = SHAPES[shape]
        self.block = build_block(shape, DTYPES[dtype], impl)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(1, tokens, spec["hidden"], generator=g).to(DTYPES[dtype]).requires_grad_()
        if impl == "matmuls":
            # The expert matmuls of this routing, on rows already in expert order.
            with torch.no_grad():
                flat = self.x.detach().view(-1, spec["hidden"])
                _, _, experts = self.block.gate(flat)
                x_sorted, plan = sparseroute.permute(flat, experts, spec["experts"])
            self.x_sorted = x_sorted.requires_grad_()
            self.middle = torch.randn(x_sorted.shape[0], spec["ffn"], generator=g).to(x_sorted.dtype)
            self.middle.requires_grad_()
            self.offsets = plan.offsets

    def _run(self, impl: str) -> torch.Tensor:
        if impl == "matmuls":
            experts = self.block.experts
            up = sparseroute.grouped_linear(self.x_sorted, self.offsets, experts.gate_up_proj)
            down = sparseroute.grouped_linear(self.middle, self.offsets, experts.down_proj)
            return torch.cat([up.sum(1), down.sum(1)])
        out = self.block(self.x)
        return out[0] if isinstance(out, tuple) else out

    def time_forward(self, shape: str, tokens: int, dtype: str, impl: str) -> None:
        with torch.no_grad():
            self._run(impl)

    def time_forward_backward(self, shape: str, tokens: int, dtype: str, impl: str) -> None:
        self._run(impl).float().sum().backward()
