"""Gated MLP of three 4-bit LoRA projections as one autograd Function (Unsloth's LoRA_MLP idea).

y = down(act(gate(x)) * up(x)), each projection p(z) = z W_p^T + s_p (z A_p^T) B_p^T with W_p
a frozen bitsandbytes 4-bit weight (see qlora.py for one projection and its gradients).
Forward:  g = gate(x), u = up(x), h = act(g) * u, y = down(h)
Backward: dh = dy W_d + s_d (dy B_d) A_d,  dA_d = s_d (dy B_d)^T h,  dB_d = s_d dy^T (h A_d^T)
          one GLU kernel turns (dh, g, u) into (h, dg, du) in their own buffers
          dx = dg W_g + du W_u + s_g (dg B_g) A_g + s_u (du B_u) A_u, and dA/dB of gate and up.
Saved for backward: x, g, u and the three [tokens, r] products z A^T. h is not saved (the
separate Functions would keep it as the down projection's input): backward rebuilds it
in the GLU kernel, which writes it over dh. No dense W survives a matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from desktune.kernels.nf4 import dequantize_4bit_reference
from desktune.kernels.qlora import _mode, base_matmul
from desktune.kernels.swiglu import glu_backward, glu_forward

_GLU = {"silu": "silu", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


def _project(z, packed, state, a, b, s, mode):
    """(z W^T + s (z A^T) B^T, z A^T) in z's dtype."""
    za = z @ a.to(z.dtype).t()
    y = base_matmul(z, packed, state, mode)
    return y.addmm_(za, b.to(z.dtype).t(), alpha=s), za


def _project_backward(dy, z, za, packed, state, a, b, s, mode, need_a, need_b):
    """(dz or None, dA, dB) of one projection given its output grad dy."""
    d_b = (dy.t() @ za).mul_(s).to(b.dtype) if need_b else None
    dza = (dy @ b.to(dy.dtype)).mul_(s)
    d_a = (dza.t() @ z).to(a.dtype) if need_a else None
    dz = base_matmul(dy, packed, state, mode, transpose_weight=False).addmm_(dza, a.to(dy.dtype))
    return dz, d_a, d_b


class QLoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gp, gq, ga, gb, gs, up, uq, ua, ub, us, dp, dq, da, db, ds, activation, mode):
        x2 = x.reshape(-1, x.shape[-1])
        g, ga_x = _project(x2, gp, gq, ga, gb, gs, mode)
        u, ua_x = _project(x2, up, uq, ua, ub, us, mode)
        h = glu_forward(g, u, activation)
        y, da_h = _project(h, dp, dq, da, db, ds, mode)
        del h
        ctx.states, ctx.scales = (gq, uq, dq), (gs, us, ds)
        ctx.activation, ctx.mode = activation, mode
        ctx.save_for_backward(x2, g, u, ga_x, ua_x, da_h, gp, ga, gb, up, ua, ub, dp, da, db)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, ga_x, ua_x, da_h, gp, ga, gb, up, ua, ub, dp, da, db = ctx.saved_tensors
        gq, uq, dq = ctx.states
        gs, us, ds = ctx.scales
        need = ctx.needs_input_grad
        mode = ctx.mode
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype).contiguous()
        # down: dh and dB_d need only dy; dA_d needs h, which the GLU kernel writes over dh.
        d_db = (dy2.t() @ da_h).mul_(ds).to(db.dtype) if need[14] else None
        dza = (dy2 @ db.to(dy2.dtype)).mul_(ds)
        dh = base_matmul(dy2, dp, dq, mode, transpose_weight=False).addmm_(dza, da.to(dy2.dtype))
        dg, du = glu_backward(dh, g, u, ctx.activation, store_h=True)  # dh now holds h
        d_da = (dza.t() @ dh).to(da.dtype) if need[13] else None
        del dh, dza
        dx_g, d_ga, d_gb = _project_backward(dg, x2, ga_x, gp, gq, ga, gb, gs, mode, need[3], need[4])
        dx_u, d_ua, d_ub = _project_backward(du, x2, ua_x, up, uq, ua, ub, us, mode, need[8], need[9])
        dx = dx_g.add_(dx_u).reshape(*dy.shape[:-1], x2.shape[-1]) if need[0] else None
        return (dx, None, None, d_ga, d_gb, None, None, None, d_ua, d_ub, None, None, None, d_da, d_db, None,
                None, None)


def qlora_mlp(x, gate, up, down, activation: str = "silu", *, matmul: str = "auto") -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for 4-bit LoRA projections; grads for x and every A, B.

    gate, up, down: (packed_weight, quant_state, lora_A, lora_B, scaling) each.
    activation: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU). On CPU tensors (matmul
    "auto") it is plain autograd over the PyTorch reference, as the other public ops.
    """
    if activation not in _GLU:
        raise ValueError(f"activation must be one of {sorted(_GLU)}, got {activation!r}")
    mode = _mode(matmul, x, gate[0])
    if mode == "torch":
        return qlora_mlp_reference(x, gate, up, down, activation)
    return QLoRAMLPFunction.apply(x, *gate, *up, *down, activation, mode)


def qlora_mlp_reference(x, gate, up, down, activation: str = "silu") -> torch.Tensor:
    def project(z, packed, state, a, b, s):
        w = dequantize_4bit_reference(packed, state).to(z.dtype)
        return z @ w.t() + s * ((z @ a.to(z.dtype).t()) @ b.to(z.dtype).t())

    g, u = project(x, *gate), project(x, *up)
    if activation == "silu":
        act = F.silu(g)
    else:
        act = F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")
    return project(act * u, *down)
