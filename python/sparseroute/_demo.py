"""The demo behind ``make demo``: Hugging Face MoE models, before and after ``sparseroute.patch``.

Builds small random Mixtral-, OLMoE- and DeepSeek-V3-shaped causal LMs from configs (no
downloads) and runs each three ways on CPU: transformers' "eager" experts, its default
"grouped_mm" experts, and patched by sparseroute (routers on ``topk_gating``, experts on
``permute`` -> ``grouped_linear`` -> ``unpermute``). It prints, per model, the time of a
forward and of a forward+backward (language-modelling loss) pass, the speed ratios, the
largest difference of the logits and of any parameter gradient from eager, and the expert
load of every MoE layer (tokens per expert) as a text chart; it saves the load as a PNG
heatmap when matplotlib is installed.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sparseroute

BARS = " ▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class DemoModel:
    name: str
    config_class: str
    values: dict[str, Any]


_COMMON: dict[str, Any] = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=1024,
    max_position_embeddings=512,
)

MODELS = [
    DemoModel(
        "Mixtral-shaped (E=8, k=2)",
        "MixtralConfig",
        dict(_COMMON, intermediate_size=768, num_local_experts=8, num_experts_per_tok=2),
    ),
    DemoModel(
        "OLMoE-shaped (E=64, k=8)",
        "OlmoeConfig",
        dict(_COMMON, intermediate_size=128, num_experts=64, num_experts_per_tok=8),
    ),
    DemoModel(
        "DeepSeek-V3-shaped (E=64, k=6, 8 groups, sigmoid + bias)",
        "DeepseekV3Config",
        dict(
            _COMMON,
            intermediate_size=512,
            moe_intermediate_size=128,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_group=8,
            topk_group=4,
            first_k_dense_replace=0,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            kv_lora_rank=32,
            q_lora_rank=64,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=32,
        ),
    ),
]


def build(spec: DemoModel, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, spec.config_class)(**spec.values)
    torch.manual_seed(seed)
    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_config(config).float()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "correction_bias" in name:  # a trained-looking selection bias
                buffer.normal_(0.0, 0.05)
    model.set_experts_implementation("eager")  # type: ignore[operator]
    return model.eval()


def passes(model: torch.nn.Module, input_ids: Tensor) -> dict[str, Callable[[], Any]]:
    """The two timed passes of ``model``: a forward (no gradient) returning the logits, and
    a forward + backward of the language-modelling loss returning every parameter gradient."""

    def forward() -> Tensor:
        with torch.no_grad():
            logits: Tensor = model(input_ids=input_ids, use_cache=False).logits
            return logits

    def forward_backward() -> dict[str, Tensor]:
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    return {"forward": forward, "forward_backward": forward_backward}


def best_times(
    models: dict[str, torch.nn.Module], input_ids: Tensor, repeats: int
) -> dict[str, dict[str, float]]:
    """The best of ``repeats`` times (seconds) of each pass of each model, the models taking
    turns within every round: a slow spell of the machine then weighs on all of them alike
    instead of on whichever ran during it (run one model after the other, the ratios of a
    shared 2-core machine moved by 20% and more between runs)."""
    runs = {impl: passes(model, input_ids) for impl, model in models.items()}
    best = {impl: dict.fromkeys(stages, float("inf")) for impl, stages in runs.items()}
    for stages in runs.values():  # warm-up
        for fn in stages.values():
            fn()
    for _ in range(repeats):
        for stage in ("forward", "forward_backward"):
            for impl, stages in runs.items():
                start = time.perf_counter()
                stages[stage]()
                best[impl][stage] = min(best[impl][stage], time.perf_counter() - start)
    return best


def expert_load(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """Tokens per expert of every MoE layer, ``[layers, E]``, from the experts' inputs."""
    loads: list[Tensor] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        loads.append(torch.bincount(args[1].reshape(-1), minlength=module.num_experts))  # type: ignore[arg-type]

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if hasattr(m, "has_gate")]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(loads)


def load_chart(load: Tensor) -> list[str]:
    lines = []
    for layer, counts in enumerate(load.tolist()):
        top = max(max(counts), 1)
        bars = "".join(BARS[round(c / top * (len(BARS) - 1))] for c in counts)
        lines.append(f"    layer {layer}  |{bars}|  max {max(counts)}, min {min(counts)}")
    return lines


def save_heatmap(loads: dict[str, Tensor], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(loads), 1, figsize=(10, 2.2 * len(loads)), squeeze=False)
    for ax, (name, load) in zip(axes[:, 0], loads.items(), strict=True):
        image = ax.imshow(load.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in b)


def run_demo(repeats: int = 3, batch: int = 4, seq_len: int = 256, heatmap: str | None = None) -> None:
    try:
        import transformers
    except ImportError:
        raise SystemExit(
            "the demo needs Hugging Face transformers >= 5: pip install 'sparseroute[demo]'"
        ) from None
    warnings.filterwarnings("ignore", module="transformers")
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    print(
        f"sparseroute {sparseroute.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"Random causal LMs, float32 on CPU, batch {batch} x {seq_len} tokens; best of {repeats} runs, "
        "the three implementations taking turns.\n"
        "Times in ms. eager / grouped_mm: transformers' experts implementations; sparseroute: "
        "sparseroute.patch(model).\n"
    )
    generator = torch.Generator().manual_seed(0)
    loads: dict[str, Tensor] = {}
    for spec in MODELS:
        eager = build(spec)
        input_ids = torch.randint(0, spec.values["vocab_size"], (batch, seq_len), generator=generator)
        grouped = copy.deepcopy(eager)
        grouped.set_experts_implementation("grouped_mm")  # type: ignore[operator]
        patched = copy.deepcopy(eager)
        layers = sparseroute.patch(patched)
        times = best_times(
            {"eager": eager, "grouped_mm": grouped, "sparseroute": patched}, input_ids, repeats
        )
        print(f"{spec.name}: {layers} MoE layers patched")
        columns = ("pass", "eager", "grouped_mm", "sparseroute", "vs eager", "vs grouped")
        print("  {:<17} {:>9} {:>11} {:>12} {:>9} {:>11}".format(*columns))
        for stage in ("forward", "forward_backward"):
            eager_ms, grouped_ms, ours_ms = (times[impl][stage] * 1e3 for impl in times)
            print(
                f"  {stage:<17} {eager_ms:>9.1f} {grouped_ms:>11.1f} {ours_ms:>12.1f}"
                f" {eager_ms / ours_ms:>8.2f}x {grouped_ms / ours_ms:>10.2f}x"
            )
        ours, reference = passes(patched, input_ids), passes(eager, input_ids)
        logit_diff = (ours["forward"]() - reference["forward"]()).abs().max().item()
        grad_diff = max_difference(ours["forward_backward"](), reference["forward_backward"]())
        print(f"  max |diff| vs eager: logits {logit_diff:.2e}, gradients {grad_diff:.2e}")
        load = expert_load(patched, input_ids)
        loads[spec.name] = load
        print(f"  expert load (tokens per expert, {load.shape[1]} experts per row):")
        print("\n".join(load_chart(load)))
        print()
    path = Path(heatmap or "sparseroute-demo-load.png")
    if save_heatmap(loads, path):
        print(f"Expert load heatmap saved to {path.resolve()}")
    else:
        print("Install matplotlib to also save the expert load as a PNG heatmap.")
