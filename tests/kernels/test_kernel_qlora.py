"""4-bit LoRA linear (dequant + cuBLAS, fused dequant-GEMM, PyTorch) against plain autograd."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from desktune.kernels.nf4 import dequantize_4bit_reference, quantize_nf4
from desktune.kernels.nf4_matmul import nf4_matmul
from desktune.kernels.qlora import qlora_linear, qlora_linear_reference


def _quantized(out_f, in_f, dtype, nested=True, seed=0, device="cpu"):
    # bitsandbytes' layout (test_kernel_nf4 checks it against bitsandbytes); made without it
    # so these tests also run where bitsandbytes is not installed (the GPU machine).
    torch.manual_seed(seed)
    weight = (torch.randn(out_f, in_f, device=device) * 0.05).to(dtype)
    return quantize_nf4(weight, blocksize=64, compress_statistics=nested)


@pytest.mark.parametrize("in_f,aligned", [(130, None), (128, None), (192, False)])  # per-value / aligned kernel
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 tl.dot is wrong in the interpreter
def test_nf4_matmul_both_orientations_match_dense(dtype, nested, in_f, aligned):
    packed, state = _quantized(37, in_f, dtype, nested)
    dense = dequantize_4bit_reference(packed, state).float()
    x = torch.randn(45, in_f).to(dtype)
    dy = torch.randn(45, 37).to(dtype)
    y = nf4_matmul(x, packed, state, aligned=aligned)
    dx = nf4_matmul(dy, packed, state, transpose_weight=False, aligned=aligned)
    assert y.shape == (45, 37) and dx.shape == (45, in_f) and y.dtype == dtype
    # sums of in_f / 37 products: a few ulps of the result
    assert_close(y, x.float() @ dense.t(), dtype, scale=4.0)
    assert_close(dx, dy.float() @ dense, dtype, scale=4.0)
    with pytest.raises(ValueError, match="columns"):
        nf4_matmul(dy, packed, state)


def test_nf4_matmul_aligned_kernel_needs_whole_blocks():
    packed, state = _quantized(8, 130, torch.float32)
    with pytest.raises(ValueError, match="whole blocks"):
        nf4_matmul(torch.randn(2, 130), packed, state, aligned=True)


def _run(fn, x, packed, state, a, b, bias, dy):
    x, a, b = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
    y = fn(x, packed, state, a, b, 2.0, bias)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize(
    "matmul,dtype",
    [("torch", torch.float32), ("torch", torch.bfloat16), ("dequant", torch.float32), ("dequant", torch.bfloat16),
     ("fused", torch.float32), ("fused", torch.float16)],
)
def test_qlora_linear_matches_reference_forward_and_grads(matmul, dtype):
    packed, state = _quantized(37, 130, dtype)
    torch.manual_seed(1)
    x = torch.randn(3, 15, 130).to(dtype)
    a = torch.randn(8, 130) * 0.1  # PEFT keeps LoRA weights in float32
    b = torch.randn(37, 8) * 0.1
    bias = torch.randn(37).to(dtype)
    dy = torch.randn(3, 15, 37).to(dtype)
    got = _run(lambda *args: qlora_linear(*args, matmul=matmul), x, packed, state, a, b, bias, dy)
    want = _run(qlora_linear_reference, x, packed, state, a, b, bias, dy)
    assert got[0].shape == (3, 15, 37) and got[1].shape == x.shape
    assert got[2].dtype == got[3].dtype == torch.float32
    for g, w in zip(got, want):
        assert_close(g, w, dtype, scale=4.0)


@pytest.mark.parametrize("matmul", ["dequant", "fused"])
def test_qlora_linear_keeps_no_dense_weight(matmul):
    packed, state = _quantized(96, 64, torch.float32, seed=2)
    x = torch.randn(5, 64, requires_grad=True)
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(96, 4, requires_grad=True)
    y = qlora_linear(x, packed, state, a, b, 0.5, matmul=matmul)
    shapes = [tuple(t.shape) for t in y.grad_fn.saved_tensors]
    assert (96, 64) not in shapes and (64, 96) not in shapes  # only x, xa, A, B and the packed bytes
    assert tuple(y.grad_fn.saved_tensors[1].shape) == (5, 4)
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and b.grad is not None


def test_qlora_fused_never_builds_the_dense_weight():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numels.add(t.numel())
            return out

    packed, state = _quantized(96, 64, torch.float32, seed=3)
    x = torch.randn(5, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(96, 4, requires_grad=True)
    for matmul, builds_dense in (("fused", False), ("dequant", True)):
        with Sizes() as mode:
            qlora_linear(x, packed, state, a, b, 0.5, matmul=matmul).sum().backward()
        assert (96 * 64 in mode.numels) is builds_dense, matmul


def test_qlora_bias_grad_only_when_asked_and_bad_mode():
    packed, state = _quantized(16, 64, torch.float32, seed=4)
    x, a, b = torch.randn(3, 64), torch.randn(2, 64), torch.randn(16, 2)
    bias = torch.randn(16, requires_grad=True)
    qlora_linear(x, packed, state, a, b, 1.0, bias, matmul="dequant").sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((16,), 3.0))
    with pytest.raises(ValueError, match="matmul"):
        qlora_linear(x, packed, state, a, b, 1.0, matmul="cublas")


@pytest.mark.gpu
@pytest.mark.parametrize("matmul", ["dequant", "fused"])
@pytest.mark.parametrize("out_f,in_f", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_qlora_linear_gpu_llama_shapes(out_f, in_f, matmul):
    packed, state = _quantized(out_f, in_f, torch.bfloat16, device="cuda")
    torch.manual_seed(1)
    x = torch.randn(8192, in_f, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, in_f, device="cuda") * 0.01
    b = torch.randn(out_f, 16, device="cuda") * 0.01
    dy = torch.randn(8192, out_f, device="cuda", dtype=torch.bfloat16)
    got = _run(lambda *args: qlora_linear(*args, matmul=matmul), x, packed, state, a, b, None, dy)
    want = _run(qlora_linear_reference, x, packed, state, a, b, None, dy)
    for g, w in zip(got, want):
        assert_close(g, w, torch.bfloat16, scale=2.0)
