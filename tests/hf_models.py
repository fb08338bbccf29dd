"""Tiny random transformers MoE models, built locally from configs (no downloads).

One entry per family: config class, model class and the config values that make every
layer an MoE layer with 8 experts, top-2, in a 2-layer, hidden-64 model. Families whose
attention uses MLA drop ``head_dim`` (their head sizes come from the MLA fields).
"""

from __future__ import annotations

import importlib

import torch

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=128,
)
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
DSA = dict(index_topk=4, index_head_dim=16, index_n_heads=2)
LINEAR_ATTENTION = dict(
    layer_types=["linear_attention", "full_attention"],
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
)
SPARSE = dict(mlp_layer_types=["sparse", "sparse"])
GROUPS = dict(n_group=2, topk_group=1)
TOP2 = dict(num_experts_per_tok=2)

# family: (config class, model class, config values)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, **TOP2)),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(num_local_experts=8, **TOP2, layer_types=["full_attention", "linear_attention"]),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=8, **TOP2, shared_expert_intermediate_size=64, mlp_only_layers=[], norm_topk_prob=True
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, **TOP2, mlp_only_layers=[], norm_topk_prob=True),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            num_experts=8, **TOP2, shared_expert_intermediate_size=64, mlp_only_layers=[], **LINEAR_ATTENTION
        ),
    ),
    "qwen3_5_moe": (
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        dict(num_experts=8, **TOP2, shared_expert_intermediate_size=64, **LINEAR_ATTENTION),
    ),
    "qwen3_vl_moe": ("Qwen3VLMoeTextConfig", "Qwen3VLMoeTextModel", dict(num_experts=8, **TOP2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, **TOP2, norm_topk_prob=False)),
    "flex_olmo": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        dict(num_experts=8, **TOP2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
    "mellum": ("MellumConfig", "MellumForCausalLM", dict(num_local_experts=8, **TOP2)),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            num_experts=8,
            **TOP2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=1,
            expert_layer_offset=0,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(num_local_experts=8, **TOP2, layer_types=["sliding_attention", "full_attention"]),
    ),
    "aria": ("AriaTextConfig", "AriaTextForCausalLM", dict(moe_num_experts=8, moe_topk=2)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=8, **TOP2)),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        dict(num_local_experts=8, **TOP2, shared_intermediate_size=64),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, first_k_dense_replace=0, n_shared_experts=1, **MLA),
    ),
    "deepseek_v32": (
        "DeepseekV32Config",
        "DeepseekV32ForCausalLM",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            **TOP2,
            **GROUPS,
            **SPARSE,
            first_k_dense_replace=0,
            n_shared_experts=1,
            **MLA,
            **DSA,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, first_k_dense_replace=0, n_shared_experts=1),
    ),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        "Glm4MoeLiteForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, **SPARSE, n_shared_experts=1, **MLA),
    ),
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, first_k_dense_replace=0, n_shared_experts=1),
    ),
    "solar_open": (
        "SolarOpenConfig",
        "SolarOpenForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, n_shared_experts=1),
    ),
    "exaone_moe": (
        "ExaoneMoeConfig",
        "ExaoneMoeForCausalLM",
        dict(num_experts=8, **TOP2, **GROUPS, **SPARSE, num_shared_experts=1),
    ),
    "mimo_v2_flash": (
        "MiMoV2FlashConfig",
        "MiMoV2FlashForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, **SPARSE),
    ),
    "hy_v4": (
        "HYV4Config",
        "HYV4ForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, **SPARSE, n_shared_experts=1, pad_token_id=0),
    ),
    "kimi_linear": (
        "KimiLinearConfig",
        "KimiLinearForCausalLM",
        dict(
            num_local_experts=8,
            **TOP2,
            **GROUPS,
            **SPARSE,
            n_shared_experts=1,
            pad_token_id=0,
            **MLA,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),
    "nemotron_h": (
        "NemotronHConfig",
        "NemotronHForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, layers_block_type=["moe", "moe"]),
    ),
    "qwen4_exp": (
        "Qwen4ExpTextConfig",
        "Qwen4ExpForCausalLM",
        dict(
            num_experts=8,
            **TOP2,
            shared_expert_intermediate_size=64,
            **LINEAR_ATTENTION,
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=8,
            indexer_compress_ratio=4,
        ),
    ),
    "qwen3_omni_moe": ("Qwen3OmniMoeTextConfig", "Qwen3OmniMoeThinkerTextModel", dict(num_experts=8, **TOP2)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", dict(num_local_experts=8, **TOP2)),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        dict(
            num_local_experts=8,
            **TOP2,
            layer_types=["mamba", "attention"],
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_n_groups=1,
            mamba_d_state=16,
            mamba_chunk_size=16,
        ),
    ),
    "glm4v_moe": (
        "Glm4vMoeTextConfig",
        "Glm4vMoeTextModel",
        dict(
            num_attention_heads=2,
            head_dim=128,
            n_routed_experts=8,
            **TOP2,
            **GROUPS,
            first_k_dense_replace=0,
            n_shared_experts=1,
        ),
    ),
    "glm5_next": (
        "Glm5NextTextConfig",
        "Glm5NextTextModel",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            **TOP2,
            **GROUPS,
            **SPARSE,
            n_shared_experts=1,
            pad_token_id=0,
        ),
    ),
    "glm_moe_dsa": (
        "GlmMoeDsaConfig",
        "GlmMoeDsaForCausalLM",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            **TOP2,
            **GROUPS,
            **SPARSE,
            first_k_dense_replace=0,
            n_shared_experts=1,
            **MLA,
            **DSA,
        ),
    ),
    "dots3_note": (
        "Dots3NoteTextConfig",
        "Dots3NoteForCausalLM",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            **TOP2,
            **GROUPS,
            **SPARSE,
            n_shared_experts=1,
            pad_token_id=0,
        ),
    ),
    "axk1": (
        "AXK1Config",
        "AXK1ForCausalLM",
        dict(n_routed_experts=8, **TOP2, **GROUPS, **SPARSE, n_shared_experts=1, **MLA),
    ),
    "bailing_hybrid": (
        "BailingHybridConfig",
        "BailingHybridForCausalLM",
        dict(
            num_local_experts=8,
            **TOP2,
            **GROUPS,
            **SPARSE,
            first_k_dense_replace=0,
            n_shared_experts=1,
            pad_token_id=0,
            layer_types=["linear_attention", "full_attention"],
            **MLA,
        ),
    ),
    "hy_v4_vl": (
        "HYV4VLTextConfig",
        "HYV4VLTextModel",
        dict(n_routed_experts=8, **TOP2, **GROUPS, **SPARSE, n_shared_experts=1, pad_token_id=0),
    ),
    "lara_mini": (
        "LaraMiniConfig",
        "LaraMiniForCausalLM",
        dict(num_experts=8, **TOP2, shared_expert_intermediate_size=64, **LINEAR_ATTENTION),
    ),
    "flint": (
        "FlintConfig",
        "FlintForCausalLM",
        dict(
            num_experts=8,
            **TOP2,
            shared_expert_intermediate_size=64,
            mlp_only_layers=[],
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "mistral_large4": (
        "MistralLarge4TextConfig",
        "MistralLarge4TextModel",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            **TOP2,
            **GROUPS,
            **SPARSE,
            first_k_dense_replace=0,
            n_shared_experts=1,
            **MLA,
            **DSA,
        ),
    ),
    "beam": (
        "BeamConfig",
        "BeamForCausalLM",
        dict(num_experts=8, **TOP2, **GROUPS, **SPARSE, layer_types=["sliding_attention", "full_attention"]),
    ),
    "axk2": (
        "AXK2Config",
        "AXK2ForCausalLM",
        dict(num_key_value_heads=4, n_routed_experts=8, **TOP2, **SPARSE, n_shared_experts=1, **MLA, **DSA),
    ),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(num_local_experts=8, **TOP2)),
    "minimax_m3_vl": (
        "MiniMaxM3VLTextConfig",
        "MiniMaxM3VLTextModel",
        dict(num_local_experts=8, **TOP2, shared_intermediate_size=64, **SPARSE),
    ),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM", dict(num_experts=8, **TOP2, num_shared_experts=1, **SPARSE)),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(n_routed_experts=8, **TOP2, first_k_dense_replace=0, n_shared_experts=1, **MLA),
    ),
    "deepseek_ocr2": (
        "DeepseekOcr2TextConfig",
        "DeepseekOcr2TextModel",
        dict(n_routed_experts=8, **TOP2, n_shared_experts=1, **SPARSE),
    ),
    "unlimited_ocr": (
        "UnlimitedOcrTextConfig",
        "UnlimitedOcrTextModel",
        dict(
            n_routed_experts=8,
            **TOP2,
            n_shared_experts=1,
            **SPARSE,
            layer_types=["full_attention", "full_attention"],
        ),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        dict(num_experts=8, moe_topk=2, num_shared_expert=1, moe_intermediate_size=32),
    ),
    "afmoe": (
        "AfmoeConfig",
        "AfmoeForCausalLM",
        dict(num_experts=8, **TOP2, num_shared_experts=1, num_dense_layers=0, route_scale=2.5),
    ),
    "cohere2_moe": (
        "Cohere2MoeConfig",
        "Cohere2MoeForCausalLM",
        dict(num_experts=8, **TOP2, layer_types=["sliding_attention", "full_attention"], **SPARSE),
    ),
    "laguna": (
        "LagunaConfig",
        "LagunaForCausalLM",
        dict(
            num_experts=8,
            **TOP2,
            shared_expert_intermediate_size=64,
            **SPARSE,
            layer_types=["full_attention", "full_attention"],
            num_attention_heads_per_layer=[4, 4],
        ),
    ),
    # No router rule (sparsemixer routing): the experts are switched, the router left alone.
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=8, **TOP2)),
}


def build(family: str, *, seed: int = 0, config: dict | None = None) -> torch.nn.Module:
    """A float32 model of ``family`` in eval mode with random weights (router weights,
    selection biases and expert weights all random, so routing is non-trivial); ``config``
    overrides values of the family's tiny configuration."""
    config_name, model_name, values = FAMILIES[family]
    module = importlib.import_module(f"transformers.models.{family}")
    config_values = {**COMMON, **values, **(config or {})}
    if "kv_lora_rank" in config_values:
        del config_values["head_dim"]
    config = getattr(module, config_name)(**config_values)
    torch.manual_seed(seed)
    model = getattr(module, model_name)(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            if tensor.dim() >= 2:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif "correction_bias" in name or "expert_bias" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    model.set_experts_implementation("eager")
    return model
