"""FamilySpec: what one model family is made of, and which fast path each part gets."""

from __future__ import annotations

from dataclasses import dataclass
ALL_LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilySpec:
    """One model family. `models.registry.patch` reads it to patch a model instance.

    Class names (not classes) keep this file free of transformers imports.
    """

    name: str
    # config.model_type values this family handles
    model_types: tuple[str, ...]
    # RMSNorm modules routed to kernels.rmsnorm; norm_offset 1.0 is Gemma's (1 + w)
    norm_classes: tuple[str, ...]
    norm_offset: float
    # Gated MLP modules routed to kernels.swiglu / kernels.geglu (picked from the config's activation)
    mlp_classes: tuple[str, ...]
    # the CausalLM head: its loss goes through kernels.cross_entropy (no full logits)
    causal_lm_classes: tuple[str, ...]
    # config attribute holding Gemma-2 style final logit soft-capping (None: no capping)
    final_logit_softcapping_attr: str | None = None
    # LoRA targets when the user passes none
    default_target_modules: tuple[str, ...] = ALL_LINEAR_PROJECTIONS
