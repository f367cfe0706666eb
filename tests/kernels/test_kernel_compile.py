"""Every Triton kernel compiles for the H200 (sm_90) and the RTX 5090 (sm_120), on CPU.

The interpreter runs the kernels' math but not Triton's compiler (types of loop-carried
values, constexpr branches, pointer arithmetic); triton's bundled ptxas compiles to a
cubin without a GPU. The argument types come from the real launchers: their launches are
recorded (not run) on small CPU tensors, with the block sizes the launchers pick for CUDA
tensors, then each distinct signature is compiled.
"""

from __future__ import annotations

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from desktune.kernels import _triton  # noqa: E402
from desktune.kernels import cross_entropy as cross_entropy_module  # noqa: E402
from desktune.kernels import nf4_matmul as nf4_matmul_module  # noqa: E402
from desktune.kernels.clamped_swiglu import clamped_swiglu_backward, clamped_swiglu_forward  # noqa: E402
from desktune.kernels.cross_entropy import _chunk_loss_and_grad_triton  # noqa: E402
from desktune.kernels.nf4 import dequantize_4bit, quantize_nf4  # noqa: E402
from desktune.kernels.nf4_matmul import nf4_matmul  # noqa: E402
from desktune.kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward  # noqa: E402
from desktune.kernels.rope import rope_rotate_  # noqa: E402
from desktune.kernels.swiglu import glu_backward, glu_forward  # noqa: E402

_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
            torch.int64: "*i64", torch.int32: "*i32"}
_OPTIONS = ("num_warps", "num_stages")


def _launches():
    """Calls every launcher the way the ops do (bf16 on the GPU); returns the recorded launches."""
    bf16 = torch.bfloat16
    x, w = torch.randn(4, 130).to(bf16), torch.randn(130).to(bf16)
    g, u = torch.randn(4, 130).to(bf16), torch.randn(4, 130).to(bf16)
    q = torch.randn(2, 5, 3, 16).to(bf16).transpose(1, 2)
    cos = torch.randn(2, 5, 16).to(bf16)
    logits, labels, divisor = torch.randn(4, 20000).to(bf16), torch.randint(0, 20000, (4,)), torch.tensor(4.0)
    yield "rmsnorm_forward", lambda: [rmsnorm_forward(x, w, 1e-6, offset) for offset in (0.0, 1.0)]
    yield "rmsnorm_backward", lambda: [rmsnorm_backward(x, x, w, torch.ones(4), offset) for offset in (0.0, 1.0)]
    yield "glu_forward", lambda: [glu_forward(g, u, act) for act in ("silu", "gelu_tanh", "gelu")]
    yield "glu_backward", lambda: [glu_backward(g.clone(), g.clone(), u.clone(), act, store_h)
                                   for act in ("silu", "gelu_tanh", "gelu") for store_h in (False, True)]
    yield "clamped_swiglu", lambda: [clamped_swiglu_forward(g, 1.702, 7.0),
                                     clamped_swiglu_backward(g[:, :65], g.clone(), 1.702, 7.0)]
    yield "rope", lambda: [rope_rotate_(q, cos, cos, backward) for backward in (False, True)]
    yield "cross_entropy", lambda: [_chunk_loss_and_grad_triton(logits, labels, divisor, -100, cap, grad)
                                    for cap in (None, 30.0) for grad in (False, True)]
    quantized = [quantize_nf4(torch.randn(64, 128).to(dt), compress_statistics=nested)
                 for dt in (bf16, torch.float16) for nested in (True, False)]
    odd = quantize_nf4(torch.randn(37, 130).to(bf16))  # not whole blocks: the per-byte kernel
    yield "dequantize_4bit", lambda: [dequantize_4bit(p, s) for p, s in (*quantized, odd)]
    yield "nf4_matmul", lambda: [nf4_matmul(torch.randn(8, n).to(bf16), p, s, t, aligned)
                                 for p, s in quantized[:2] for t, n in ((True, 128), (False, 64))
                                 for aligned in (True, False)]


def _record(monkeypatch, call):
    launches = []
    cuda = torch.device("cuda")
    tiles, row_block = nf4_matmul_module._tiles, cross_entropy_module._row_block
    aligned_tiles = nf4_matmul_module._aligned_tiles
    monkeypatch.setattr(nf4_matmul_module, "_tiles", lambda device: tiles(cuda))
    monkeypatch.setattr(nf4_matmul_module, "_aligned_tiles", lambda device, *args: aligned_tiles(cuda, *args))
    monkeypatch.setattr(cross_entropy_module, "_row_block", lambda vocab, device: row_block(vocab, cuda))

    def getitem(self, grid):
        return lambda *args, **kwargs: launches.append((self, args, kwargs))

    monkeypatch.setattr(_triton.Kernel, "__getitem__", getitem)
    call()  # the kernels do not run: outputs are uninitialised, only the launches matter
    return launches


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return _POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def _compile(kernel, args, kwargs, arch):
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    signature = {name: _arg_type(value) for name, value in zip(names, args)}
    signature.update({name: "constexpr" for name in constexprs})
    missing = [n for n in names if n not in signature]
    assert not missing, f"{kernel.__name__}: launch left out {missing}"
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    source = ASTSource(triton.jit(kernel.fn), signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


@pytest.mark.parametrize("arch", [90, 120], ids=["sm90", "sm120"])
@pytest.mark.parametrize("name,call", list(_launches()), ids=[n for n, _ in _launches()])
def test_kernel_compiles_for_gpu(monkeypatch, name, call, arch):
    launches = _record(monkeypatch, call)
    assert launches, f"{name} launched no kernel"
    seen = set()
    for kernel, args, kwargs in launches:
        key = (kernel.__name__, tuple(_arg_type(a) for a in args), tuple(sorted(kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = _compile(kernel, args, kwargs, arch)
        assert compiled.asm["cubin"], f"{kernel.__name__} {kwargs}: no cubin"
