"""Dequantise-into-GEMM for bitsandbytes 4-bit weights: C = A @ W^T or C = A @ W.

W [out, in] is stored packed as in nf4.py (value e = code[nibble(e)] * absmax[e // 64],
row-major over [out, in]). Each tile of W is dequantised in registers, rounded to A's
dtype exactly as the standalone dequantisation rounds it (so both paths multiply the same
numbers), and fed to tl.dot; the dense W never exists in memory.
  forward  (TRANS_W): y  = x @ W^T   A = x [M, in],   C [M, out], reduction over in
  backward:           dx = dy @ W    A = dy [M, out], C [M, in],  reduction over out
The weight element at (reduction r, output column p) has flat index p * sp + r * sr with
(sp, sr) = (in, 1) for W^T and (1, in) for W.
Two kernels: a per-value one for any shape, and one for rows made of whole quantisation
blocks (every Llama/Qwen/Gemma projection: in_features % 64 == 0) that loads each packed
byte once and each scale once per block. No backward of its own: qlora.py calls it for
both directions. Whether this beats
dequantise-then-cuBLAS depends on the shape (W is re-dequantised once per row-tile of A):
scripts/gpu/bench_qlora.py measures both.
"""

from __future__ import annotations

import torch

from desktune.kernels._triton import cdiv, kernel, tl


