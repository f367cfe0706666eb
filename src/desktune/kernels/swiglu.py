"""Gated MLP activations: h = act(g) * u with act = silu (SwiGLU) or gelu (GeGLU).

Forward:  h = act(g) * u, computed in float32 and rounded once to the input dtype.
Backward: du = dh * act(g),  dg = dh * u * act'(g), with
  silu'(g)          = s * (1 + g * (1 - s)),                      s = sigmoid(g)
  gelu_exact'(g)    = Phi(g) + g * phi(g),                        Phi/phi = normal cdf/pdf
  gelu_tanh'(g)     = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * c * (1 + 3 * 0.044715 * g^2),
                      t = tanh(c * (g + 0.044715 * g^3)), c = sqrt(2 / pi)
Saved for backward: g and u only. Backward is in place (like Unsloth): it overwrites the
saved g and u buffers with dg and du, so no new activation-sized tensors are allocated.
This is safe in an MLP, where g and u are projection outputs that nothing else reads in
backward; leaf tensors and non-contiguous inputs are copied first (the copies get
overwritten), any other input must not be read after backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from desktune.kernels._triton import cdiv, kernel, owned_by_caller, tl, use_triton

_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@kernel
def _glu_forward_kernel(
    G, U, H,
    n_elements,
    ACT: tl.constexpr,  # 0 silu, 1 gelu (tanh approximation), 2 gelu (exact erf)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, without libdevice
        a = 0.5 * g * (1.0 + t)
    else:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=mask)


@kernel
def _glu_backward_kernel(
    DH, G, U,  # G and U are overwritten in place with dg and du
    n_elements,
    ACT: tl.constexpr,
    STORE_H: tl.constexpr,  # also overwrite DH with h = act(g) * u (the fused LoRA MLP needs it)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    tl.store(G + offs, (dh * u * da).to(G.dtype.element_ty), mask=mask)
    tl.store(U + offs, (dh * a).to(U.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(DH + offs, (a * u).to(DH.dtype.element_ty), mask=mask)


def _block(n_elements: int) -> int:
    # Element-wise and memory bound: 1024 elements (4 warps x 8 per thread) is where
    # Liger/Unsloth's GLU kernels saturate bandwidth; the interpreter prefers fewer programs.
    return 1024


def _activation(kind: str) -> int:
    if kind not in _ACTIVATIONS:
        raise ValueError(f"unknown GLU activation {kind!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[kind]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """h = act(gate) * up for gate/up of the same shape and dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    gate, up = _flat(gate), _flat(up)
    h = torch.empty_like(gate)
    n = gate.numel()
    block = _block(n)
    _glu_forward_kernel[(cdiv(n, block),)](gate, up, h, n, ACT=_activation(activation), BLOCK=block)
    return h


def glu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu",
                 store_h: bool = False):
    """Returns (dgate, dup), written into gate's and up's storage (both must be contiguous).

    store_h: also overwrite dh (then it must be contiguous) with the forward output h.
    """
    if not (gate.is_contiguous() and up.is_contiguous()) or (store_h and not dh.is_contiguous()):
        raise ValueError("glu_backward writes its outputs in place: pass contiguous tensors")
    dh = _flat(dh)
    n = gate.numel()
    block = _block(n)
    _glu_backward_kernel[(cdiv(n, block),)](
        dh, gate, up, n, ACT=_activation(activation), STORE_H=store_h, BLOCK=block
    )
    return gate, up


class GLUFunction(torch.autograd.Function):
    """Triton GLU on any device (CPU tensors run in the Triton interpreter); in-place backward."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        # A leaf (a user's tensor, a parameter) or a view of one is never overwritten.
        gate = gate.clone() if owned_by_caller(gate) else _flat(gate)
        up = up.clone() if owned_by_caller(up) else _flat(up)
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        return glu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dgate, dup = glu_backward(dh, gate, up, ctx.activation)
        return dgate, dup, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; the Triton kernel on CUDA, PyTorch's math elsewhere."""
    if use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        return GLUFunction.apply(gate, up, "silu")
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate, approximate) * up; the Triton kernel on CUDA, PyTorch's math elsewhere."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    if use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        return GLUFunction.apply(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
    return geglu_reference(gate, up, approximate)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up
