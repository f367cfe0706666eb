"""RMSNorm Triton kernel (interpreted on CPU) against transformers' math, forward and grads."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, assert_close_norm

from desktune.kernels.rmsnorm import RMSNormFunction, rmsnorm, rmsnorm_reference


def _grads(fn, x, w, dy, eps, offset):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, eps, offset)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_reference_forward_and_grads(dtype, offset):
    torch.manual_seed(0)
    x = (torch.randn(3, 37, 130) * 2 + 0.5).to(dtype)
    w = (torch.randn(130) * 0.2 + (0.0 if offset else 1.0)).to(dtype)
    dy = torch.randn(3, 37, 130).to(dtype)
    y, dx, dw = _grads(RMSNormFunction.apply, x, w, dy, 1e-5, offset)
    y_ref = rmsnorm_reference(x, w, 1e-5, offset)
    assert y.dtype == y_ref.dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, y_ref)
    # Gradients against the float32 math on the same values: a bf16 reference rounds every
    # product of dw's 111-row sum, and is itself off where the sum cancels.
    _, dx_ref, dw_ref = _grads(rmsnorm_reference, x.float(), w.float(), dy.float(), 1e-5, offset)
    assert_close(dx, dx_ref, dtype)
    # Llama's dw multiplies by the bf16-rounded normed value (what forward used): 111 terms
    # each off by up to 2^-9 relative add up to ~0.03 where the sum cancels.
    assert_close(dw, dw_ref, dtype, scale=3.0 if dtype == torch.bfloat16 else 1.0)


def test_rmsnorm_float32_weight_on_bf16_input_promotes_like_llama():
    torch.manual_seed(1)
    x = torch.randn(5, 67).to(torch.bfloat16)
    w = torch.randn(67)
    dy = torch.randn(5, 67)
    y, dx, dw = _grads(RMSNormFunction.apply, x, w, dy, 1e-6, 0.0)
    y_ref, dx_ref, dw_ref = _grads(rmsnorm_reference, x, w, dy, 1e-6, 0.0)
    assert y.dtype == torch.float32 == y_ref.dtype and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    # y and dw use normed rounded to bf16 (the interpreter truncates, torch rounds).
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert_close(got, want, torch.bfloat16)


def test_rmsnorm_saves_only_x_weight_and_one_rstd_per_row():
    x = torch.randn(4, 9, 130, requires_grad=True)
    w = torch.ones(130, requires_grad=True)
    y = RMSNormFunction.apply(x, w, 1e-6, 0.0)
    saved = y.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(4, 9, 130), (130,), (36,)]
    assert saved[2].dtype == torch.float32
    rstd_ref = torch.rsqrt(x.detach().pow(2).mean(-1) + 1e-6).reshape(-1)
    torch.testing.assert_close(saved[2], rstd_ref)


def test_rmsnorm_non_contiguous_input():
    torch.manual_seed(2)
    base = torch.randn(37, 3, 130)
    x = base.transpose(0, 1)  # rows not contiguous in memory
    w = torch.randn(130)
    assert_close(RMSNormFunction.apply(x, w, 1e-6, 1.0), rmsnorm_reference(x, w, 1e-6, 1.0))


def test_public_rmsnorm_on_cpu_is_exactly_the_reference():
    torch.manual_seed(3)
    x, w = torch.randn(2, 5, 16).to(torch.bfloat16), torch.randn(16).to(torch.bfloat16)
    for offset in (0.0, 1.0):
        assert torch.equal(rmsnorm(x, w, 1e-6, offset), rmsnorm_reference(x, w, 1e-6, offset))


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_gpu_real_size(offset):
    torch.manual_seed(0)
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(4096, device="cuda") * 0.1 + 1 - offset).to(torch.bfloat16)
    dy = torch.randn_like(x)
    probe = rmsnorm(x.detach().clone().requires_grad_(), w, 1e-5, offset)
    assert probe.grad_fn.__class__.__name__.startswith("RMSNormFunction")  # the Triton path ran
    y, dx, dw = _grads(rmsnorm, x, w, dy, 1e-5, offset)
    assert_close(y, rmsnorm_reference(x, w, 1e-5, offset))
    _, dx_ref, dw_ref = _grads(rmsnorm_reference, x.float(), w.float(), dy.float(), 1e-5, offset)
    assert_close(dx, dx_ref, torch.bfloat16)
    assert_close_norm(dw, dw_ref, torch.bfloat16)  # 8192-row bf16 sums: element-wise bounds fail (H200 run 5)