@kernel
def _nf4_matmul_kernel(
    A, Q, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, C,  # see nf4.py for Q/CODE/ABSMAX/CODE2/ABSMAX2/OFFSET
    M, P, R,  # C is [M, P], the reduction runs over R
    a_stride_m, c_stride_m,
    w_stride_p, w_stride_r,  # flat weight index = p * w_stride_p + r * w_stride_r
    blocksize, blocksize2,
    NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-tiles per group: neighbouring programs share W tiles in L2
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_p = tl.cdiv(P, BLOCK_P)
    group = pid // (GROUP_M * tiles_p)
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_p = (pid % (GROUP_M * tiles_p)) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rr = tl.arange(0, BLOCK_R)
    m_mask = rm < M
    p_mask = rp < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        r_mask = r < R
        a = tl.load(A + rm[:, None].to(tl.int64) * a_stride_m + r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        w_mask = r_mask[:, None] & p_mask[None, :]
        # int32 indices: the launcher checks the weight has < 2^31 values; int64 here spills
        flat = rp[None, :] * w_stride_p + r[:, None] * w_stride_r  # [BLOCK_R, BLOCK_P]
        packed = tl.load(Q + (flat >> 1), mask=w_mask, other=0).to(tl.int32)
        nibble = (packed >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 15
        value = tl.load(CODE + nibble)
        block = flat // blocksize
        if NESTED:
            scale_q = tl.load(ABSMAX + block, mask=w_mask, other=0).to(tl.int32)
            scale = tl.load(CODE2 + scale_q) * tl.load(ABSMAX2 + block // blocksize2, mask=w_mask, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + block, mask=w_mask, other=0.0)
        w = (value * scale).to(A.dtype.element_ty)
        acc += tl.dot(a, w)
    c_ptr = C + rm[:, None].to(tl.int64) * c_stride_m + rp[None, :]
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & p_mask[None, :])


@kernel
def _nf4_matmul_aligned_kernel(
    A, Q, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, C,  # as in _nf4_matmul_kernel
    M, P, R,
    a_stride_m, c_stride_m,
    in_features, blocksize2,
    TRANS_W: tl.constexpr,  # C = A @ W^T (reduction over in_features) or C = A @ W
    NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,  # quantisation block; divides in_features (checked by the launcher)
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Same product for weights whose rows are whole quantisation blocks: each packed byte is
    # loaded once (both nibbles, joined back into value order) and the scales are loaded
    # once per block, not per value. W^T tiles: BLOCK_R == BLOCKSIZE (one scale per row of
    # W in the tile); W tiles: BLOCKSIZE divides BLOCK_P.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_p = tl.cdiv(P, BLOCK_P)
    group = pid // (GROUP_M * tiles_p)
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_p = (pid % (GROUP_M * tiles_p)) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rr = tl.arange(0, BLOCK_R)
    m_mask = rm < M
    p_mask = rp < P
    half_in = in_features // 2
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        r_mask = r < R
        a = tl.load(A + rm[:, None].to(tl.int64) * a_stride_m + r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        if TRANS_W:
            # W rows are output columns p, contiguous along r: bytes [BLOCK_P, BLOCK_R / 2]
            j = tl.arange(0, BLOCK_R // 2)
            packed = tl.load(Q + rp[:, None] * half_in + (r0 // 2 + j)[None, :], mask=p_mask[:, None], other=0)
            packed = packed.to(tl.int32)
            w = tl.join(tl.load(CODE + (packed >> 4)), tl.load(CODE + (packed & 15))).reshape(BLOCK_P, BLOCK_R)
            block = (rp * in_features + r0) // BLOCKSIZE  # [BLOCK_P]
            s_mask = p_mask
        else:
            # W rows are reduction steps r, contiguous along p: bytes [BLOCK_R, BLOCK_P / 2]
            j = tl.arange(0, BLOCK_P // 2)
            byte_mask = r_mask[:, None] & (pid_p * BLOCK_P + 2 * j < P)[None, :]
            packed = tl.load(Q + r[:, None] * half_in + (pid_p * (BLOCK_P // 2) + j)[None, :], mask=byte_mask,
                             other=0).to(tl.int32)
            w = tl.join(tl.load(CODE + (packed >> 4)), tl.load(CODE + (packed & 15))).reshape(BLOCK_R, BLOCK_P)
            nb = tl.arange(0, BLOCK_P // BLOCKSIZE)
            block = (r[:, None] * in_features + pid_p * BLOCK_P + nb[None, :] * BLOCKSIZE) // BLOCKSIZE
            s_mask = r_mask[:, None] & (pid_p * BLOCK_P + nb * BLOCKSIZE < P)[None, :]
        if NESTED:
            scale_q = tl.load(ABSMAX + block, mask=s_mask, other=0).to(tl.int32)
            scale = tl.load(CODE2 + scale_q) * tl.load(ABSMAX2 + block // blocksize2, mask=s_mask, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + block, mask=s_mask, other=0.0)
        if TRANS_W:
            w = (w * scale[:, None]).to(A.dtype.element_ty)
            acc += tl.dot(a, tl.trans(w))
        else:
            w = w.reshape(BLOCK_R, BLOCK_P // BLOCKSIZE, BLOCKSIZE) * scale[:, :, None]
            acc += tl.dot(a, w.reshape(BLOCK_R, BLOCK_P).to(A.dtype.element_ty))
    c_ptr = C + rm[:, None].to(tl.int64) * c_stride_m + rp[None, :]
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & p_mask[None, :])


def _tiles(device: torch.device) -> dict:
    # 128 x 128 output tiles, 8 warps, 3 stages: the usual bf16 GEMM choice; the reduction
    # step is 32 because dequantising a 64 x 128 W tile in registers made ptxas spill
    # (255 registers + 240 bytes of stack for sm_90) and 32 does not. The interpreter runs
    # numpy per program, where small tiles keep odd test shapes cheap.
    if device.type == "cuda":
        return {"BLOCK_M": 128, "BLOCK_P": 128, "BLOCK_R": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_R": 32, "GROUP_M": 4}


def _aligned_tiles(device: torch.device, blocksize: int, transpose_weight: bool) -> dict:
    # The aligned kernel's W^T tiles take one quantisation block per reduction step
    # (BLOCK_R = blocksize); its W tiles hold whole blocks along BLOCK_P.
    if device.type == "cuda":
        tiles = {"BLOCK_M": 128, "BLOCK_P": 128, "BLOCK_R": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    else:
        tiles = {"BLOCK_M": 32, "BLOCK_P": 64, "BLOCK_R": 32, "GROUP_M": 4}
    if transpose_weight:
        tiles["BLOCK_R"] = blocksize
    else:
        tiles["BLOCK_P"] = max(tiles["BLOCK_P"], blocksize)
    return tiles


def _is_aligned(in_features: int, blocksize: int) -> bool:
    # rows of W made of whole quantisation blocks, blocks a dot-friendly power of two
    return in_features % blocksize == 0 and 16 <= blocksize <= 128 and blocksize & (blocksize - 1) == 0


def nf4_matmul(a: torch.Tensor, packed: torch.Tensor, quant_state, transpose_weight: bool = True,
               aligned: bool | None = None) -> torch.Tensor:
    """a @ W^T (transpose_weight) or a @ W for the 4-bit W [out, in] of (packed, quant_state).

    a is [M, in] (or [M, out] for a @ W) in the compute dtype; the result has a's dtype.
    aligned: use the kernel for rows of whole quantisation blocks (None: when they are;
    False: the per-value kernel, for any shape). CPU tensors run in the Triton interpreter
    (there bf16 tl.dot is wrong: use fp32/fp16).
    """
    out_features, in_features = (int(s) for s in quant_state.shape)
    if a.stride(-1) != 1:
        a = a.contiguous()
    m = a.shape[0]
    p, r = (out_features, in_features) if transpose_weight else (in_features, out_features)
    if a.shape[1] != r:
        raise ValueError(f"a has {a.shape[1]} columns, the 4-bit weight {tuple(quant_state.shape)} needs {r}")
    if out_features * in_features >= 2**31:
        raise ValueError(f"nf4_matmul indexes the weight with int32; {tuple(quant_state.shape)} is too large")
    stride_p, stride_r = (in_features, 1) if transpose_weight else (1, in_features)
    device = a.device
    packed = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    code = quant_state.code.to(device=device, dtype=torch.float32)
    nested = bool(getattr(quant_state, "nested", False))
    if nested:
        state2 = quant_state.state2
        code2 = state2.code.to(device=device, dtype=torch.float32)
        absmax2 = state2.absmax.to(device=device, dtype=torch.float32)
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device).reshape(1)
        blocksize2, absmax = int(state2.blocksize), quant_state.absmax
    else:
        absmax = quant_state.absmax.to(torch.float32)
        code2 = absmax2 = offset = absmax  # unused when not nested
        blocksize2 = 1
    c = torch.empty((m, p), dtype=a.dtype, device=device)
    blocksize = int(quant_state.blocksize)
    if aligned is None:
        aligned = _is_aligned(in_features, blocksize)
    elif aligned and not _is_aligned(in_features, blocksize):
        raise ValueError(f"rows of {in_features} values are not whole blocks of {blocksize}: use aligned=False")
    if aligned:
        tiles = _aligned_tiles(device, blocksize, transpose_weight)
        grid = (cdiv(m, tiles["BLOCK_M"]) * cdiv(p, tiles["BLOCK_P"]),)
        _nf4_matmul_aligned_kernel[grid](
            a, packed, code, absmax, code2, absmax2, offset, c, m, p, r, a.stride(0), c.stride(0),
            in_features, blocksize2, TRANS_W=transpose_weight, NESTED=nested, BLOCKSIZE=blocksize, **tiles,
        )
        return c
    tiles = _tiles(device)
    grid = (cdiv(m, tiles["BLOCK_M"]) * cdiv(p, tiles["BLOCK_P"]),)
    _nf4_matmul_kernel[grid](
        a, packed, code, absmax, code2, absmax2, offset, c,
        m, p, r, a.stride(0), c.stride(0), stride_p, stride_r,
        int(quant_state.blocksize), blocksize2, NESTED=nested, **tiles,
    )
    return c
