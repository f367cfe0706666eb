"""gpt-oss's expert activation over interleaved (gate, up) columns, forward + in-place backward.

gate_up [..., 2I]: g = gate_up[..., 0::2], u = gate_up[..., 1::2]; a = alpha, L = limit.
Forward:  gc = min(g, L),  uc = clamp(u, -L, L),  s = sigmoid(a gc),
          out = (uc + 1) * gc * s                                   [..., I]
Backward: dg = dout * (uc + 1) * s * (1 + a gc (1 - s)) * [g <= L]
          du = dout * gc * s * [-L <= u <= L]
          (the masks are torch.clamp's: gradient 1 inside the closed interval, else 0)
Saved for backward: gate_up only; backward overwrites it with the interleaved (dg, du), so
the expert MLP's biggest activation gets no second buffer (same rule as swiglu.py: leaves
and views of leaves are copied first, anything else must not be read after backward).
Computed in float32, rounded once to the input dtype.
"""

from __future__ import annotations

import torch

from desktune.kernels._triton import cdiv, kernel, owned_by_caller, tl, use_triton


@kernel
def _clamped_swiglu_forward_kernel(
    GU,  # [pairs * 2] interleaved gate, up
    OUT,  # [pairs]
    n_pairs, alpha, limit,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n_pairs
    g = tl.load(GU + 2 * j, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
    gc = tl.minimum(g, limit)
    uc = tl.minimum(tl.maximum(u, -limit), limit)
    out = (uc + 1.0) * gc * tl.sigmoid(alpha * gc)
    tl.store(OUT + j, out.to(OUT.dtype.element_ty), mask=mask)


@kernel
def _clamped_swiglu_backward_kernel(
    DOUT,  # [pairs]
    GU,  # [pairs * 2], overwritten with the interleaved (dg, du)
    n_pairs, alpha, limit,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n_pairs
    dout = tl.load(DOUT + j, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GU + 2 * j, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
    gc = tl.minimum(g, limit)
    uc = tl.minimum(tl.maximum(u, -limit), limit)
    s = tl.sigmoid(alpha * gc)
    glu = gc * s
    dg = tl.where(g <= limit, dout * (uc + 1.0) * s * (1.0 + alpha * gc * (1.0 - s)), 0.0)
    du = tl.where((u >= -limit) & (u <= limit), dout * glu, 0.0)
    tl.store(GU + 2 * j, dg.to(GU.dtype.element_ty), mask=mask)
    tl.store(GU + 2 * j + 1, du.to(GU.dtype.element_ty), mask=mask)


def _block(n_pairs: int) -> int:
    # Element-wise like swiglu.py: 1024 pairs per program.
    return 1024


def clamped_swiglu_forward(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (interleaved gate, up), got {gate_up.shape[-1]}")
    gate_up = gate_up.contiguous()
    out = torch.empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=gate_up.dtype, device=gate_up.device)
    n = out.numel()
    _clamped_swiglu_forward_kernel[(cdiv(n, _block(n)),)](gate_up, out, n, float(alpha), float(limit),
                                                        BLOCK=_block(n))
    return out


def clamped_swiglu_backward(dout: torch.Tensor, gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """d gate_up, written into gate_up's storage (gate_up must be contiguous)."""
    if not gate_up.is_contiguous():
        raise ValueError("clamped_swiglu_backward writes into gate_up in place: pass a contiguous tensor")
    dout = dout.contiguous()
    n = dout.numel()
    _clamped_swiglu_backward_kernel[(cdiv(n, _block(n)),)](dout, gate_up, n, float(alpha), float(limit),
                                                         BLOCK=_block(n))
    return gate_up


class ClampedSwiGLUFunction(torch.autograd.Function):
    """Triton gpt-oss activation on any device (CPU tensors are interpreted); in-place backward."""

    @staticmethod
    def forward(ctx, gate_up, alpha, limit):
        gate_up = gate_up.clone() if owned_by_caller(gate_up) else gate_up.contiguous()
        ctx.alpha, ctx.limit = alpha, limit
        ctx.save_for_backward(gate_up)
        return clamped_swiglu_forward(gate_up, alpha, limit)

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        return clamped_swiglu_backward(dout, gate_up, ctx.alpha, ctx.limit), None, None


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """(clamp(u) + 1) * clamp(g) * sigmoid(alpha * clamp(g)); Triton on CUDA, PyTorch elsewhere."""
    if use_triton(gate_up):
        return ClampedSwiGLUFunction.apply(gate_up, alpha, limit)
    return clamped_swiglu_reference(gate_up, alpha, limit)


def clamped_swiglu_reference(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
