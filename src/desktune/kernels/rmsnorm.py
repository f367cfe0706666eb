"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w).

offset is 0 for Llama-style norms and 1 for Gemma's `(1 + w)` form. Statistics are
taken in float32 whatever the input dtype, like transformers does.
"""

from __future__ import annotations

import torch


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        # Llama casts back before scaling; Gemma scales in float32 (below).
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return rmsnorm_reference(x, weight, eps, offset)
