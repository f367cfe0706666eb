"""Gradient checkpointing modes: False, True (recompute each decoder layer) and
"unsloth" / "offload" (desktune's name), which also moves each layer's saved input
to CPU memory."""

from __future__ import annotations

from typing import Literal, Union

from torch import nn

from desktune.log import logger

CheckpointingMode = Union[bool, Literal["unsloth", "offload"]]
_VALID = (False, True, "unsloth", "offload")


def validate_mode(mode) -> CheckpointingMode:
    if mode not in _VALID or isinstance(mode, int) and not isinstance(mode, bool):
        raise ValueError(
            f"use_gradient_checkpointing={mode!r} is not one of True, False, 'unsloth' or 'offload'"
        )
    return mode


def apply_gradient_checkpointing(model: nn.Module, mode: CheckpointingMode) -> None:
    """Switch the decoder layers of `model` (a transformers PreTrainedModel) to `mode`."""
    mode = validate_mode(mode)
    if mode is False:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        return
    if mode in ("unsloth", "offload"):
        logger.info(
            "use_gradient_checkpointing=%r: CPU offload of checkpoints is not in this build; "
            "using standard (recompute) checkpointing",
            mode,
        )
    # Non-reentrant checkpointing needs no input that requires grad, so frozen
    # embeddings (LoRA / QLoRA) work without enable_input_require_grads().
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
