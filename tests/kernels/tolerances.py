"""Tolerances for kernel-vs-reference checks, in one place.

bf16: one bf16 ulp is 2^-8 of the value (0.4 %); the kernels compute in float32 and round
once, the references often round after every op, and Triton's CPU interpreter truncates
float32 -> bf16 instead of rounding to nearest, so a few ulps apart is expected: 2 %.
fp16 keeps 3 more mantissa bits. fp32 differences come from summation order only (and
the GEMM kernels' tile order), so 1e-4 covers reductions over a few thousand values.
"""

from __future__ import annotations

import torch

TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """atol/rtol for `dtype`; scale > 1 for results of long sums (GEMMs over thousands of terms)."""
    t = TOLERANCES[dtype]
    return {"atol": t["atol"] * scale, "rtol": t["rtol"] * scale}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """Compares in float32 with the tolerance of `dtype` (default: expected's dtype)."""
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), **tol(dtype, scale))


# Relative Frobenius error ||actual - expected|| / ||expected|| for outputs of chained bf16
# GEMMs over thousands of terms, where element-wise bounds fail on values near zero: bf16
# operands land between 1e-3 and 1e-2.
NORM_TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close_norm(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    dtype = dtype or expected.dtype
    expected = expected.float()
    error = ((actual.float() - expected).norm() / expected.norm()).item()
    assert error < NORM_TOLERANCES[dtype], f"relative error {error:.2e} >= {NORM_TOLERANCES[dtype]:.0e} ({dtype})"
