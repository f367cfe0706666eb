"""grouped_matmul / grouped_matmul_frozen against per-row products (empty groups included)."""

import pytest
import torch

from desktune.kernels.grouped_matmul import (
    grouped_matmul,
    grouped_matmul_frozen,
    grouped_matmul_reference,
)

COUNTS = [3, 0, 5, 1, 0]  # groups 1 and 4 get no rows


def _setup(dtype=torch.float32, device="cpu", k=16, m=24):
    torch.manual_seed(0)
    x = torch.randn(sum(COUNTS), k, dtype=dtype, device=device)
    w = torch.randn(len(COUNTS), k, m, dtype=dtype, device=device)
    group = torch.repeat_interleave(torch.arange(len(COUNTS), device=device), torch.tensor(COUNTS, device=device))
    ends = torch.tensor(COUNTS, device=device).cumsum(0).to(torch.int32)
    return x, w, group, ends


def _per_row(x, w, group):
    return torch.bmm(x.unsqueeze(1), w[group]).squeeze(1)


def test_grouped_matmul_values_and_grads_match_per_row_products():
    x, w, group, ends = _setup()
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y1 = grouped_matmul(x1, w1, ends, COUNTS)
    y2 = _per_row(x2, w2, group)
    torch.testing.assert_close(y1, y2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    assert w1.grad[1].abs().max() == 0 and w1.grad[4].abs().max() == 0  # empty groups get no gradient


def test_frozen_weight_is_built_in_chunks_and_again_in_backward():
    x, w, group, _ = _setup()
    calls = []

    def weight_fn(g0, g1):
        calls.append((g0, g1))
        return w[g0:g1]

    xg = x.clone().requires_grad_()
    y = grouped_matmul_frozen(xg, weight_fn, COUNTS, chunk=2)
    torch.testing.assert_close(y, _per_row(x, w, group))
    assert calls == [(0, 2), (2, 4)]  # the chunk of groups 4.. holds no rows: never built
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(xg.grad, _per_row(dy, w.transpose(1, 2), group))
    assert len(calls) == 4  # rebuilt for backward, not kept


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[37, 0, 64, 3, 0, 24], [3, 0, 5, 1, 0]])  # 128 rows (grouped dW) and 9
def test_grouped_mm_path_matches_loop_on_cuda(counts):
    from desktune.kernels import grouped_matmul as module

    torch.manual_seed(0)
    x = torch.randn(sum(counts), 64, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(len(counts), 64, 128, dtype=torch.bfloat16, device="cuda")
    group = torch.repeat_interleave(torch.arange(len(counts), device="cuda"), torch.tensor(counts, device="cuda"))
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_matmul(xg, wg, ends, counts)
    torch.testing.assert_close(y.float(), grouped_matmul_reference(x, w, counts).float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    ref_x, ref_w = x.float().requires_grad_(), w.float().requires_grad_()
    _per_row(ref_x, ref_w, group).sum().backward()
    torch.testing.assert_close(xg.grad.float(), ref_x.grad, rtol=3e-2, atol=3e-1)
    torch.testing.assert_close(wg.grad.float(), ref_w.grad, rtol=3e-2, atol=3e-1)
    assert not module._REFUSED  # torch._grouped_mm ran every product (no silent loop fallback)
