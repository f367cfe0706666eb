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

import types

import torch
from torch import nn

from desktune.memory.tiled_mlp import TiledMLPConfig, chunk_count, tiled_mlp
from desktune.models.family import FamilySpec
from desktune.models.gpt_oss_attention import drop_training_masks, patch_attention
from desktune.models.gpt_oss_load import load_gpt_oss
from desktune.models.gpt_oss_lora import patch_expert_lora, split_lora_targets
from desktune.models.gpt_oss_moe import GroupedExperts


def patch_moe_mlp(module: nn.Module, tiling: TiledMLPConfig | None = TiledMLPConfig()) -> None:
    """Router + grouped experts, in token chunks for long training calls (memory.tiled_mlp).

    Per token the experts hold k x (2I + I + H) values for backward (57,600 at gpt-oss-20b:
    20x the hidden state), so a 100k-token call would need gigabytes of them at once; in
    chunks only one chunk's exist. `tiling` is kept as module._desktune_tiling like the
    dense MLPs', so memory.tiled_mlp.set_tiled_mlp changes it.
    """
    module._desktune_tiling = tiling

    def forward(self, hidden_states):
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])

        def untiled(h):
            _, scores, indices = self.router(h)
            return self.experts(h, indices, scores)

        tiling = self._desktune_tiling
        tokens = flat.shape[0]
        if tiling is not None and tokens >= tiling.min_tokens and torch.is_grad_enabled():
            experts = self.experts
            while not hasattr(experts, "intermediate_size"):  # through PEFT's ParamWrappers
                experts = experts.base_layer
            per_token = self.router.top_k * 3 * experts.intermediate_size
            chunks = chunk_count(tokens, shape[-1], per_token, tiling)
            trainable = tuple(p for p in self.parameters() if p.requires_grad)
            out = tiled_mlp(untiled, flat, chunks, trainable)
        else:
            out = untiled(flat)
        return out.reshape(shape), None  # the decoder layer drops the router scores

    module.forward = types.MethodType(forward, module)


def patch_gpt_oss(model: nn.Module) -> dict[str, int]:
    """Grouped experts (converting transformers' own experts if the model was loaded elsewhere) and sink attention."""
    counts = {"grouped_experts": 0, "sink_attention": 0}
    quantized = getattr(model, "_desktune_load_in_4bit", False)
    for module in model.modules():
        name = type(module).__name__
        if name == "GptOssMLP":
            if not isinstance(module.experts, GroupedExperts):
                module.experts = GroupedExperts.from_experts(module.experts, model.config, quantized)
            patch_moe_mlp(module)
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
