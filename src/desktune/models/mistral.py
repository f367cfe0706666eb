"""Mistral 7B-style models (sliding window handled by transformers' attention)."""

from desktune.models.family import FamilySpec

MISTRAL = FamilySpec(
    name="mistral",
    model_types=("mistral",),
    norm_classes=("MistralRMSNorm",),
    norm_offset=0.0,
    mlp_classes=("MistralMLP",),
    causal_lm_classes=("MistralForCausalLM",),
)
