"""Gradient checkpointing modes: False, True (recompute each decoder layer) and
"unsloth" / "offload" (desktune's name), which also keeps each layer's saved input
in host memory (see memory/offload.py)."""

from __future__ import annotations

import types
from typing import Literal, Union

from torch import nn

from desktune.log import logger
from desktune.memory.offload import OffloadedCheckpoint

CheckpointingMode = Union[bool, Literal["unsloth", "offload"]]
_VALID = (False, True, "unsloth", "offload")
_KWARGS = {"use_reentrant": False}


def validate_mode(mode) -> CheckpointingMode:
    if mode not in _VALID or isinstance(mode, int) and not isinstance(mode, bool):
        raise ValueError(
            f"use_gradient_checkpointing={mode!r} is not one of True, False, 'unsloth' or 'offload'"
        )
    return mode


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def _enable_name(model: nn.Module) -> str:
    # transformers >= 5.2x renamed it; 5.17 (the GPU machine) only has the old name
    return "activation_checkpointing_enable" if hasattr(type(model), "activation_checkpointing_enable") \
        else "gradient_checkpointing_enable"


def _install_offload(model: nn.Module) -> None:
    """Give every checkpointed layer of this instance the model's OffloadedCheckpoint."""
    layers = _checkpointed_layers(model)
    if not layers:
        logger.warning("use_gradient_checkpointing=%r: this model has no checkpointed decoder layers; nothing is "
                       "offloaded", model._desktune_checkpointing)
        model._desktune_offload = None
        return
    offload = getattr(model, "_desktune_offload", None)
    if offload is None or offload.num_layers != len(layers):
        offload = OffloadedCheckpoint(num_layers=len(layers), checkpoint_kwargs=_KWARGS)
    for layer in layers:
        layer._gradient_checkpointing_func = offload
    model._desktune_offload = offload


def _enable_then_offload(self, *args, **kwargs):
    """The instance's checkpointing `enable`: transformers' own, then desktune's offload
    again when this model was set to offload. Trainer (and TRL's SFTTrainer, whose
    gradient_checkpointing defaults to True) re-enables checkpointing when training
    starts, which would otherwise put plain checkpointing back silently."""
    result = getattr(type(self), _enable_name(self))(self, *args, **kwargs)
    if getattr(self, "_desktune_checkpointing", None) in ("unsloth", "offload"):
        _install_offload(self)
    return result


def apply_gradient_checkpointing(model: nn.Module, mode: CheckpointingMode) -> None:
    """Switch the decoder layers of `model` (a transformers PreTrainedModel) to `mode`.

    The offload modes enable transformers' own checkpointing (which also makes the
    embedding output require grad for PEFT), then give each checkpointed layer of
    this instance one OffloadedCheckpoint as its `_gradient_checkpointing_func`.
    transformers 5.2x's own `offload=True` copies on the compute stream with no
    prefetch; this one overlaps both copies with compute.
    """
    mode = validate_mode(mode)
    model._desktune_checkpointing = mode
    if mode is False:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        model._desktune_offload = None
        return
    name = _enable_name(model)
    if not isinstance(model.__dict__.get(name), types.MethodType):
        # bound per instance (a MethodType, so copy.deepcopy rebinds it to the copy)
        setattr(model, name, types.MethodType(_enable_then_offload, model))
    # Non-reentrant checkpointing needs no input that requires grad, so frozen
    # embeddings (LoRA / QLoRA) work without enable_input_require_grads().
    if name == "activation_checkpointing_enable":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_KWARGS))
    model.config.use_cache = False
    if mode is True:
        model._desktune_offload = None
    else:
        logger.debug("offloaded checkpointing on %d layers", model._desktune_offload.num_layers
                     if model._desktune_offload else 0)
