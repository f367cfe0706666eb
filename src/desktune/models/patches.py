"""Forwards that registry.patch binds to single module instances.

Each `patch_*` function takes one module and replaces its `forward` on that
instance only (an instance attribute shadows the class method), so other models in
the same process are untouched. The math equals transformers' own; the work goes
through desktune.kernels, which run Triton on CUDA and the PyTorch reference on CPU.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from desktune.errors import SequenceTooLongError
from desktune.kernels.cross_entropy import fused_linear_cross_entropy
from desktune.kernels.rmsnorm import rmsnorm
from desktune.kernels.swiglu import geglu, swiglu
from desktune.lora.fast_lora import fused_gated_mlp
from desktune.memory.tiled_mlp import TiledMLPConfig, chunk_count, tiled_mlp

# config activation name -> gated activation over (gate, up)
GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": swiglu,
    "swish": swiglu,
    "gelu_pytorch_tanh": lambda g, u: geglu(g, u, approximate="tanh"),
    "gelu_new": lambda g, u: geglu(g, u, approximate="tanh"),
    "gelu": lambda g, u: geglu(g, u, approximate="none"),
}


def _bind(module: nn.Module, forward: Callable) -> None:
    module.forward = types.MethodType(forward, module)


def patch_rmsnorm(module: nn.Module, offset: float) -> None:
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps")

    def forward(self, hidden_states):
        return rmsnorm(hidden_states, self.weight, eps, offset)

    _bind(module, forward)


def patch_gated_mlp(module: nn.Module, activation: str, tiling: TiledMLPConfig | None = TiledMLPConfig()) -> None:
    """`tiling` (kept as module._desktune_tiling; memory.tiled_mlp.set_tiled_mlp changes
    it per model) runs training calls of at least tiling.min_tokens tokens in chunks."""
    gated = GATED_ACTIVATIONS[activation]
    module._desktune_tiling = tiling

    def forward(self, x):
        def untiled(h):
            fused = fused_gated_mlp(self, h, activation)  # None unless all three are 4-bit LoRA layers
            if fused is not None:
                return fused
            return self.down_proj(gated(self.gate_proj(h), self.up_proj(h)))

        tiling = self._desktune_tiling
        tokens = x.numel() // x.shape[-1]
        if tiling is not None and tokens >= tiling.min_tokens and torch.is_grad_enabled():
            intermediate = getattr(self, "intermediate_size", None) or x.shape[-1]
            chunks = chunk_count(tokens, x.shape[-1], intermediate, tiling)
            trainable = tuple(p for p in self.parameters() if p.requires_grad)
            return tiled_mlp(untiled, x, chunks, trainable)
        return untiled(x)

    _bind(module, forward)


def check_sequence_length(backbone: nn.Module, max_seq_length: Callable[[], int]) -> None:
    """Refuse training batches longer than max_seq_length, before any compute.

    Raising (rather than truncating) keeps the user's data intact: the dataset or
    the trainer's max_length decides what to cut, not a silent crop here.
    """

    def hook(module, args, kwargs):
        if not module.training:
            return None
        tensor = kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
        if tensor is None and args:
            tensor = args[0]
        limit = max_seq_length()
        if tensor is not None and tensor.dim() >= 2 and tensor.shape[1] > limit:
            positions = kwargs.get("position_ids")
            if positions is not None and int(positions.max()) < limit:
                return None  # a padding-free row of several examples, each within the limit
            raise SequenceTooLongError(
                f"this training batch has sequences of {tensor.shape[1]} tokens but the model was loaded with "
                f"max_seq_length={limit}. Truncate the data to {limit} tokens (e.g. SFTConfig(max_length={limit})) "
                f"or load the model with a larger max_seq_length."
            )
        return None

    backbone.register_forward_pre_hook(hook, with_kwargs=True)


def patch_causal_lm_loss(model: nn.Module, softcap_attr: str | None) -> None:
    """Compute the training loss with the fused linear + cross-entropy kernel.

    With labels, the [tokens, vocab] logits are never built while training, so the
    output's `logits` is None then; in eval mode (or without labels) logits are
    computed as usual. An LM head wrapped by PEFT (LoRA or modules_to_save) keeps
    the original forward, since its weight is not a plain matrix.
    """
    original_forward = model.forward
    softcap = getattr(model.config, softcap_attr, None) if softcap_attr else None

    # Keep the class's signature visible: generate() validates its kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                logits_to_keep=0, **kwargs):
        shift_labels = kwargs.pop("shift_labels", None)
        head = self.get_output_embeddings()
        if (labels is None and shift_labels is None) or type(head) is not nn.Linear:
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    inputs_embeds=inputs_embeds, labels=labels, logits_to_keep=logits_to_keep,
                                    **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, **kwargs)
        hidden = outputs.last_hidden_state
        if shift_labels is None:
            # Row i predicts token i + 1; the last position has no target.
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = fused_linear_cross_entropy(
            hidden, head.weight, shift_labels.to(hidden.device), softcap=softcap,
            num_items_in_batch=num_items_in_batch,
        )
        logits = None
        if not self.training:
            logits = head(hidden)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)

    model.forward = types.MethodType(forward, model)
