"""FamilySpec: what one model family is made of, and which fast path each part gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    # (resolved name, config, dtype, load_in_4bit, load_in_8bit, device_map, token) -> model, replacing
    # AutoModelForCausalLM.from_pretrained for families that quantise while loading (gpt-oss)
    load_model: Callable | None = None
    # model -> {fast path: count}: family-specific per-instance patches, run by registry.patch
    patch_instance: Callable | None = None
    # target names -> (target_modules, target_parameters) for LoRA on non-Linear parameters (MoE experts)
    split_lora_targets: Callable | None = None
    # peft model -> count: rebinds PEFT wrappers after get_peft_model
    after_lora: Callable | None = None
