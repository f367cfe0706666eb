"""Dequantisation of bitsandbytes 4-bit weights (NF4 / FP4, optionally double-quantised).

Layout (bitsandbytes `quantize_4bit`, read from its CPU/default backends): the weight of
shape S is flattened row-major to n = prod(S) values; packed byte i holds value 2i in its
high nibble and value 2i+1 in its low nibble (uint8 tensor of (n+1)//2 bytes, any shape).
Value e is   w[e] = code[nibble(e)] * absmax[e // blocksize]   (float32), cast to S's dtype.
code is the 16-entry NF4 (or FP4) table. With double quantisation (`quant_state.nested`)
absmax itself is stored as uint8 codes with a second level:
    absmax[b] = code2[absmax_q[b]] * absmax2[b // blocksize2] + offset      (float32)
Backward: none (the weight is frozen). This file only dequantises; qlora.py uses it.
"""

from __future__ import annotations

import torch

from desktune.kernels._triton import cdiv, kernel, tl


@kernel
def _dequant_4bit_kernel(
    Q,  # packed uint8, (n + 1) // 2 bytes
    CODE,  # [16] float32 lookup table
    ABSMAX,  # [blocks] float32, or uint8 codes when NESTED
    CODE2, ABSMAX2, OFFSET,  # second level (NESTED only): [256] f32, [blocks2] f32, [1] f32
    OUT,  # n values of the output dtype
    n_elements, blocksize, blocksize2,
    NESTED: tl.constexpr,
    OUT_BF16: tl.constexpr,  # round to bfloat16 by hand (see below)
    BLOCK: tl.constexpr,  # packed bytes per program (2 * BLOCK values)
):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    byte_mask = byte * 2 < n_elements
    packed = tl.load(Q + byte, mask=byte_mask, other=0).to(tl.int32)
    hi = tl.load(CODE + (packed >> 4))
    lo = tl.load(CODE + (packed & 15))
    block = (byte * 2) // blocksize  # 2i and 2i + 1 share a block: blocksize is even
    if NESTED:
        scale_q = tl.load(ABSMAX + block, mask=byte_mask, other=0).to(tl.int32)
        scale = tl.load(CODE2 + scale_q) * tl.load(ABSMAX2 + block // blocksize2, mask=byte_mask, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=byte_mask, other=0.0)
    pair = tl.arange(0, 2)
    value = tl.where(pair[None, :] == 0, hi[:, None], lo[:, None]) * scale[:, None]
    offs = byte[:, None] * 2 + pair[None, :]
    if OUT_BF16:
        # Round to nearest even on the bits: the GPU's cvt does the same, but Triton's CPU
        # interpreter truncates, and the result must equal bitsandbytes' bit for bit.
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(OUT + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=offs < n_elements)
    else:
        tl.store(OUT + offs, value.to(OUT.dtype.element_ty), mask=offs < n_elements)


def _block(n_bytes: int) -> int:
    # Memory bound gather/scale: 1024 bytes (2048 values, 4 KiB of bf16 out) per program
    # keeps every SM busy for 4096x4096 weights (8M bytes -> 8192 programs).
    return 1024


def _scalar_tensor(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(1).to(device=device, dtype=torch.float32)
    return torch.tensor([float(value)], dtype=torch.float32, device=device)


def dequantize_4bit(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight (quant_state.shape, quant_state.dtype) of a bitsandbytes 4-bit weight.

    quant_state is bitsandbytes' QuantState (read by attribute: absmax, code, blocksize,
    shape, dtype, nested, state2, offset). CPU tensors run in the Triton interpreter.
    """
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    shape = tuple(quant_state.shape)
    n = 1
    for s in shape:
        n *= s
    if packed.numel() * 2 < n:
        raise ValueError(f"packed weight holds {packed.numel() * 2} values, quant_state.shape {shape} needs {n}")
    if out is None:
        out = torch.empty(shape, dtype=quant_state.dtype, device=packed.device)
    code = quant_state.code.to(device=packed.device, dtype=torch.float32)
    nested = bool(getattr(quant_state, "nested", False))
    if nested:
        state2 = quant_state.state2
        code2 = state2.code.to(device=packed.device, dtype=torch.float32)
        absmax2 = state2.absmax.to(device=packed.device, dtype=torch.float32)
        offset = _scalar_tensor(quant_state.offset, packed.device)
        blocksize2 = int(state2.blocksize)
        absmax = quant_state.absmax
    else:
        absmax = quant_state.absmax.to(torch.float32)
        code2 = absmax2 = offset = absmax  # unused when not nested
        blocksize2 = 1
    block = _block(packed.numel())
    _dequant_4bit_kernel[(cdiv(packed.numel(), block),)](
        packed, code, absmax, code2, absmax2, offset, out,
        n, int(quant_state.blocksize), blocksize2, NESTED=nested, OUT_BF16=out.dtype == torch.bfloat16, BLOCK=block,
    )
    return out


def dequantize_4bit_reference(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The same math in PyTorch (what bitsandbytes' portable backend computes)."""
    packed = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    shape = tuple(quant_state.shape)
    n = 1
    for s in shape:
        n *= s
    nibbles = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[:n].long()
    values = quant_state.code.float().to(packed.device)[nibbles]
    if getattr(quant_state, "nested", False):
        state2 = quant_state.state2
        scale2 = state2.absmax.float().repeat_interleave(state2.blocksize)[: quant_state.absmax.numel()]
        absmax = state2.code.float()[quant_state.absmax.long()] * scale2
        absmax = absmax + quant_state.offset
    else:
        absmax = quant_state.absmax.float()
    scale = absmax.repeat_interleave(quant_state.blocksize)[:n]
    return (values * scale).reshape(shape).to(quant_state.dtype)
