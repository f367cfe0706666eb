"""get_peft_model: LoRA adapters (PEFT's own) on a loaded model, Unsloth's signature."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from desktune.errors import DesktuneError
from desktune.memory.checkpointing import CheckpointingMode, apply_gradient_checkpointing, validate_mode


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    target_modules: tuple[str, ...] | str | None = None
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    bias: str = "none"
    use_gradient_checkpointing: CheckpointingMode = "unsloth"
    random_state: int = 3407
    use_rslora: bool = False
    loftq_config: object = None
    modules_to_save: tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    extra: dict = field(default_factory=dict)


def _linear_leaf_names(model: nn.Module) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.add(name.rsplit(".", 1)[-1])
    return names


def _check_targets(model: nn.Module, targets) -> None:
    if isinstance(targets, str):  # a regex or "all-linear": PEFT validates those
        return
    available = _linear_leaf_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise DesktuneError(
            f"target_modules {missing} match no linear layer of this model. Its linear layers are: "
            f"{', '.join(sorted(available))}."
        )


def add_lora(model: nn.Module, settings: LoraSettings, default_targets: tuple[str, ...]):
    """Wrap `model` (from loader.load) in a PeftModelForCausalLM with fresh adapters."""
    from peft import LoraConfig, get_peft_model

    if getattr(model, "_desktune_full_finetuning", False):
        raise DesktuneError(
            "this model was loaded with full_finetuning=True, which trains every weight; LoRA adapters need a model "
            "loaded with full_finetuning=False."
        )
    if hasattr(model, "peft_config"):
        raise DesktuneError("this model already has LoRA adapters (get_peft_model was called on it before)")
    if settings.r < 1:
        raise ValueError(f"LoRA rank r must be at least 1, got {settings.r}")
    validate_mode(settings.use_gradient_checkpointing)
    targets = settings.target_modules or default_targets
    if not isinstance(targets, str):
        targets = list(targets)
    target_parameters = None
    split = getattr(model, "_desktune_split_lora_targets", None)  # set by models.registry.patch
    if split is not None and not isinstance(targets, str):
        # MoE expert stacks are 3-D parameters: PEFT adapts them through target_parameters
        targets, target_parameters = split(targets)
    _check_targets(model, targets)
    layers = settings.layers_to_transform
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets or None,
        target_parameters=target_parameters or None,
        bias=settings.bias,
        use_rslora=settings.use_rslora,
        modules_to_save=list(settings.modules_to_save) if settings.modules_to_save else None,
        layers_to_transform=list(layers) if isinstance(layers, (list, tuple)) else layers,
        init_lora_weights="loftq" if settings.loftq_config else True,
        loftq_config=settings.loftq_config or {},
        task_type="CAUSAL_LM",
        **settings.extra,
    )
    # Adapter init draws from the global RNG: seed it so random_state reproduces.
    torch.manual_seed(settings.random_state)
    peft_model = get_peft_model(model, config)
    after_lora = getattr(model, "_desktune_after_lora", None)
    if after_lora is not None:
        after_lora(peft_model)
    apply_gradient_checkpointing(peft_model.get_base_model(), settings.use_gradient_checkpointing)
    return peft_model
