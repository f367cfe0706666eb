"""The model registry: model_type -> FamilySpec, and `patch(model)` for one instance.

Supported families are listed in FAMILIES. An unknown model_type raises an
UnsupportedModelError naming the supported ones; `fallback=True` (from
`from_pretrained(..., fallback_to_transformers=True)`) instead trains it with plain
transformers + peft and logs that no desktune fast path applies.
"""

from __future__ import annotations

from torch import nn

from desktune.errors import UnsupportedModelError
from desktune.log import logger
from desktune.models import patches
from desktune.models.family import ALL_LINEAR_PROJECTIONS, FamilySpec
from desktune.models.gemma import GEMMA2, GEMMA3
from desktune.models.gpt_oss import GPT_OSS
from desktune.models.llama import LLAMA
from desktune.models.mistral import MISTRAL
from desktune.models.qwen import QWEN2, QWEN3

FAMILIES: tuple[FamilySpec, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, GPT_OSS)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(config, fallback: bool = False) -> FamilySpec | None:
    """The family of a transformers config; None (logged) for an unknown one with fallback."""
    model_type = getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is not None:
        return family
    if fallback:
        logger.warning(
            "model_type %r has no desktune family: training it with plain transformers + peft "
            "(no desktune kernels, no fused loss). Supported: %s.",
            model_type,
            ", ".join(supported_model_types()),
        )
        return None
    raise UnsupportedModelError(
        f"desktune does not support model_type {model_type!r} yet. Supported model types: "
        f"{', '.join(supported_model_types())}. To train it anyway without desktune's fast paths, pass "
        f"fallback_to_transformers=True to FastLanguageModel.from_pretrained."
    )


def default_target_modules(config) -> tuple[str, ...]:
    family = _BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    return family.default_target_modules if family is not None else ALL_LINEAR_PROJECTIONS


def _activation(config) -> str | None:
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)


def patch(model: nn.Module, family: FamilySpec, max_seq_length: int) -> dict[str, int]:
    """Route this model instance's norms, MLPs and loss to desktune's ops.

    Returns how many modules got each fast path (also kept as model._desktune_patches).
    Patching twice is refused: the second call would wrap already-patched forwards.
    """
    if getattr(model, "_desktune_patches", None) is not None:
        raise RuntimeError("this model instance is already patched by desktune")
    config = model.config
    activation = _activation(config)
    counts = {"rmsnorm": 0, "gated_mlp": 0, "fused_loss": 0, "sequence_check": 0}
    for module in model.modules():
        class_name = type(module).__name__
        if class_name in family.norm_classes:
            patches.patch_rmsnorm(module, family.norm_offset)
            counts["rmsnorm"] += 1
        elif class_name in family.mlp_classes:
            if activation in patches.GATED_ACTIVATIONS:
                patches.patch_gated_mlp(module, activation)
                counts["gated_mlp"] += 1
    if type(model).__name__ in family.causal_lm_classes:
        patches.patch_causal_lm_loss(model, family.final_logit_softcapping_attr)
        counts["fused_loss"] = 1
        patches.check_sequence_length(model.model, lambda: model.max_seq_length)
        counts["sequence_check"] = 1
    if family.patch_instance is not None:
        counts.update(family.patch_instance(model))
    # read by lora.peft_setup (which cannot import models/) when adapters are added
    model._desktune_split_lora_targets = family.split_lora_targets
    model._desktune_after_lora = family.after_lora
    if counts["gated_mlp"] == 0 and family.patch_instance is None:
        logger.info("MLP activation %r has no fused path; the MLPs keep transformers' forward", activation)
    model._desktune_patches = counts
    logger.debug("desktune patched %s: %s", type(model).__name__, counts)
    return counts
