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

On CUDA the per-chunk softmax / loss / dz is one Triton kernel per row (Liger's scheme):
the chunk's logits stay in the hidden dtype (the same values `(h @ W^T).float()` sees),
one pass over the row takes the online max and sum of exp(cap(z)), a second pass
overwrites the logits with dz in place, so a chunk costs one [chunk, V] buffer, reused by
every chunk. Saved for backward: dh [N, H] and dW (only when W needs a gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from desktune.kernels._triton import kernel, next_power_of_2, tl, use_triton


@kernel
def _cross_entropy_rows_kernel(
    LOGITS,  # [rows, V], overwritten with dz when COMPUTE_GRAD
    LABELS,  # [rows] int64
    LOSS,  # [rows] float32 out: lse - cap(z)[label], 0 for ignored rows
    DIVISOR,  # [1] float32: the loss normaliser (dz is divided by it)
    logits_row_stride, n_cols, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,  # columns per step of the two passes over a row
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * logits_row_stride
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK)
    # pass 1: online max / sum of exp over the row
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:  # s * tanh(z / s); padding lanes must stay -inf, not -s
            z = tl.where(mask, softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    keep = label != ignore_index
    safe_label = tl.where(keep, label, 0)
    z_label = tl.load(base + safe_label).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * (2.0 * tl.sigmoid(2.0 * z_label / softcap) - 1.0)
    tl.store(LOSS + row, tl.where(keep, lse - z_label, 0.0))
    if COMPUTE_GRAD:
        # pass 2: dz = (softmax - onehot) * cap' / divisor, written over the logits
        scale = tl.where(keep, 1.0 / tl.load(DIVISOR), 0.0)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
                z = softcap * t
            g = tl.exp(z - lse) - tl.where(start + cols == safe_label, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(base + start + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)

# Float32 logits held at once per chunk: 2^26 elements = 256 MiB, i.e. 512 tokens of
# a 128k vocabulary. Large enough that the chunk GEMMs stay efficient.
_LOGITS_ELEMENTS_PER_CHUNK = 1 << 26


def token_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Tokens per chunk: a power of two whose float32 logits fit the chunk budget."""
    fit = max(1, _LOGITS_ELEMENTS_PER_CHUNK // max(vocab_size, 1))
    return max(1, min(n_tokens, 1 << int(math.log2(fit))))


def _row_block(vocab_size: int, device: torch.device) -> int:
    # 4096 columns x 8 warps: ptxas gives the softcap + gradient variant 80 registers for
    # sm_90, no spills (3 programs per SM); 16384 columns needed 255 registers, 32768 x 32
    # warps spilled (tests/kernels/test_kernel_compile.py compiles these).
    return min(4096, next_power_of_2(vocab_size))


def _chunk_loss_and_grad_triton(logits, labels, divisor, ignore_index, softcap, compute_grad):
    """Sum of the chunk's losses; when compute_grad, logits is overwritten with dz."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block = _row_block(vocab, logits.device)
    _cross_entropy_rows_kernel[(rows,)](
        logits, labels, loss, divisor.reshape(1), logits.stride(0), vocab, ignore_index, float(softcap or 1.0),
        HAS_SOFTCAP=bool(softcap), COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=8 if block >= 4096 else 4,
    )
    return loss.sum(), logits


def _chunk_loss_and_grad_torch(logits, labels, divisor, ignore_index, softcap, compute_grad):
    """The same in PyTorch, in float32 (for CPU tensors and machines without triton)."""
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    mask = labels != ignore_index
    safe_y = torch.where(mask, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, safe_y.unsqueeze(1)).squeeze(1)
    loss = ((lse - target) * mask).sum()
    if not compute_grad:
        return loss, None
    dz = torch.softmax(logits, dim=-1)
    dz.scatter_add_(1, safe_y.unsqueeze(1), torch.full_like(target, -1.0).unsqueeze(1))
    dz *= (mask.float() / divisor).unsqueeze(1)
    if softcap:
        dz *= 1.0 - (logits / softcap).pow(2)
    return loss, dz


def _divisor(labels: torch.Tensor, ignore_index: int, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=labels.device, dtype=torch.float32)
    return (labels != ignore_index).sum().clamp(min=1).float()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, num_items_in_batch, chunk_size, use_kernel):
        n_tokens = hidden.shape[0]
        chunk = chunk_size or token_chunk_size(n_tokens, weight.shape[0])
        divisor = _divisor(labels, ignore_index, num_items_in_batch)
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_dh else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_fn = _chunk_loss_and_grad_triton if use_kernel else _chunk_loss_and_grad_torch
        # One logits buffer in the hidden dtype, reused by every chunk (the kernel path).
        buffer = torch.empty((min(chunk, n_tokens), weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n_tokens, chunk):
            h = hidden[start : start + chunk]
            logits = torch.mm(h, weight.t(), out=buffer[: h.shape[0]])
            chunk_loss, dz = chunk_fn(
                logits, labels[start : start + chunk], divisor, ignore_index, softcap, need_dh or need_dw
            )
            total += chunk_loss
            if dz is None:
                continue
            dz = dz.to(hidden.dtype)
            if need_dh:
                torch.mm(dz, weight, out=grad_hidden[start : start + chunk])
            if need_dw:
                grad_weight += (dz.t() @ h).float()
            del dz
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
        return dh, dw, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch=None,
    chunk_size: int | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` without full logits.

    hidden [N, H], weight [V, H], labels [N] (shift them before calling). use_kernel:
    None picks the Triton kernel for CUDA tensors; True forces it (CPU tensors then run
    in the Triton interpreter, for tests), False forces the PyTorch chunk math.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens but labels has {labels.shape[0]}")
    if use_kernel is None:
        use_kernel = use_triton(hidden, weight)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # What `lm_head(hidden)` does under autocast: the matmul in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    with torch.autocast(device_type, enabled=False):  # the chunk GEMMs write into preset buffers
        return _FusedLinearCrossEntropy.apply(
            hidden, weight, labels, ignore_index, softcap, num_items_in_batch, chunk_size, use_kernel
        )


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
