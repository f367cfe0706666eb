"""gpt-oss's clamped SwiGLU kernel (interpreted on CPU) against PyTorch, forward and grads."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from desktune.kernels.clamped_swiglu import ClampedSwiGLUFunction, clamped_swiglu, clamped_swiglu_reference

ALPHA, LIMIT = 1.702, 7.0  # gpt-oss-20b's config


def _run(fn, gate_up, dout):
    x = gate_up.clone().requires_grad_()
    out = fn(x * 1)  # a non-leaf, as a projection's output would be
    out.backward(dout)
    return out.detach(), x.grad


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clamped_swiglu_matches_reference_forward_and_grad(dtype):
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 37, 130) * 6).to(dtype)  # many values beyond +-7: both clamps active
    gate_up[0, 0, 0] = LIMIT  # the boundaries themselves: torch's clamp passes the gradient there
    gate_up[0, 0, 1] = -LIMIT
    dout = torch.randn(3, 37, 65).to(dtype)
    out, grad = _run(lambda t: ClampedSwiGLUFunction.apply(t, ALPHA, LIMIT), gate_up, dout)
    assert out.shape == (3, 37, 65) and out.dtype == dtype
    assert_close(out, clamped_swiglu_reference(gate_up, ALPHA, LIMIT))
    _, grad_ref = _run(lambda t: clamped_swiglu_reference(t, ALPHA, LIMIT), gate_up.float(), dout.float())
    assert_close(grad, grad_ref, dtype)
    assert (grad[..., 0::2][gate_up[..., 0::2] > LIMIT] == 0).all()  # clamped gates pass no gradient
    assert grad[0, 0, 0] != 0 and grad[0, 0, 1] != 0


def test_clamped_swiglu_backward_reuses_gate_up_and_spares_leaves():
    torch.manual_seed(1)
    leaf = (torch.randn(4, 20) * 5).requires_grad_()
    before = leaf.detach().clone()
    non_leaf = leaf * 1
    ClampedSwiGLUFunction.apply(non_leaf, ALPHA, LIMIT).sum().backward()
    torch.testing.assert_close(non_leaf.detach(), leaf.grad)  # the gradient was written into gate_up
    leaf.grad = None
    ClampedSwiGLUFunction.apply(leaf, ALPHA, LIMIT).sum().backward()
    assert torch.equal(leaf.detach(), before)


def test_clamped_swiglu_on_cpu_is_the_reference():
    gate_up = torch.randn(5, 12).to(torch.bfloat16) * 9
    assert torch.equal(clamped_swiglu(gate_up, ALPHA, LIMIT), clamped_swiglu_reference(gate_up, ALPHA, LIMIT))


@pytest.mark.gpu
def test_clamped_swiglu_gpu_gpt_oss_experts_size():
    # 8192 tokens x top-4 experts, intermediate 2880 (interleaved: 5760 columns)
    torch.manual_seed(0)
    gate_up = (torch.randn(32768, 5760, device="cuda") * 4).to(torch.bfloat16)
    dout = torch.randn(32768, 2880, device="cuda").to(torch.bfloat16)
    out, grad = _run(lambda t: clamped_swiglu(t, ALPHA, LIMIT), gate_up, dout)
    assert_close(out, clamped_swiglu_reference(gate_up, ALPHA, LIMIT))
    _, grad_ref = _run(lambda t: clamped_swiglu_reference(t, ALPHA, LIMIT), gate_up.float(), dout.float())
    assert_close(grad, grad_ref, torch.bfloat16)
