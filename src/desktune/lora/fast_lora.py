"""Per-instance fast path for PEFT's 4-bit LoRA layers.

PEFT's lora.bnb.Linear4bit runs bitsandbytes' matmul (which dequantises W and keeps
what autograd needs) and then the adapter as separate modules. Here each such layer
instance gets a forward that calls kernels.qlora.qlora_linear: W is dequantised by a
Triton kernel into a temporary for the matmul and again in backward, and the LoRA
product is fused into the same autograd Function. Anything the fused path does not
cover at call time (adapters disabled or merged, several active adapters, dropout,
DoRA, extra call arguments) goes through PEFT's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from desktune.kernels.qlora import qlora_linear


def _fused_forward(original):
    def forward(self, x, *args, **kwargs):
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return original(x, *args, **kwargs)
        name = self.active_adapters[0]
        if (
            name not in self.lora_A
            or not isinstance(self.lora_dropout[name], nn.Identity)
            or self.use_dora.get(name, False)
            or self.lora_bias.get(name, False)
        ):
            return original(x, *args, **kwargs)
        base = self.base_layer
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        # Under autocast the layer computes in the autocast dtype, like nn.Linear would;
        # the Function itself runs with autocast off so its in-place GEMMs see one dtype.
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else (base.compute_dtype or x.dtype)
        with torch.autocast(device_type, enabled=False):
            out = qlora_linear(
                x.to(compute_dtype),
                base.weight.data,
                _quant_state(base),
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                base.bias,
            )
        return out if autocast else out.to(x.dtype)

    return forward


def _quant_state(base: nn.Module):
    """The NF4 quant state of a bnb Linear4bit. FSDP2 swaps the weight for a plain (gathered)
    Parameter, which drops the attribute; bitsandbytes keeps a copy on the module for that case."""
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None else base.quant_state


def patch_qlora_layers(peft_model: nn.Module) -> int:
    """Give every PEFT 4-bit LoRA layer of this model the fused forward; returns how many."""
    count = 0
    for module in peft_model.modules():
        if type(module).__module__.startswith("peft.tuners.lora.bnb") and type(module).__name__ == "Linear4bit":
            module.forward = types.MethodType(_fused_forward(module.forward), module)
            count += 1
    return count
