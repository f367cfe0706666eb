"""Per-instance fast paths for PEFT's 4-bit LoRA layers.

PEFT's lora.bnb.Linear4bit runs bitsandbytes' matmul (which dequantises W and keeps
what autograd needs) and then the adapter as separate modules. Here each such layer
instance gets a forward that calls kernels.qlora.qlora_linear: W is dequantised by a
Triton kernel into a temporary for the matmul and again in backward, and the LoRA
product is fused into the same autograd Function. A gated MLP whose three projections
are all such layers runs as one kernels.qlora_mlp.qlora_mlp Function instead (see
`fused_gated_mlp`), which also skips saving act(g) * u. Anything the fused paths do
not cover at call time (adapters disabled or merged, several active adapters, dropout,
DoRA, extra call arguments) goes through PEFT's own forward.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from desktune.kernels.qlora import qlora_linear
from desktune.kernels.qlora_mlp import qlora_mlp

# config activation -> qlora_mlp's activation name
_MLP_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                    "gelu": "gelu"}


def _is_peft_4bit_lora(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.tuners.lora.bnb") and type(module).__name__ == "Linear4bit"


def qlora_operands(layer: nn.Module):
    """(packed W, quant state, A, B, scaling) of a PEFT 4-bit LoRA layer the fused path
    covers right now, else None."""
    if not _is_peft_4bit_lora(layer) or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (
        name not in layer.lora_A
        or not isinstance(layer.lora_dropout[name], nn.Identity)
        or layer.use_dora.get(name, False)
        or layer.lora_bias.get(name, False)
    ):
        return None
    weight = layer.base_layer.weight
    # FSDP2 swaps the weight for a plain gathered Parameter, which has no quant_state;
    # bitsandbytes keeps a copy on the module for that case.
    state = getattr(weight, "quant_state", None)
    if state is None:
        state = layer.base_layer.quant_state
    return weight.data, state, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


@contextlib.contextmanager
def _compute_dtype(x: torch.Tensor, default: torch.dtype | None):
    """Yield the dtype to compute in, with autocast off inside.

    Under autocast the layer computes in the autocast dtype, like nn.Linear would; the
    Functions run with autocast off so their in-place GEMMs see one dtype.
    """
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else (default or x.dtype)
    with torch.autocast(device_type, enabled=False):
        yield dtype


def _fused_forward(original):
    def forward(self, x, *args, **kwargs):
        operands = None if args or kwargs else qlora_operands(self)
        if operands is None:
            return original(x, *args, **kwargs)
        base = self.base_layer
        with _compute_dtype(x, base.compute_dtype) as dtype:
            out = qlora_linear(x.to(dtype), *operands, base.bias)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)

    return forward


def fused_gated_mlp(mlp: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor | None:
    """down(act(gate(x)) * up(x)) through one fused 4-bit LoRA Function, or None when a
    projection is not covered (then the caller runs the modules one by one)."""
    glu = _MLP_ACTIVATIONS.get(activation)
    projections = [qlora_operands(getattr(mlp, name, None)) for name in ("gate_proj", "up_proj", "down_proj")]
    if glu is None or any(p is None for p in projections) or any(
        getattr(mlp, name).base_layer.bias is not None for name in ("gate_proj", "up_proj", "down_proj")
    ):
        return None
    with _compute_dtype(x, mlp.gate_proj.base_layer.compute_dtype) as dtype:
        out = qlora_mlp(x.to(dtype), *projections, activation=glu)
    return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


def patch_qlora_layers(peft_model: nn.Module) -> int:
    """Give every PEFT 4-bit LoRA layer of this model the fused forward; returns how many."""
    count = 0
    for module in peft_model.modules():
        if _is_peft_4bit_lora(module):
            module.forward = types.MethodType(_fused_forward(module.forward), module)
            count += 1
    return count
