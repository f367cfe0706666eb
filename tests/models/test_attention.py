"""desktune's varlen attention: example boundaries from position_ids, and on CPU
(no varlen kernel) the exact SDPA path, packed rows included."""

from __future__ import annotations

import copy

import pytest
import torch

from desktune.data.packing import PaddingFreeCollator
from desktune.models import attention


def _tiny(attn="sdpa", sliding=None):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=sliding,
                           max_position_embeddings=256, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = attn
    return MistralForCausalLM(config).to(torch.float64).train()


def test_cu_seq_lens_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = attention.cu_seq_lens_from_position_ids(positions, batch=1)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    # Unpacked batch of 2 rows: each row is one sequence, even though row 2 continues 3 -> 4.
    cu, longest = attention.cu_seq_lens_from_position_ids(torch.arange(4).unsqueeze(0), batch=2)
    assert cu.tolist() == [0, 4, 8] and longest == 4


def test_boundaries_prefer_collator_and_cache_per_forward():
    positions = torch.tensor([[0, 1, 0, 1, 2]])
    cu, longest = attention._boundaries({"position_ids": positions}, 1, 5, "cpu")
    assert cu.tolist() == [0, 2, 5] and longest == 3
    assert positions._desktune_cu[1] is cu  # the next layer reuses it
    given = torch.tensor([0, 1, 5], dtype=torch.int32)
    cu, longest = attention._boundaries({"cu_seq_lens_q": given, "max_length_q": 4, "position_ids": positions}, 1,
                                        5, "cpu")
    assert cu.tolist() == [0, 1, 5] and longest == 4


@pytest.mark.parametrize("sliding", [None, 4])
def test_varlen_model_on_cpu_equals_sdpa_packed_and_padded(sliding):
    sdpa = _tiny(sliding=sliding)
    ours = copy.deepcopy(sdpa)
    assert attention.use_varlen_attention(ours)
    assert ours.config._attn_implementation == attention.NAME and sdpa.config._attn_implementation == "sdpa"
    examples = [{"input_ids": list(range(3 + i, 10 + 2 * i))} for i in range(3)]
    batch = PaddingFreeCollator()(examples)
    out_ref = sdpa(**batch)
    out = ours(**batch)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=0, atol=0)
    out.loss.backward()
    out_ref.loss.backward()
    for a, b in zip(ours.parameters(), sdpa.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                               sdpa(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_only_sdpa_models_switch():
    eager = _tiny(attn="eager")
    assert not attention.use_varlen_attention(eager)
    assert eager.config._attn_implementation == "eager"


def test_mask_function_builds_sdpa_mask_on_cpu():
    mask = attention.varlen_mask(1, 4, 4, attention_mask=torch.tensor([[1, 1, 1, 0]], dtype=torch.bool),
                                 device="cpu")
    assert mask is not None and mask.shape == (1, 1, 4, 4) and not mask[0, 0, 3, 3]


def _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False):
    """Stand-in for torch's CUDA-only varlen_attn: SDPA per example with the window as a mask."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    left, right = window_size
    assert right == 0, "desktune must ask for causal attention"
    outs = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        assert end - start <= max_q
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        if enable_gqa:
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
            v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
        i = torch.arange(end - start)
        allowed = i[None, :] <= i[:, None]
        if left >= 0:
            allowed &= i[None, :] >= i[:, None] - left
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
                    .transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("sliding", [None, 4])
def test_varlen_path_plumbing_against_sdpa(monkeypatch, sliding):
    """The GPU branch (shapes, GQA, causal/sliding window, boundaries) run on CPU with
    a reference kernel in place of torch's CUDA varlen_attn: equal to SDPA's masks."""
    monkeypatch.setattr(attention, "_varlen_attn", lambda: _reference_varlen)
    monkeypatch.setattr(attention, "varlen_supported", lambda device: True)
    attention._varlen_params.cache_clear()
    calls = []
    original = attention._boundaries
    monkeypatch.setattr(attention, "_boundaries", lambda *a: calls.append(1) or original(*a))
    try:
        sdpa = _tiny(sliding=sliding)
        ours = copy.deepcopy(sdpa)
        assert attention.use_varlen_attention(ours)
        examples = [{"input_ids": list(range(3 + i, 10 + 3 * i))} for i in range(3)]
        packed = PaddingFreeCollator()(examples)
        ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(2))
        for batch in (packed, {"input_ids": ids, "labels": ids}, {k: v for k, v in packed.items()
                                                                  if not k.startswith(("cu_", "max_"))}):
            calls.clear()
            ref, out = sdpa(**batch), ours(**batch)
            assert len(calls) == 2  # both layers took the varlen branch
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-10)
            ref.loss.backward()
            out.loss.backward()
        for a, b in zip(ours.parameters(), sdpa.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)
    finally:
        attention._varlen_params.cache_clear()


def _reference_varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                                 return_aux=None, scale=None):
    """torch 2.10's signature: is_causal, no window, no GQA (k/v must match q's heads)."""
    assert is_causal and key.shape[1] == query.shape[1]
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=(-1, 0))


def test_varlen_path_with_torch_2_10_signature(monkeypatch):
    monkeypatch.setattr(attention, "_varlen_attn", lambda: _reference_varlen_torch_2_10)
    monkeypatch.setattr(attention, "varlen_supported", lambda device: True)
    attention._varlen_params.cache_clear()
    try:
        assert not attention.use_varlen_attention(_tiny(sliding=4))  # no window argument: stays sdpa
        sdpa = _tiny()
        ours = copy.deepcopy(sdpa)
        assert attention.use_varlen_attention(ours)
        batch = PaddingFreeCollator()([{"input_ids": list(range(2, 9))}, {"input_ids": list(range(5, 17))}])
        torch.testing.assert_close(ours(**batch).loss, sdpa(**batch).loss, rtol=1e-10, atol=1e-10)
    finally:
        attention._varlen_params.cache_clear()
