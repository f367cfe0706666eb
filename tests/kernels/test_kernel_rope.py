"""RoPE Triton kernel (interpreted on CPU): transformers' apply_rotary_pos_emb, in place."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from desktune.kernels.rope import RoPEFunction, apply_rope, apply_rope_reference

# Packed row 0 holds three sequences (positions restart), row 1 one sequence.
_PACKED = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])


def _cos_sin(positions, rotary_dim, dtype, theta=10000.0, attention_factor=1.0):
    """rotate_half-style cos/sin [B, L, R] as transformers' rotary modules build them."""
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / theta ** (steps / rotary_dim)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def _qk(batch, hq, hk, seq, head_dim, dtype, seed=0):
    """q, k leaves [B, L, H, D] and their [B, H, L, D] non-contiguous views, like attention's."""
    torch.manual_seed(seed)
    q0 = torch.randn(batch, seq, hq, head_dim).to(dtype).requires_grad_()
    k0 = torch.randn(batch, seq, hk, head_dim).to(dtype).requires_grad_()
    return q0, k0


def _rope_kernel(q0, k0, cos, sin):
    q, k = (q0 * 1).transpose(1, 2), (k0 * 1).transpose(1, 2)  # non-leaf, strided like attention's
    return RoPEFunction.apply(q, cos, sin), RoPEFunction.apply(k, cos, sin)


def _run(fn, q0, k0, cos, sin, dq, dk):
    q0, k0 = q0.detach().clone().requires_grad_(), k0.detach().clone().requires_grad_()
    q, k = fn(q0, k0, cos, sin)
    (q.float() * dq).sum().add((k.float() * dk).sum()).backward()
    return q.detach(), k.detach(), q0.grad, k0.grad


@pytest.mark.parametrize("rotary_dim", [16, 10])  # full and partial rotary (head_dim 16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_reference_forward_and_grads(dtype, rotary_dim):
    q0, k0 = _qk(2, 5, 3, 9, 16, dtype)
    cos, sin = _cos_sin(_PACKED, rotary_dim, dtype, attention_factor=1.1)
    dq, dk = torch.randn(2, 5, 9, 16), torch.randn(2, 3, 9, 16)
    got = _run(_rope_kernel, q0, k0, cos, sin, dq, dk)

    def reference(q0, k0, cos, sin):
        return apply_rope_reference(q0.transpose(1, 2), k0.transpose(1, 2), cos, sin)

    want = _run(reference, q0, k0, cos, sin, dq, dk)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype
        assert_close(g, w)
    if rotary_dim < 16:  # the pass-through part is untouched, its gradient passed through
        assert torch.equal(got[0][..., rotary_dim:], q0.detach().transpose(1, 2)[..., rotary_dim:])
        assert torch.equal(got[2][..., rotary_dim:].float(), dq.transpose(1, 2)[..., rotary_dim:].to(dtype).float())


def test_rope_reference_is_transformers_apply_rotary_pos_emb_with_llama3_scaling():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                         max_position_embeddings=128)
    q0, k0 = _qk(2, 4, 2, 9, 16, torch.float32, seed=1)
    cos, sin = LlamaRotaryEmbedding(config)(q0, _PACKED * 11)  # positions past the original window
    q, k = q0.detach().transpose(1, 2), k0.detach().transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    ref_q, ref_k = apply_rope_reference(q, k, cos, sin)
    assert torch.equal(ref_q, want_q) and torch.equal(ref_k, want_k)
    got_q, got_k = _rope_kernel(q0.detach(), k0.detach(), cos, sin)
    assert_close(got_q, want_q)
    assert_close(got_k, want_k)


def test_rope_packed_sequences_equal_each_sequence_alone():
    q0, k0 = _qk(1, 2, 2, 9, 8, torch.float32, seed=2)
    cos, sin = _cos_sin(_PACKED[:1], 8, torch.float32)
    packed_q, _ = _rope_kernel(q0.detach(), k0.detach(), cos, sin)
    for start, end in ((0, 3), (3, 5), (5, 9)):
        cos1, sin1 = _cos_sin(torch.arange(end - start)[None], 8, torch.float32)
        alone_q, _ = _rope_kernel(q0.detach()[:, start:end], k0.detach()[:, start:end], cos1, sin1)
        torch.testing.assert_close(packed_q[:, :, start:end], alone_q)
    # and a packed row is not the same as one long sequence
    cos_long, sin_long = _cos_sin(torch.arange(9)[None], 8, torch.float32)
    long_q, _ = _rope_kernel(q0.detach(), k0.detach(), cos_long, sin_long)
    assert not torch.allclose(long_q[:, :, 3:], packed_q[:, :, 3:])


