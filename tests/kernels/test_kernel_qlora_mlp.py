"""Fused 4-bit LoRA MLP Function (interpreted on CPU) against plain autograd."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, assert_close_norm

from desktune.kernels.nf4 import quantize_nf4
from desktune.kernels.qlora_mlp import qlora_mlp, qlora_mlp_reference


def _projection(out_f, in_f, dtype, rank=4, scaling=2.0, device="cpu"):
    packed, state = quantize_nf4((torch.randn(out_f, in_f, device=device) * 0.05).to(dtype))
    a = torch.randn(rank, in_f, device=device) * 0.1
    b = torch.randn(out_f, rank, device=device) * 0.1
    return [packed, state, a, b, scaling]


def _mlp(hidden, inter, dtype, device="cpu", seed=0):
    torch.manual_seed(seed)
    return (_projection(inter, hidden, dtype, device=device), _projection(inter, hidden, dtype, device=device),
            _projection(hidden, inter, dtype, device=device))


def _run(fn, x, projections, dy):
    x = x.clone().requires_grad_()
    projections = [list(p) for p in projections]
    for p in projections:
        p[2], p[3] = p[2].clone().requires_grad_(), p[3].clone().requires_grad_()
    y = fn(x, *projections)
    y.backward(dy)
    return [y.detach(), x.grad] + [t for p in projections for t in (p[2].grad, p[3].grad)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize(
    "matmul,dtype,activation",
    [("dequant", torch.float32, "silu"), ("dequant", torch.bfloat16, "gelu_tanh"), ("fused", torch.float32, "gelu"),
     ("fused", torch.float16, "silu")],
)
def test_qlora_mlp_matches_reference_forward_and_all_grads(matmul, dtype, activation):
    projections = _mlp(40, 70, dtype)
    torch.manual_seed(1)
    x = torch.randn(2, 9, 40).to(dtype)
    dy = torch.randn(2, 9, 40).to(dtype)
    got = _run(lambda x, *p: qlora_mlp(x, *p, activation=activation, matmul=matmul), x, projections, dy)
    want = _run(lambda x, *p: qlora_mlp_reference(x, *p, activation=activation), x, projections, dy)
    assert len(got) == 8 and all(g is not None for g in got)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w, dtype, scale=4.0)


def test_qlora_mlp_saves_gate_and_up_but_not_h():
    projections = _mlp(16, 48, torch.float32, seed=2)
    x = torch.randn(7, 16, requires_grad=True)
    y = qlora_mlp(x, *projections, matmul="dequant")
    big = [tuple(t.shape) for t in y.grad_fn.saved_tensors if t.is_floating_point() and t.numel() >= 7 * 48]
    assert big == [(7, 48), (7, 48)]  # g and u; h and any dense W are gone
    y.sum().backward()
    assert x.grad is not None


def test_qlora_mlp_on_cpu_auto_is_the_reference_and_rejects_bad_activation():
    projections = _mlp(16, 24, torch.float32, seed=3)
    x = torch.randn(3, 16)
    assert torch.equal(qlora_mlp(x, *projections), qlora_mlp_reference(x, *projections))
    with pytest.raises(ValueError, match="activation"):
        qlora_mlp(x, *projections, activation="relu")


@pytest.mark.gpu
@pytest.mark.parametrize("matmul", ["dequant", "fused"])
def test_qlora_mlp_gpu_llama_size(matmul):
    projections = _mlp(4096, 14336, torch.bfloat16, device="cuda")
    torch.manual_seed(1)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    got = _run(lambda x, *p: qlora_mlp(x, *p, matmul=matmul), x, projections, dy)
    want = _run(qlora_mlp_reference, x, projections, dy)
    for g, w in zip(got, want):
        assert_close_norm(g, w, torch.bfloat16)  # two chained 4096 x 14336 GEMMs: element-wise bf16 bounds fail
