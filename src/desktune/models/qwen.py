"""Qwen2 / Qwen2.5 and Qwen3 (dense). Qwen3's per-head q/k norms are RMSNorms too."""

from desktune.models.family import FamilySpec

QWEN2 = FamilySpec(
    name="qwen2",
    model_types=("qwen2",),
    norm_classes=("Qwen2RMSNorm",),
    norm_offset=0.0,
    mlp_classes=("Qwen2MLP",),
    causal_lm_classes=("Qwen2ForCausalLM",),
)

QWEN3 = FamilySpec(
    name="qwen3",
    model_types=("qwen3",),
    norm_classes=("Qwen3RMSNorm",),
    norm_offset=0.0,
    mlp_classes=("Qwen3MLP",),
    causal_lm_classes=("Qwen3ForCausalLM",),
)
