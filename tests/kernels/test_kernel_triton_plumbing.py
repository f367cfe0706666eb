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
