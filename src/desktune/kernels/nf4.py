"""Dequantisation of bitsandbytes 4-bit weights (NF4 / FP4, optionally double-quantised).

Layout (bitsandbytes `quantize_4bit`, read from its CPU/default backends): the weight of
shape S is flattened row-major to n = prod(S) values; packed byte i holds value 2i in its
high nibble and value 2i+1 in its low nibble (uint8 tensor of (n+1)//2 bytes, any shape).
Value e is   w[e] = code[nibble(e)] * absmax[e // blocksize]   (float32), cast to S's dtype.
code is the 16-entry NF4 (or FP4) table. With double quantisation (`quant_state.nested`)
absmax itself is stored as uint8 codes with a second level:
    absmax[b] = code2[absmax_q[b]] * absmax2[b // blocksize2] + offset      (float32)
Backward: none (the weight is frozen). qlora.py uses the dequantiser.

`quantize_nf4` writes this layout without bitsandbytes (the GPU machine may not have it):
the same NF4 table and first level; its second-level code is a uniform signed 8-bit grid
instead of bitsandbytes' dynamic map, which the dequantisers read from the state anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from desktune.kernels._triton import cdiv, kernel, tl

# bitsandbytes' NF4 table (normal-float quantiles), ascending.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


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


@kernel
def _dequant_4bit_blocks_kernel(
    Q,  # packed uint8: quant block b is bytes [b * HALF, (b + 1) * HALF)
    CODE,  # [16] float32 lookup table
    ABSMAX,  # [n_blocks] float32, or uint8 codes when NESTED
    CODE2, ABSMAX2, OFFSET,  # second level (NESTED only)
    OUT,  # n_blocks * 2 * HALF values of the output dtype
    n_blocks, blocksize2,
    NESTED: tl.constexpr,
    EXACT_BF16: tl.constexpr,  # interpreter only: round float32 -> bf16 to nearest even by hand
    HALF: tl.constexpr,  # bytes per quant block (blocksize / 2, a power of two)
    ROWS: tl.constexpr,  # quant blocks per program
):
    # One row per quant block: one scale load per block (not per byte), the two nibbles
    # of each byte joined into value order, and each block's values stored contiguously.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_blocks
    cols = tl.arange(0, HALF)
    packed = tl.load(Q + rows[:, None] * HALF + cols[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
    if NESTED:
        scale_q = tl.load(ABSMAX + rows, mask=row_mask, other=0).to(tl.int32)
        scale = tl.load(CODE2 + scale_q) * tl.load(ABSMAX2 + rows // blocksize2, mask=row_mask, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + rows, mask=row_mask, other=0.0)
    hi = tl.load(CODE + (packed >> 4)) * scale[:, None]
    lo = tl.load(CODE + (packed & 15)) * scale[:, None]
    value = tl.reshape(tl.join(hi, lo), (ROWS, 2 * HALF))
    offs = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    if EXACT_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(OUT + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=row_mask[:, None])
    else:
        tl.store(OUT + offs, value.to(OUT.dtype.element_ty), mask=row_mask[:, None])


# Quant blocks per program of the block kernel: 64 blocks of 64 values = 8 KiB of bf16
# written per program, 14336 programs for a 14336 x 4096 weight. (H200 run 1: the per-byte
# kernel, one scale gather per byte, took 0.154 ms there against bitsandbytes' 0.076 ms.)
_BLOCKS_PER_PROGRAM = 64


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
    blocksize = int(quant_state.blocksize)
    if n % blocksize == 0 and blocksize >= 2 and blocksize & (blocksize - 1) == 0:
        n_blocks = n // blocksize
        _dequant_4bit_blocks_kernel[(cdiv(n_blocks, _BLOCKS_PER_PROGRAM),)](
            packed, code, absmax, code2, absmax2, offset, out, n_blocks, blocksize2, NESTED=nested,
            EXACT_BF16=out.dtype == torch.bfloat16 and not out.is_cuda, HALF=blocksize // 2,
            ROWS=_BLOCKS_PER_PROGRAM,
        )
        return out
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


@dataclass
class QuantState4bit:
    """The fields of bitsandbytes' QuantState that the dequantisers read (same names)."""

    absmax: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    quant_type: str = "nf4"
    offset: torch.Tensor | None = None
    state2: "QuantState4bit | None" = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat.abs(), (0, pad)).reshape(-1, blocksize)
    return blocks.amax(dim=1).clamp(min=1e-38)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True):
    """(packed uint8 [(n+1)//2, 1], QuantState4bit) for `weight`, in bitsandbytes' NF4 layout."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    absmax = _blockwise_absmax(flat, blocksize)
    scale = absmax.repeat_interleave(blocksize)[:n]
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device)
    q = _nearest((flat / scale).clamp(-1, 1), code)
    if n % 2:
        q = torch.cat((q, q.new_zeros(1)))
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    state = QuantState4bit(absmax=absmax, shape=tuple(weight.shape), dtype=weight.dtype, blocksize=blocksize, code=code)
    if compress_statistics:
        offset = absmax.mean()
        centred = absmax - offset
        absmax2 = _blockwise_absmax(centred, 256)
        code2 = torch.linspace(-1.0, 1.0, 256, device=weight.device)
        scaled = (centred / absmax2.repeat_interleave(256)[: centred.numel()]).clamp(-1, 1)
        state.absmax = _nearest(scaled, code2)
        state.offset = offset
        state.state2 = QuantState4bit(
            absmax=absmax2, shape=tuple(centred.shape), dtype=torch.float32, blocksize=256, code=code2, quant_type="int8"
        )
    return packed, state
