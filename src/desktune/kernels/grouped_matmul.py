"""Grouped matmul for mixture-of-experts: rows sorted by expert, one weight per expert.

Math. x is [N, K] with its rows sorted by group: rows [ends[g-1], ends[g]) belong to
group g (ends[-1] = 0). w is [G, K, M]. The output is y[rows of g] = x[rows of g] @ w[g].
Backward:  dx[rows of g] = dy[rows of g] @ w[g]^T,   dw[g] = x[rows of g]^T @ dy[rows of g].
Saved for backward: x (only when w needs a gradient) and w.

Two ways to compute it, picked per call:
- `torch._grouped_mm` (one CUDA launch for all groups) for CUDA bf16 tensors whose rows
  are 16-byte aligned, as the op requires;
- otherwise a loop over the non-empty groups, each a plain matmul on a contiguous slice
  of rows (rows are sorted, so no masks and no gathers). This is also the reference.

`grouped_matmul_frozen` is the same product for a frozen weight that is produced per
chunk of groups by a callable (e.g. dequantised from NF4): only one chunk of dense
weights exists at a time, and backward produces it again instead of keeping it.
No Triton kernel here: the dequantise-then-grouped-GEMM split keeps cuBLAS-grade GEMMs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def can_use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm needs CUDA, bf16 and 16-byte aligned rows (K and M multiples of 8)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x.shape[-1] % 8 == 0
        and w.shape[-1] % 8 == 0
    )


_REFUSED: set[str] = set()  # grouped_mm layouts this torch build refused: the loop handles them


def _try_grouped_mm(kind: str, a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor | None:
    if kind in _REFUSED:
        return None
    try:
        return torch._grouped_mm(a, b, offs=ends)
    except RuntimeError as exc:  # a layout constraint of this torch/GPU: fall back, loudly, once
        from desktune.log import logger

        logger.warning("torch._grouped_mm refused the %s product (%s); using the per-expert loop", kind, exc)
        _REFUSED.add(kind)
        return None


def _grouped_forward(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    if can_use_grouped_mm(x, w):
        kind = "row-major weight" if w.stride(-1) == 1 else "transposed weight"
        out = _try_grouped_mm(kind, x, w, ends)
        if out is not None:
            return out
    return grouped_matmul_reference(x, w, counts)


def _grouped_weight_grad(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    if can_use_grouped_mm(x, dy) and x.shape[0] % 8 == 0:
        # K-grouped form: [K, N] x [N, M] with groups along N gives [G, K, M].
        out = _try_grouped_mm("weight gradient", x.t(), dy, ends)
        if out is not None:
            return out
    dw = x.new_zeros((len(counts), x.shape[1], dy.shape[1]))
    start = 0
    for g, n in enumerate(counts):
        if n:
            dw[g] = x[start:start + n].t() @ dy[start:start + n]
        start += n
    return dw


class GroupedMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, ends, counts):
        ctx.counts = counts
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w, ends)
        return _grouped_forward(x, w, ends, counts)

    @staticmethod
    def backward(ctx, dy):
        x, w, ends = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _grouped_forward(dy, w.transpose(1, 2), ends, ctx.counts)
        if ctx.needs_input_grad[1]:
            dw = _grouped_weight_grad(x, dy, ends, ctx.counts)
        return dx, dw, None, None


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """y[rows of g] = x[rows of g] @ w[g]; differentiable in x and w.

    ends: int32 [G] cumulative row counts (on x's device); counts: the same as Python ints
    (the loop path and the weight gradient need them on the host).
    """
    return GroupedMatmulFunction.apply(x, w, ends, counts)


def grouped_matmul_reference(x: torch.Tensor, w: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """The loop over non-empty groups (also the CPU path)."""
    out = x.new_empty((x.shape[0], w.shape[-1]))
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.matmul(x[start:start + n], w[g], out=out[start:start + n])
        start += n
    return out


def _chunks(counts: Sequence[int], chunk: int):
    """(first group, last group + 1, first row, rows) per run of `chunk` groups holding rows."""
    start = 0
    for g0 in range(0, len(counts), chunk):
        g1 = min(g0 + chunk, len(counts))
        rows = sum(counts[g0:g1])
        if rows:
            yield g0, g1, start, rows
        start += rows


def _frozen_product(x, weight_fn, counts, chunk, transpose):
    out = None
    for g0, g1, start, rows in _chunks(counts, chunk):
        w = weight_fn(g0, g1)
        if transpose:
            w = w.transpose(1, 2)
        sub_counts = list(counts[g0:g1])
        ends = torch.tensor(sub_counts, device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        y = _grouped_forward(x[start:start + rows], w, ends, sub_counts)
        if out is None:
            out = x.new_zeros((x.shape[0], y.shape[1]))
        out[start:start + rows] = y
        del w
    if out is None:  # no rows at all
        probe = weight_fn(0, 1)
        out = x.new_zeros((x.shape[0], probe.shape[1] if transpose else probe.shape[2]))
    return out


class GroupedFrozenMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fn, counts, chunk):
        ctx.weight_fn, ctx.counts, ctx.chunk = weight_fn, counts, chunk
        return _frozen_product(x, weight_fn, counts, chunk, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        dx = _frozen_product(dy.contiguous(), ctx.weight_fn, ctx.counts, ctx.chunk, transpose=True)
        return dx, None, None, None


def grouped_matmul_frozen(
    x: torch.Tensor, weight_fn: Callable[[int, int], torch.Tensor], counts: Sequence[int], chunk: int
) -> torch.Tensor:
    """Grouped product with a frozen weight built `chunk` groups at a time.

    weight_fn(g0, g1) returns the dense [g1 - g0, K, M] weights of groups g0..g1-1 in x's
    dtype. Peak extra memory is one chunk of dense weights, in forward and in backward.
    """
    return GroupedFrozenMatmulFunction.apply(x, weight_fn, list(counts), chunk)
