"""Fused linear + cross-entropy: loss = sum_i CE(cap(h_i W^T), y_i) / divisor.

h: [N, H] hidden states (already shifted so row i predicts labels[i]); W: [V, H] the
LM head; cap(z) = s * tanh(z / s) when Gemma-2 soft-capping s is set, else z.
divisor = num_items_in_batch when given (transformers' gradient-accumulation
normalisation), else the number of labels that are not ignore_index.

Forward walks the tokens in chunks: for each chunk it builds that chunk's logits in
float32, takes its loss, and right away its gradients
    dz = (softmax(cap(z)) - onehot(y)) * cap'(z) * mask / divisor,   cap'(z) = 1 - (cap(z)/s)^2
    dh = dz W,   dW += dz^T h   (dW only when W needs a gradient, e.g. full fine-tuning)
and frees the logits. Backward only scales the stored dh / dW by the incoming
gradient, so the [N, V] logits never exist: memory is O(chunk x V), not O(N x V).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Float32 logits held at once per chunk: 2^26 elements = 256 MiB, i.e. 512 tokens of
# a 128k vocabulary. Large enough that the chunk GEMMs stay efficient.
_LOGITS_ELEMENTS_PER_CHUNK = 1 << 26


def token_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Tokens per chunk: a power of two whose float32 logits fit the chunk budget."""
    fit = max(1, _LOGITS_ELEMENTS_PER_CHUNK // max(vocab_size, 1))
    return max(1, min(n_tokens, 1 << int(math.log2(fit))))


def _divisor(labels: torch.Tensor, ignore_index: int, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=labels.device, dtype=torch.float32)
    return (labels != ignore_index).sum().clamp(min=1).float()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, num_items_in_batch, chunk_size):
        n_tokens = hidden.shape[0]
        chunk = chunk_size or token_chunk_size(n_tokens, weight.shape[0])
        divisor = _divisor(labels, ignore_index, num_items_in_batch)
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_dh else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_tokens, chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            logits = (h @ weight.t()).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            mask = y != ignore_index
            safe_y = torch.where(mask, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe_y.unsqueeze(1)).squeeze(1)
            total += ((lse - target) * mask).sum()
            if need_dh or need_dw:
                dz = torch.softmax(logits, dim=-1)
                dz.scatter_add_(1, safe_y.unsqueeze(1), torch.full_like(target, -1.0).unsqueeze(1))
                dz *= (mask.float() / divisor).unsqueeze(1)
                if softcap:
                    dz *= 1.0 - (logits / softcap).pow(2)
                del logits
                dz = dz.to(hidden.dtype)
                if need_dh:
                    grad_hidden[start : start + chunk] = dz @ weight
                if need_dw:
                    grad_weight += (dz.t() @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = None
        if grad_weight is not None:
            dw = (grad_weight * grad_output).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` without full logits.

    hidden [N, H], weight [V, H], labels [N] (shift them before calling).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens but labels has {labels.shape[0]}")
    loss = _FusedLinearCrossEntropy.apply(
        hidden, weight, labels, ignore_index, softcap, num_items_in_batch, chunk_size
    )
    return loss


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss / _divisor(labels, ignore_index, num_items_in_batch)
