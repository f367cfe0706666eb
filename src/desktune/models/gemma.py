"""Gemma 2 and Gemma 3 (text): (1 + w) norms, GeGLU, final logit soft-capping."""

from desktune.models.family import FamilySpec

GEMMA2 = FamilySpec(
    name="gemma2",
    model_types=("gemma2",),
    norm_classes=("Gemma2RMSNorm",),
    norm_offset=1.0,
    mlp_classes=("Gemma2MLP",),
    causal_lm_classes=("Gemma2ForCausalLM",),
    final_logit_softcapping_attr="final_logit_softcapping",
)

GEMMA3 = FamilySpec(
    name="gemma3",
    model_types=("gemma3_text",),
    norm_classes=("Gemma3RMSNorm",),
    norm_offset=1.0,
    mlp_classes=("Gemma3MLP",),
    causal_lm_classes=("Gemma3ForCausalLM",),
    final_logit_softcapping_attr="final_logit_softcapping",
)
