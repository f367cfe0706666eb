"""SwiGLU / GeGLU Triton kernels (interpreted on CPU) against PyTorch, forward and grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from desktune.kernels.swiglu import GLUFunction, geglu, geglu_reference, swiglu, swiglu_reference

_REFERENCES = {
    "silu": swiglu_reference,
    "gelu_tanh": lambda g, u: geglu_reference(g, u, "tanh"),
    "gelu": lambda g, u: geglu_reference(g, u, "none"),
}


def _inputs(shape, dtype, seed=0, device="cpu"):
    torch.manual_seed(seed)
    gate = (torch.randn(shape, device=device) * 3).to(dtype)  # wide range: both tails of the activation
    up = torch.randn(shape, device=device).to(dtype)
    dh = torch.randn(shape, device=device).to(dtype)
    return gate, up, dh


def _run(fn, gate, up, dh):
    g = gate.clone().requires_grad_()
    u = up.clone().requires_grad_()
    h = fn(g, u)
    h.backward(dh)
    return h.detach(), g.grad, u.grad


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid's exp(-g) -> inf -> 0, as intended
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_glu_matches_reference_forward_and_grads(activation, dtype):
    gate, up, dh = _inputs((3, 37, 130), dtype)
    h, dg, du = _run(lambda g, u: GLUFunction.apply(g, u, activation), gate, up, dh)
    ref = _REFERENCES[activation]
    assert h.dtype == dg.dtype == du.dtype == dtype
    assert_close(h, ref(gate, up))
    # Gradients against the float32 math on the same values (bf16 autograd rounds each step).
    _, dg_ref, du_ref = _run(ref, gate.float(), up.float(), dh.float())
    assert_close(dg, dg_ref, dtype)
    assert_close(du, du_ref, dtype)


def test_glu_backward_overwrites_saved_activations_in_place():
    gate, up, dh = _inputs((5, 33), torch.float32, seed=1)
    g0, u0 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g, u = g0 * 1, u0 * 1  # non-leaf activations, as a projection would produce
    h = GLUFunction.apply(g, u, "silu")
    h.backward(dh)
    # dg/du were written into g's and u's storage: no new activation-sized buffers.
    torch.testing.assert_close(g.detach(), g0.grad)
    torch.testing.assert_close(u.detach(), u0.grad)
    _, dg_ref, du_ref = _run(swiglu_reference, gate, up, dh)
    assert_close(g0.grad, dg_ref)
    assert_close(u0.grad, du_ref)


def test_glu_leaves_leaf_inputs_untouched():
    gate, up, dh = _inputs((4, 21), torch.float32, seed=2)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    GLUFunction.apply(g, u, "gelu").backward(dh)
    assert torch.equal(g.detach(), gate) and torch.equal(u.detach(), up)


def test_glu_non_contiguous_inputs():
    gate, up, dh = _inputs((3, 40), torch.float32, seed=3)
    g, u = gate.t(), up.t()  # [40, 3] views
    h = GLUFunction.apply(g, u, "silu")
    assert_close(h, swiglu_reference(g, u))


def test_public_ops_on_cpu_are_the_references():
    gate, up, _ = _inputs((2, 9), torch.bfloat16, seed=4)
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)
    assert torch.equal(geglu(gate, up, "none"), F.gelu(gate) * up)
    assert torch.equal(geglu(gate, up), F.gelu(gate, approximate="tanh") * up)
    with pytest.raises(ValueError, match="approximate"):
        geglu(gate, up, "erf")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_glu_gpu_real_size(activation):
    gate, up, dh = _inputs((8192, 14336), torch.bfloat16, device="cuda")
    public = {"silu": swiglu, "gelu_tanh": geglu, "gelu": lambda g, u: geglu(g, u, "none")}[activation]
    h, dg, du = _run(public, gate, up, dh)
    assert_close(h, _REFERENCES[activation](gate, up))
    _, dg_ref, du_ref = _run(_REFERENCES[activation], gate.float(), up.float(), dh.float())
    assert_close(dg, dg_ref, torch.bfloat16)
    assert_close(du, du_ref, torch.bfloat16)
