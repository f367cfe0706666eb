"""Llama 2 / 3.x (incl. Llama-3 rope scaling, which lives in the rotary module)."""

from desktune.models.family import FamilySpec

LLAMA = FamilySpec(
    name="llama",
    model_types=("llama",),
    norm_classes=("LlamaRMSNorm",),
    norm_offset=0.0,
    mlp_classes=("LlamaMLP",),
    causal_lm_classes=("LlamaForCausalLM",),
)
