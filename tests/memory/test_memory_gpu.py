"""GPU checks of offloaded checkpointing, tiled MLP, varlen attention and the planner
at real-ish sizes (bf16, thousands of tokens). Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from memory_helpers import add_lora, trainable_grads

from desktune.memory.checkpointing import apply_gradient_checkpointing
from desktune.memory.tiled_mlp import TiledMLPConfig, set_tiled_mlp
from desktune.models import attention, patches

pytestmark = pytest.mark.gpu


def _model(layers=8, hidden=1024, intermediate=3584, vocab=32000, tiled=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=65536, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).train()
    for module in model.modules():
        if type(module).__name__ == "LlamaMLP":
            patches.patch_gated_mlp(module, "silu", tiled)
    # desktune's fused loss: without it the [tokens, vocab] logits, not the layers, set the peak
    patches.patch_causal_lm_loss(model, None)
    return add_lora(model, r=16)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), trainable_grads(model)


def _peak(model, ids) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _step(model, ids)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _ids(seq, vocab=32000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, seq), generator=g).cuda()


def _assert_grads_close(a: dict, b: dict, noise: dict | None = None, tol: float = 2e-2):
    """Max error relative to each tensor's largest entry: bf16 kernels that sum in another
    order stay within `tol`; attention leaking across examples would be off by O(1)."""
    for name in a:
        scale = a[name].float().abs().max().item() + 1e-12
        err = (a[name].float() - b[name].float()).abs().max().item() / scale
        allowed = tol if noise is None else max(1e-6, 3 * noise[name])
        assert err <= allowed, (name, err, allowed)


def test_offload_equals_plain_checkpointing_2k_tokens():
    plain = _model()
    offl = copy.deepcopy(plain)
    again = copy.deepcopy(plain)
    apply_gradient_checkpointing(plain.get_base_model(), True)
    apply_gradient_checkpointing(again.get_base_model(), True)
    apply_gradient_checkpointing(offl.get_base_model(), "unsloth")
    ids = _ids(2048)
    lp, gp = _step(plain, ids)
    l2, g2 = _step(again, ids)  # run-to-run noise of the GPU kernels (atomics in attention backward)
    lo, go = _step(offl, ids)
    noise = {n: (gp[n].float() - g2[n].float()).abs().max().item() / (gp[n].float().abs().max().item() + 1e-12)
             for n in gp}
    assert torch.equal(lp, lo) or abs(lp.item() - lo.item()) <= 3 * abs(lp.item() - l2.item()) + 1e-6
    _assert_grads_close(gp, go, noise)
    stats = offl.get_base_model()._desktune_offload.stats
    assert stats.packed == 8 and stats.prefetch_hits == 7 and stats.sync_fetches == 1


def test_offload_peak_memory_stops_growing_with_layers():
    seq, hidden, layers = 8192, 1024, 16
    plain = _model(layers=layers, hidden=hidden)
    offl = copy.deepcopy(plain)
    apply_gradient_checkpointing(plain.get_base_model(), True)
    apply_gradient_checkpointing(offl.get_base_model(), "unsloth")
    ids = _ids(seq)
    _step(plain, ids), _step(offl, ids)  # warm up allocator and kernels
    peak_plain, peak_offl = _peak(plain, ids), _peak(offl, ids)
    saved_by_offload = (layers - 2) * seq * hidden * 2
    print(f"peak plain {peak_plain / 2**20:.0f} MiB, offload {peak_offl / 2**20:.0f} MiB, "
          f"expected saving {saved_by_offload / 2**20:.0f} MiB")
    assert peak_offl < peak_plain - 0.6 * saved_by_offload


def test_tiled_mlp_grads_and_memory_16k_tokens():
    tiled = _model(layers=2, tiled=TiledMLPConfig(min_tokens=1024))
    untiled = copy.deepcopy(tiled)
    assert set_tiled_mlp(untiled, None) == 2
    for model in (tiled, untiled):
        apply_gradient_checkpointing(model.get_base_model(), True)
    ids = _ids(16384)
    lt, gt = _step(tiled, ids)
    lu, gu = _step(untiled, ids)
    assert abs(lt.item() - lu.item()) < 1e-2
    _assert_grads_close(gu, gt)
    peak_tiled, peak_untiled = _peak(tiled, ids), _peak(untiled, ids)
    intermediates = 16384 * 3584 * 2 * 3
    print(f"peak tiled {peak_tiled / 2**20:.0f} MiB, untiled {peak_untiled / 2**20:.0f} MiB")
    assert peak_tiled < peak_untiled - 0.4 * intermediates


def test_varlen_attention_matches_sdpa_on_packed_rows():
    from desktune.data.packing import PaddingFreeCollator

    assert attention.varlen_supported("cuda"), "torch.nn.attention.varlen.varlen_attn missing on this torch"
    sdpa = _model(layers=2)
    ours = copy.deepcopy(sdpa)
    assert attention.use_varlen_attention(ours.get_base_model())
    lengths = [300, 1200, 57, 800, 1700]
    g = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(0, 32000, (n,), generator=g).tolist()} for n in lengths]
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in PaddingFreeCollator()(examples).items()}
    losses, grads = [], []
    for model in (sdpa, ours):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.float().item())
        grads.append(trainable_grads(model))
    assert abs(losses[0] - losses[1]) < 2e-2
    _assert_grads_close(grads[0], grads[1], tol=5e-2)  # flash varlen vs SDPA's masked kernel
    # Long unpacked row: varlen (one sequence) vs SDPA's causal flash kernel.
    ids = _ids(8192)
    with torch.no_grad():
        a = sdpa(input_ids=ids, labels=ids).loss.float().item()
        b = ours(input_ids=ids, labels=ids).loss.float().item()
    assert abs(a - b) < 2e-2


def test_planner_error_versus_measured():
    """One full step (forward, backward, AdamW) at 16k tokens against planner.peak_bytes."""
    from desktune.memory import planner

    layers, hidden, inter, seq = 8, 2048, 7168, 16384
    model = _model(layers=layers, hidden=hidden, intermediate=inter, tiled=TiledMLPConfig())
    apply_gradient_checkpointing(model.get_base_model(), "unsloth")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = _ids(seq)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    config = model.get_base_model().config
    estimate = planner.peak_bytes(config, seq, quantization="16bit", lora_rank=16) - planner.RESERVE_BYTES
    error = (estimate - measured) / measured
    print(f"planner {estimate / 2**30:.2f} GiB vs measured {measured / 2**30:.2f} GiB: error {error:+.1%}")
    assert abs(error) < 0.35
