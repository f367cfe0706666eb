"""The per-launch interpreter choice leaves triton and the process as they were."""

from __future__ import annotations

import os

import torch

triton = __import__("pytest").importorskip("triton")


def test_interpreted_launch_restores_triton_language():
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from desktune.kernels.rmsnorm import rmsnorm_forward

    reduce_before, sum_before, sigmoid_before = tl.core.reduce, tl.sum, tl.sigmoid
    env_before = dict(os.environ)
    x = torch.randn(3, 10)
    y, rstd = rmsnorm_forward(x, torch.ones(10), 1e-6)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-6))
    # the interpreter patched triton.language for the launch and put it back
    assert tl.core.reduce is reduce_before and tl.sum is sum_before and tl.sigmoid is sigmoid_before
    assert isinstance(tl.sum, JITFunction)
    assert dict(os.environ) == env_before


def test_kernel_picks_interpreter_for_cpu_tensors():
    from triton.runtime.interpreter import InterpretedFunction

    from desktune.kernels import _triton
    from desktune.kernels.swiglu import _glu_forward_kernel

    assert isinstance(_glu_forward_kernel._for((torch.zeros(1),)), InterpretedFunction)
    assert _triton.use_triton(torch.zeros(1)) is False


def test_empty_inputs_launch_nothing_and_give_empty_results():
    from desktune.kernels.rmsnorm import RMSNormFunction
    from desktune.kernels.swiglu import GLUFunction

    x = torch.randn(0, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    y = RMSNormFunction.apply(x, w, 1e-6, 0.0)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))
    assert GLUFunction.apply(torch.randn(0, 8), torch.randn(0, 8), "silu").shape == (0, 8)


def test_without_triton_a_launch_says_what_to_install(monkeypatch):
    from desktune.kernels import _triton
    from desktune.kernels.swiglu import _glu_forward_kernel

    monkeypatch.setattr(_triton, "HAS_TRITON", False)
    with __import__("pytest").raises(RuntimeError, match="needs triton"):
        _glu_forward_kernel[(1,)](torch.zeros(4), torch.zeros(4), torch.zeros(4), 4, ACT=0, BLOCK=4)
    assert _triton.use_triton(torch.zeros(1)) is False
