"""Rotary position embedding applied to q and k in place (transformers' rotate_half form).

q [B, Hq, L, D], k [B, Hk, L, D] (any strides with unit stride on D, e.g. the transposed
views attention layers make); cos, sin [B, L, R] (or [1, L, R] / [L, R], broadcast over the
batch) as transformers' rotary modules return them, with R = rotary_dim <= D; gpt-oss's
module returns only the first half of each ([B, L, R/2], `halved=True`). Scaling
(Llama-3, YaRN's attention factor, ...) is already folded into cos/sin, and packed sequences
only change which position each row of cos/sin holds, so the kernel needs neither.

With x1 = x[..., :R/2], x2 = x[..., R/2:R] and c1, c2, s1, s2 the same halves of cos, sin:
  forward   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2,   y[..., R:] = x[..., R:]
  backward  dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1   (the transpose; with HF's
            cos = cat(c, c), sin = cat(s, s) it is the rotation by -theta), dx[..., R:] = dy[..., R:]
Nothing is saved but cos and sin (the model's own buffers). Forward rotates q and k in
their storage; backward rotates a copy of the incoming gradient.
"""

from __future__ import annotations

import torch

from desktune.kernels._triton import kernel, next_power_of_2, owned_by_caller, tl, use_triton


@kernel
def _rope_kernel(
    X,  # [B, H, L, D] rotated in place; strides below, unit stride on D
    COS, SIN,  # [B or 1, L, R] with strides below (batch stride 0 broadcasts)
    x_stride_b, x_stride_h, x_stride_l,
    cs_stride_b, cs_stride_l,
    seq_len, n_heads, half,
    cs_second,  # offset of the second half of cos/sin: half, or 0 when they come halved
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,  # power of two >= n_heads: one program does every head of a position
    BLOCK_HALF: tl.constexpr,  # power of two >= R / 2
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    pos = pid % seq_len
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    cs = COS + b * cs_stride_b + pos * cs_stride_l
    sn = SIN + b * cs_stride_b + pos * cs_stride_l
    c1 = tl.load(cs + d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cs + cs_second + d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sn + d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sn + cs_second + d, mask=d_mask, other=0.0).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < n_heads) & d_mask[None, :]
    ptr = X + b * x_stride_b + pos * x_stride_l + h[:, None] * x_stride_h + d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1[None, :] + x2 * s2[None, :]
        y2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(ptr, y1.to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + half, y2.to(X.dtype.element_ty), mask=mask)


def _as_blr(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


def _check(x: torch.Tensor, cos: torch.Tensor, name: str, halved: bool) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got shape {tuple(x.shape)}")
    rot = cos.shape[-1] * (2 if halved else 1)
    if rot % 2 or rot > x.shape[-1]:
        raise ValueError(f"rotary dim {rot} (cos/sin last dim) must be even and <= head_dim {x.shape[-1]}")
    if cos.shape[-2] != x.shape[2] or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"cos/sin {tuple(cos.shape)} do not match {name} {tuple(x.shape)}: expected [batch or 1, seq, rotary_dim]"
        )


def rope_rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False,
                 halved: bool = False) -> torch.Tensor:
    """Rotates x [B, H, L, D] in place by cos/sin [B|1, L, R] ([B|1, L, R/2] when halved);
    backward=True applies the transpose."""
    cos, sin = _as_blr(cos), _as_blr(sin)
    _check(x, cos, "x", halved)
    if x.stride(-1) != 1:
        raise ValueError("rope_rotate_ needs unit stride on head_dim to rotate in place")
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    batch, heads, seq, _ = x.shape
    cs_stride_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    half = cos.shape[-1] if halved else cos.shape[-1] // 2
    _rope_kernel[(batch * seq,)](
        x, cos, sin, x.stride(0), x.stride(1), x.stride(2), cs_stride_b, cos.stride(1),
        seq, heads, half, 0 if halved else half,
        BACKWARD=backward, BLOCK_H=next_power_of_2(heads), BLOCK_HALF=next_power_of_2(half),
    )
    return x


class RoPEFunction(torch.autograd.Function):
    """Rotates one of q / k in place (marked dirty) and returns it; CPU tensors are interpreted.

    One tensor per Function: autograd cannot mark two dirty views in one node.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, halved=False):
        rope_rotate_(x, cos, sin, halved=halved)
        ctx.mark_dirty(x)
        ctx.halved = halved
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # The incoming gradient may be shared with other consumers: rotate a copy.
        return rope_rotate_(_writable(dy), cos, sin, backward=True, halved=ctx.halved), None, None, None


def _writable(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    return out if out.stride(-1) == 1 else out.contiguous()


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, halved: bool = False):
    """(q, k) with rotary embedding applied; on CUDA q and k are rotated in their storage.

    halved: cos/sin hold only the first half of the rotary dim (gpt-oss's rotary module).
    """
    if not use_triton(q, k, cos, sin):
        return apply_rope_reference(q, k, cos, sin, halved=halved)
    # A leaf (or a view of one) is the caller's tensor and autograd forbids changing it in
    # place; a unit stride on D is required. Projection outputs and their transposed views,
    # what attention layers pass, are rotated where they are.
    if owned_by_caller(q) or q.stride(-1) != 1:
        q = q.clone(memory_format=torch.contiguous_format)
    if owned_by_caller(k) or k.stride(-1) != 1:
        k = k.clone(memory_format=torch.contiguous_format)
    return RoPEFunction.apply(q, cos, sin, halved), RoPEFunction.apply(k, cos, sin, halved)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                         halved: bool = False):
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1), with partial rotary when R < D;
    halved=True is gpt-oss's form (cos/sin of the first half only, same rotation)."""
    if halved:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    cos, sin = _as_blr(cos).unsqueeze(1), _as_blr(sin).unsqueeze(1)
    rot = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        out = x_rot * cos + _rotate_half(x_rot) * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    return rotate(q), rotate(k)
