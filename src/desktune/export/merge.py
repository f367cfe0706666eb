"""save_pretrained_merged: LoRA merged into the base weights, saved as a 16-bit model
that plain transformers loads; or just the adapter ("lora").

A 4-bit / 8-bit base is dequantised to 16-bit first (logged): the merged weights
are W_dequant + scale * B A, i.e. exactly what the QLoRA forward computed with.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from desktune.errors import DesktuneError
from desktune.log import logger
from desktune.lora.save import write_atomically
from desktune.quant.bnb import dequantize_linear_weight, is_quantized_linear

SAVE_METHODS = ("merged_16bit", "lora")


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _merged_tensor(base_model: nn.Module, key: str, adapters: list[str]) -> torch.Tensor:
    """The 16/32-bit value of state-dict entry `key` of the plain (un-PEFT-ed) model."""
    module_path, attr = key.rsplit(".", 1)
    module = base_model.get_submodule(module_path)
    if _is_lora_layer(module):
        inner = module.get_base_layer()
        if attr != "weight":
            return _merged_parameter(module, inner, attr, adapters)
        weight = dequantize_linear_weight(inner) if is_quantized_linear(inner) else inner.weight.detach()
        weight = weight.float()
        for name in adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name).float()
        return weight
    if attr == "weight" and is_quantized_linear(module):
        return dequantize_linear_weight(module)
    dense = getattr(module, "dense_weight", None)  # modules storing tensors quantised (gpt-oss NF4 experts)
    return dense(attr) if dense is not None else getattr(module, attr).detach()


def _merged_parameter(module: nn.Module, inner: nn.Module, attr: str, adapters: list[str]) -> torch.Tensor:
    """A tensor other than `weight` under a LoRA layer, e.g. an MoE expert stack that PEFT adapts
    through (possibly nested) ParamWrappers (`target_parameters`): base value plus their deltas."""
    dense = getattr(inner, "dense_weight", None)  # modules storing the tensor quantised (gpt-oss NF4 experts)
    value = dense(attr) if dense is not None else getattr(inner, attr).detach()
    wrapper = module
    while _is_lora_layer(wrapper):
        if getattr(wrapper, "parameter_name", None) == attr:
            for name in adapters:
                if name in wrapper.lora_A:
                    value = value.float() + wrapper.get_delta_weight(name).float()
        wrapper = wrapper.base_layer
    return value


def merged_state_dict(peft_model, dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A fresh (meta-device) model of the base architecture and its merged weights (on CPU)."""
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapters = list(peft_model.peft_config)
    state = {}
    with torch.no_grad():
        for key in fresh.state_dict():
            state[key] = _merged_tensor(base, key, adapters).to(device="cpu", dtype=dtype)
    return fresh, state


def compute_dtype(peft_model) -> torch.dtype:
    """The dtype the model computes in (the 16-bit dtype for a quantised base)."""
    for param in peft_model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float16


def save_merged(peft_model, save_directory, tokenizer=None, save_method: str = "merged_16bit", **kwargs) -> Path:
    """Write the merged model (or the adapter) and the tokenizer to `save_directory`."""
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r} is not one of {', '.join(SAVE_METHODS)}")
    folder = Path(os.path.expanduser(str(save_directory)))
    if save_method == "lora":
        peft_model.save_pretrained(folder, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        return folder
    if not hasattr(peft_model, "peft_config"):
        raise DesktuneError("save_pretrained_merged needs a model with LoRA adapters (from get_peft_model)")
    if (folder / "adapter_config.json").exists():
        raise DesktuneError(
            f"{str(folder)!r} holds an adapter; save the merged model to another folder so neither is overwritten"
        )
    dtype = compute_dtype(peft_model)
    if dtype == torch.float32 and torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    base = peft_model.get_base_model()
    if any(is_quantized_linear(m) for m in base.modules()):
        logger.info("merging into a quantised base: dequantising its weights to %s first", dtype)
    fresh, state = merged_state_dict(peft_model, dtype)
    fresh.load_state_dict(state, assign=True, strict=True)

    def write(tmp: Path) -> None:
        fresh.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    write_atomically(folder, write)
    logger.info("merged %s model saved to %s", dtype, folder)
    return folder
