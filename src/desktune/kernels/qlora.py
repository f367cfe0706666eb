"""QLoRA linear: y = x W^T + s (x A^T) B^T + b with W a frozen bitsandbytes 4-bit weight.

x [..., in], W [out, in] (4-bit, see nf4.py), A [r, in], B [out, r], s = scaling.
Forward:   y = x W^T + s * xa B^T (+ bias),  xa = x A^T
Backward:  dB = s * dy^T xa,   dxa = s * dy B,   dA = dxa^T x,
           dx = dy W + dxa A   (W dequantised again: it is never kept between the passes)
Saved for backward: x, xa ([tokens, r], small), A, B, and the packed W (already resident).
W, its quant state and the bias get no gradient (bias gets one only if it asks for it).
LoRA dropout is not applied here: callers with lora_dropout > 0 use PEFT's own path.

The base matmul x W^T (and dy W) has three implementations, picked by `matmul`:
  "dequant"  Triton dequantisation into a temporary W, cuBLAS matmul, temporary freed
  "fused"    Triton dequantise-into-GEMM (nf4_matmul.py), no dense W at all
  "torch"    PyTorch dequantisation (bit-identical to bitsandbytes) and matmul
"auto" is "dequant" for CUDA tensors and "torch" elsewhere; scripts/gpu/bench_qlora.py
times "dequant" against "fused" per Llama-3.1-8B projection shape.
"""

from __future__ import annotations

import torch

from desktune.kernels._triton import use_triton
from desktune.kernels.nf4 import dequantize_4bit, dequantize_4bit_reference
from desktune.kernels.nf4_matmul import nf4_matmul

MATMUL_MODES = ("auto", "dequant", "fused", "torch")


def _dense_weight(packed, quant_state, dtype, mode):
    weight = dequantize_4bit(packed, quant_state) if mode == "dequant" else dequantize_4bit_reference(packed, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


def base_matmul(a: torch.Tensor, packed, quant_state, mode: str, transpose_weight: bool = True) -> torch.Tensor:
    """a @ W^T (transpose_weight) or a @ W for the 4-bit W; a is 2-D."""
    if mode == "fused":
        return nf4_matmul(a, packed, quant_state, transpose_weight)
    weight = _dense_weight(packed, quant_state, a.dtype, mode)
    out = a @ (weight.t() if transpose_weight else weight)
    del weight  # the dense W lives only for this matmul
    return out


class QLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, quant_state, lora_a, lora_b, scaling, bias, mode):
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        y = base_matmul(x2, packed, quant_state, mode)
        xa = x2 @ a.t()
        y.addmm_(xa, b.t(), alpha=scaling)
        if bias is not None:
            y += bias.to(y.dtype)
        ctx.quant_state, ctx.scaling, ctx.mode = quant_state, scaling, mode
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, xa, lora_a, lora_b, packed)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, lora_a, lora_b, packed = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
        s = ctx.scaling
        d_b = (dy2.t() @ xa).mul_(s).to(lora_b.dtype) if ctx.needs_input_grad[4] else None
        dxa = (dy2 @ b).mul_(s)
        d_a = (dxa.t() @ x2).to(lora_a.dtype) if ctx.needs_input_grad[3] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = base_matmul(dy2, packed, ctx.quant_state, ctx.mode, transpose_weight=False)
            dx.addmm_(dxa, a)
            dx = dx.reshape(*dy.shape[:-1], x2.shape[-1])
        d_bias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[6] else None
        return dx, None, None, d_a, d_b, None, d_bias, None


def _mode(matmul: str, *tensors: torch.Tensor) -> str:
    if matmul not in MATMUL_MODES:
        raise ValueError(f"matmul must be one of {MATMUL_MODES}, got {matmul!r}")
    if matmul == "auto":
        return "dequant" if use_triton(*tensors) else "torch"
    return matmul


def qlora_linear(
    x: torch.Tensor,
    quant_weight: torch.Tensor,
    quant_state,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    *,
    matmul: str = "auto",
) -> torch.Tensor:
    """x W^T + scaling * (x A^T) B^T (+ bias) for a bitsandbytes 4-bit W; grads for x, A, B.

    quant_weight is the packed uint8 weight (bnb's Params4bit data), quant_state its
    QuantState; lora_A [r, in] and lora_B [out, r] are PEFT's lora_A / lora_B weights.
    """
    mode = _mode(matmul, x, quant_weight)
    return QLoRALinearFunction.apply(x, quant_weight, quant_state, lora_A, lora_B, float(scaling), bias, mode)


def qlora_linear_reference(x, quant_weight, quant_state, lora_A, lora_B, scaling, bias=None):
    """Plain autograd: dequantise (PyTorch), then the two matmuls."""
    weight = dequantize_4bit_reference(quant_weight, quant_state).to(x.dtype)
    y = x @ weight.t() + scaling * ((x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t())
    return y + bias if bias is not None else y
