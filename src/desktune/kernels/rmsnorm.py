"""RMSNorm: y = x * rstd * (offset + w),  rstd = 1 / sqrt(mean(x^2) + eps).

offset is 0 for Llama-style norms and 1 for Gemma's `(1 + w)` form. Statistics are taken
in float32 whatever the input dtype, like transformers. The two forms round differently
and the kernel copies each exactly:
  Llama (offset 0):  y = w * cast_x(x * rstd)             (cast to x.dtype, then scale)
  Gemma (offset 1):  y = cast_x((x * rstd) * (1 + w))     (scale in float32, then cast)

Backward, with n = x * rstd (float32) and g = offset + w:
  dn = dy * g
  dx = rstd * (dn - n * mean(dn * n))
  dw = sum over rows of dy * n     (Llama uses cast_x(n), what forward multiplied by)
Saved for backward: x and rstd (one float32 per row), plus the weight parameter itself (no
copy); n is recomputed.
"""

from __future__ import annotations

import torch

from desktune.kernels._triton import cdiv, kernel, next_power_of_2, tl, use_triton


@kernel
def _rmsnorm_forward_kernel(
    X, W, Y, RSTD,
    x_row_stride, y_row_stride,
    n_cols, eps, offset,
    CAST_BEFORE_SCALE: tl.constexpr,  # Llama rounding (offset 0) vs Gemma's
    BLOCK: tl.constexpr,  # power of two >= n_cols: one program holds a whole row
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    n = x * rstd
    if CAST_BEFORE_SCALE:
        y = w * n.to(X.dtype.element_ty).to(tl.float32)
    else:
        y = n * (w + offset)
    tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@kernel
def _rmsnorm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,  # DW_PARTIAL: [programs, n_cols] float32, summed by the launcher
    dy_row_stride, x_row_stride, dx_row_stride,
    n_rows, n_cols, offset, rows_per_program,
    CAST_BEFORE_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    g = w + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        if row < n_rows:
            row64 = row.to(tl.int64)
            x = tl.load(X + row64 * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row64)
            n = x * rstd
            dn = dy * g
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
            tl.store(DX + row64 * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if CAST_BEFORE_SCALE:
                dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
            else:
                dw += dy * n
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    # One row per program: 4 warps up to 2k columns, 8 to 8k, 16 beyond (Liger/Unsloth's
    # choice for the same layout; hidden 4096 lands on 8).
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _backward_programs(n_rows: int, device: torch.device) -> int:
    # Enough programs to fill the GPU a few times over; each sums its rows' dw locally so
    # the partial buffer stays [programs, cols] instead of [rows, cols].
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)  # interpreter: few programs, each a Python loop over rows


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    # Llama's `weight * normed.to(x.dtype)` follows torch's type promotion; Gemma casts to x.
    return torch.promote_types(weight.dtype, x.dtype) if offset == 0.0 else x.dtype


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0):
    """Returns (y, rstd) with x of any shape [..., D]; rstd is [rows] float32."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=_out_dtype(x, weight, offset), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block = next_power_of_2(n_cols)
    _rmsnorm_forward_kernel[(n_rows,)](
        x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), n_cols, float(eps), float(offset),
        CAST_BEFORE_SCALE=offset == 0.0, BLOCK=block, num_warps=_num_warps(block),
    )
    return y.reshape(*shape[:-1], n_cols), rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float = 0.0):
    """Returns (dx, dw) for y = rmsnorm(x, weight); dx has x's dtype, dw weight's."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    dy2 = dy.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    programs = max(1, _backward_programs(n_rows, x.device))
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    block = next_power_of_2(n_cols)
    _rmsnorm_backward_kernel[(programs,)](
        dy2, x2, weight.contiguous(), rstd, dx, dw_partial,
        dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, float(offset), cdiv(n_rows, programs),
        CAST_BEFORE_SCALE=offset == 0.0, BLOCK=block, num_warps=_num_warps(block),
    )
    return dx.reshape(shape), dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm on any device (CPU tensors run in the Triton interpreter)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        y, rstd = rmsnorm_forward(x, weight, eps, offset)
        ctx.offset = offset
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy, x, weight, rstd, ctx.offset)
        return dx, (dw if ctx.needs_input_grad[1] else None), None, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim; the Triton kernel on CUDA, transformers' math elsewhere."""
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, eps, offset)
    return rmsnorm_reference(x, weight, eps, offset)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        # Llama casts back before scaling; Gemma scales in float32 (below).
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)
