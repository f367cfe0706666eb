"""Fused linear + cross-entropy: Triton rows kernel (interpreted on CPU) and PyTorch chunks."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tolerances import assert_close

from desktune.kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference


def _problem(n, hidden, vocab, dtype, seed=0, device="cpu", ignore_every=5):
    torch.manual_seed(seed)
    h = torch.randn(n, hidden, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5 * 2).to(dtype)
    y = torch.randint(0, vocab, (n,), device=device)
    y[::ignore_every] = -100
    return h, w, y


def _loss_and_grads(fn, h, w, y, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, y, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_matches_full_logits_reference(dtype, softcap, use_kernel):
    # 5000 > the interpreter's 4096-column step: the online max/sum runs over two steps.
    h, w, y = _problem(37, 24, 5000, dtype)
    got = _loss_and_grads(fused_linear_cross_entropy, h, w, y, softcap=softcap, chunk_size=8, use_kernel=use_kernel)
    want = _loss_and_grads(fused_linear_cross_entropy_reference, h, w, y, softcap=softcap)
    assert got[1].dtype == got[2].dtype == dtype
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)  # the loss is float32 either way
    assert_close(got[1], want[1])
    assert_close(got[2], want[2], scale=2.0)  # dW sums 37 tokens


@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "torch"])
def test_fused_ce_num_items_in_batch_and_odd_chunks(use_kernel):
    h, w, y = _problem(29, 16, 130, torch.float32, seed=1, ignore_every=3)
    kw = {"num_items_in_batch": torch.tensor(50)}  # gradient accumulation: more items than this batch has
    got = _loss_and_grads(fused_linear_cross_entropy, h, w, y, chunk_size=7, use_kernel=use_kernel, **kw)
    want = _loss_and_grads(fused_linear_cross_entropy_reference, h, w, y, **kw)
    mean = fused_linear_cross_entropy_reference(h, w, y)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[0] * 50, mean * (y != -100).sum(), rtol=1e-5, atol=1e-5)  # sum / 50
    assert_close(got[1], want[1])
    assert_close(got[2], want[2])


def test_fused_ce_all_ignored_is_zero_without_nan():
    h, w, y = _problem(6, 8, 50, torch.float32, seed=2)
    y[:] = -100
    loss, dh, dw = _loss_and_grads(fused_linear_cross_entropy, h, w, y, use_kernel=True)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_fused_ce_frozen_head_only_grads_hidden():
    h, w, y = _problem(9, 8, 70, torch.float32, seed=3)
    hg = h.clone().requires_grad_()
    fused_linear_cross_entropy(hg, w, y, use_kernel=True, chunk_size=4).backward()
    hr = h.clone().requires_grad_()
    fused_linear_cross_entropy_reference(hr, w, y).backward()
    assert_close(hg.grad, hr.grad)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any aten op returns: a CPU stand-in for peak memory."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "torch"])
def test_fused_ce_never_materialises_tokens_x_vocab(use_kernel):
    n, hidden, vocab, chunk = 96, 16, 3000, 16
    h, w, y = _problem(n, hidden, vocab, torch.float32, seed=4)
    h.requires_grad_()
    w.requires_grad_()
    with _LargestTensor() as mode:
        fused_linear_cross_entropy(h, w, y, chunk_size=chunk, use_kernel=use_kernel).backward()
    assert mode.largest <= chunk * vocab * 4  # one chunk's float32 logits, not n x vocab
    with _LargestTensor() as full:
        fused_linear_cross_entropy_reference(h.detach(), w.detach(), y)
    assert full.largest >= n * vocab * 4  # the check would see full logits


@pytest.mark.gpu
def test_fused_ce_gpu_llama_vocab_memory_and_values():
    n, hidden, vocab = 8192, 4096, 128256
    h, w, y = _problem(n, hidden, vocab, torch.bfloat16, device="cuda", ignore_every=7)
    hg = h.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(hg, w, y)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # Full bf16 logits alone would be 2.1 GB (4.2 GB in float32); chunks of 512 tokens are 131 MB.
    assert extra < 0.6 * 2**30, f"fused CE used {extra / 2**30:.2f} GiB over its inputs"
    hr = h.clone().requires_grad_()
    ref = fused_linear_cross_entropy_reference(hr, w, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-4)
    assert_close(hg.grad, hr.grad)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "torch"])
def test_fused_ce_under_autocast_computes_like_lm_head_does(use_kernel):
    h, w, y = _problem(21, 16, 90, torch.float32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(fused_linear_cross_entropy, h, w, y, chunk_size=8, use_kernel=use_kernel)
        want = _loss_and_grads(fused_linear_cross_entropy_reference, h, w, y)
    assert got[1].dtype == got[2].dtype == torch.float32  # grads of the float32 leaves
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)  # same bf16 logits
    assert_close(got[1], want[1], torch.bfloat16)
    assert_close(got[2], want[2], torch.bfloat16)
    # and without autocast a bf16 hidden meets a float32 head in the head's dtype
    loss = fused_linear_cross_entropy(h.to(torch.bfloat16), w, y, use_kernel=use_kernel)
    torch.testing.assert_close(loss, fused_linear_cross_entropy_reference(h.to(torch.bfloat16).float(), w, y))
