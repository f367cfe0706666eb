"""gpt-oss (20b / 120b): MoE experts grouped by expert, attention sinks, sliding windows.

What the family changes on one model instance (see the gpt_oss_* files):
- loading (gpt_oss_load.py): tensor by tensor, experts NF4 per expert, attention through
  bitsandbytes NF4, MXFP4 checkpoints dequantised on the way;
- experts (gpt_oss_moe.py): GroupedExperts, tokens sorted by expert, grouped GEMMs; the
  router stays transformers' (16/32-bit);
- attention (gpt_oss_attention.py): sinks + sliding window without an L x L mask in training;
- LoRA (gpt_oss_lora.py): per-expert adapters through PEFT `target_parameters`, run inside
  the grouped computation.
The RMSNorms keep transformers' forward: gpt-oss scales in float32 before the cast back,
which desktune's rmsnorm kernel only does for Gemma's (1 + w) form.
"""

from __future__ import annotations

from torch import nn

from desktune.models.family import FamilySpec
from desktune.models.gpt_oss_attention import drop_training_masks, patch_attention
from desktune.models.gpt_oss_load import load_gpt_oss
from desktune.models.gpt_oss_lora import patch_expert_lora, split_lora_targets
from desktune.models.gpt_oss_moe import GroupedExperts


def patch_gpt_oss(model: nn.Module) -> dict[str, int]:
    """Grouped experts (converting transformers' own experts if the model was loaded elsewhere) and sink attention."""
    counts = {"grouped_experts": 0, "sink_attention": 0}
    quantized = getattr(model, "_desktune_load_in_4bit", False)
    for module in model.modules():
        name = type(module).__name__
        if name == "GptOssMLP":
            if not isinstance(module.experts, GroupedExperts):
                module.experts = GroupedExperts.from_experts(module.experts, model.config, quantized)
            counts["grouped_experts"] += 1
        elif name == "GptOssAttention":
            patch_attention(module)
            counts["sink_attention"] += 1
    drop_training_masks(model.model)
    return counts


GPT_OSS = FamilySpec(
    name="gpt_oss",
    model_types=("gpt_oss",),
    norm_classes=(),
    norm_offset=0.0,
    mlp_classes=(),
    causal_lm_classes=("GptOssForCausalLM",),
    default_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
    load_model=load_gpt_oss,
    patch_instance=patch_gpt_oss,
    split_lora_targets=split_lora_targets,
    after_lora=patch_expert_lora,
)
