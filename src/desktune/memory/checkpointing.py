"""Gradient checkpointing modes: False, True (recompute each decoder layer) and
"unsloth" / "offload" (desktune's name), which also keeps each layer's saved input
in host memory (see memory/offload.py)."""

from __future__ import annotations

from typing import Literal, Union

from torch import nn

from desktune.log import logger
from desktune.memory.offload import OffloadedCheckpoint

CheckpointingMode = Union[bool, Literal["unsloth", "offload"]]
_VALID = (False, True, "unsloth", "offload")


def validate_mode(mode) -> CheckpointingMode:
    if mode not in _VALID or isinstance(mode, int) and not isinstance(mode, bool):
        raise ValueError(
            f"use_gradient_checkpointing={mode!r} is not one of True, False, 'unsloth' or 'offload'"
        )
    return mode


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def apply_gradient_checkpointing(model: nn.Module, mode: CheckpointingMode) -> None:
    """Switch the decoder layers of `model` (a transformers PreTrainedModel) to `mode`.

    The offload modes first enable transformers' own checkpointing (which also
    makes the embedding output require grad for PEFT), then give each checkpointed
    layer of this instance one OffloadedCheckpoint as its `_gradient_checkpointing_func`.
    transformers 5.2x's own `offload=True` copies on the compute stream with no
    prefetch; this one overlaps both copies with compute.
    """
    mode = validate_mode(mode)
    if mode is False:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        model._desktune_offload = None
        return
    # Non-reentrant checkpointing needs no input that requires grad, so frozen
    # embeddings (LoRA / QLoRA) work without enable_input_require_grads().
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    model._desktune_offload = None
    if mode in ("unsloth", "offload"):
        layers = _checkpointed_layers(model)
        if not layers:
            logger.warning("use_gradient_checkpointing=%r: this model has no checkpointed decoder layers; "
                           "nothing is offloaded", mode)
            return
        offload = OffloadedCheckpoint(num_layers=len(layers), checkpoint_kwargs=kwargs)
        for layer in layers:
            layer._gradient_checkpointing_func = offload
        model._desktune_offload = offload
        logger.debug("offloaded checkpointing on %d layers", len(layers))