def test_rope_rotates_in_place_and_broadcasts_cos_over_batch():
    q0, k0 = _qk(3, 2, 1, 5, 8, torch.float32, seed=3)
    q, k = (q0.detach() * 1).transpose(1, 2), (k0.detach() * 1).transpose(1, 2)
    before = q.clone()
    cos, sin = _cos_sin(torch.arange(5)[None], 8, torch.float32)  # [1, L, R]
    out_q = RoPEFunction.apply(q, cos, sin)
    assert out_q.data_ptr() == q.data_ptr()
    want_q, _ = apply_rope_reference(before, k, cos, sin)
    assert_close(out_q, want_q)


def test_public_apply_rope_on_cpu_is_the_reference():
    q0, k0 = _qk(2, 4, 2, 9, 16, torch.bfloat16, seed=4)
    cos, sin = _cos_sin(_PACKED, 16, torch.bfloat16)
    q, k = q0.detach().transpose(1, 2), k0.detach().transpose(1, 2)
    got = apply_rope(q, k, cos, sin)
    want = apply_rope_reference(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
def test_rope_gpu_real_size():
    # Llama-3.1-8B attention: 32 q heads, 8 kv heads, head_dim 128, 4 x 2048 tokens.
    torch.manual_seed(0)
    q0 = torch.randn(4, 2048, 32, 128, device="cuda", dtype=torch.bfloat16)
    k0 = torch.randn(4, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(2048, device="cuda").repeat(4, 1) % 700  # packed: restarts every 700
    cos, sin = _cos_sin(pos, 128, torch.bfloat16, theta=500000.0)
    dq, dk = torch.randn(4, 32, 2048, 128, device="cuda"), torch.randn(4, 8, 2048, 128, device="cuda")

    def public(q0, k0, cos, sin):
        return apply_rope((q0 * 1).transpose(1, 2), (k0 * 1).transpose(1, 2), cos, sin)

    def reference(q0, k0, cos, sin):
        return apply_rope_reference(q0.transpose(1, 2), k0.transpose(1, 2), cos, sin)

    for g, w in zip(_run(public, q0, k0, cos, sin, dq, dk), _run(reference, q0, k0, cos, sin, dq, dk)):
        assert_close(g, w)


def test_rope_halved_cos_sin_is_gpt_oss_apply_rotary_pos_emb():
    from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb as gpt_oss_rope

    q0, k0 = _qk(2, 4, 2, 9, 16, torch.float32, seed=5)
    cos, sin = _cos_sin(_PACKED, 16, torch.float32)
    cos_half, sin_half = cos[..., :8], sin[..., :8]  # what GptOssRotaryEmbedding returns
    q, k = q0.detach().transpose(1, 2), k0.detach().transpose(1, 2)
    want_q, want_k = gpt_oss_rope(q, k, cos_half, sin_half)
    ref_q, ref_k = apply_rope_reference(q, k, cos_half, sin_half, halved=True)
    torch.testing.assert_close(ref_q, want_q)
    torch.testing.assert_close(ref_k, want_k)
    dq, dk = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)

    def kernel(q0, k0, cos, sin):
        q, k = (q0 * 1).transpose(1, 2), (k0 * 1).transpose(1, 2)
        return RoPEFunction.apply(q, cos, sin, True), RoPEFunction.apply(k, cos, sin, True)

    def reference(q0, k0, cos, sin):
        return gpt_oss_rope(q0.transpose(1, 2), k0.transpose(1, 2), cos, sin)

    got = _run(kernel, q0, k0, cos_half, sin_half, dq, dk)
    want = _run(reference, q0, k0, cos_half, sin_half, dq, dk)
    for g, w in zip(got, want):
        assert_close(g, w)
