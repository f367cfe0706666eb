"""Tiled MLP: same outputs and gradients as the untiled MLP, intermediates built per
chunk only, switched on by the token threshold through the registry's MLP patch."""

from __future__ import annotations

import copy

import pytest
import torch
from memory_helpers import add_lora, tiny_llama, trainable_grads

from desktune.memory.tiled_mlp import TiledMLPConfig, chunk_count, set_tiled_mlp, tiled_mlp
from desktune.models import patches


def _mlp(hidden=12, inter=40, dtype=torch.float64):
    torch.manual_seed(0)
    gate, up, down = (torch.nn.Linear(hidden, inter, dtype=dtype), torch.nn.Linear(hidden, inter, dtype=dtype),
                      torch.nn.Linear(inter, hidden, dtype=dtype))
    return gate, up, down, lambda x: down(torch.nn.functional.silu(gate(x)) * up(x))


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_tiled_equals_untiled_values_and_grads(chunks):
    gate, up, down, fn = _mlp()
    params = [*gate.parameters(), *up.parameters(), *down.parameters()]
    x = torch.randn(2, 13, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 13, 12, dtype=torch.float64)
    ref = fn(x)
    ref_grads = torch.autograd.grad(ref, [x, *params], g)
    out = tiled_mlp(fn, x, chunks, tuple(params))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out.backward(g)
    torch.testing.assert_close(x.grad, ref_grads[0], rtol=0, atol=1e-12)
    for p, r in zip(params, ref_grads[1:]):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-12)


def test_output_requires_grad_without_input_grad():
    """Frozen embeddings feed the first MLP an input with no grad: weights still learn."""
    gate, up, down, fn = _mlp()
    x = torch.randn(9, 12, dtype=torch.float64)
    out = tiled_mlp(fn, x, 4, tuple(down.parameters()))
    assert out.requires_grad
    out.sum().backward()
    expected = torch.autograd.grad(fn(x).sum(), down.weight)[0]
    torch.testing.assert_close(down.weight.grad, expected)


def test_only_one_chunk_of_intermediates_at_a_time():
    """Record the largest tensor the MLP body makes: with 4 chunks it is a quarter."""
    sizes = []
    gate, up, down, _ = _mlp(hidden=8, inter=64)

    def fn(x):
        h = torch.nn.functional.silu(gate(x)) * up(x)
        sizes.append(h.shape[0])
        return down(h)

    x = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    tiled_mlp(fn, x, 4, tuple(gate.parameters())).sum().backward()
    assert sizes == [16] * 8  # 4 chunks forward, 4 recomputed in backward, never all 64 rows


def test_chunk_count():
    cfg = TiledMLPConfig()
    assert chunk_count(100_000, 4096, 14336, cfg) == 4
    assert chunk_count(3, 64, 1000, cfg) == 3
    assert chunk_count(50, 8, 8, TiledMLPConfig(num_chunks=5)) == 5
    with pytest.raises(ValueError):
        TiledMLPConfig(min_tokens=0)


def test_model_mlp_patch_tiles_above_threshold_with_lora():
    """A LoRA model whose MLPs tile (threshold 1 token) trains like the untiled one."""
    base = tiny_llama(layers=2, dtype=torch.float64)
    for module in base.modules():
        if type(module).__name__ == "LlamaMLP":
            patches.patch_gated_mlp(module, "silu", TiledMLPConfig(min_tokens=1, num_chunks=3))
    tiled = add_lora(base)
    plain = copy.deepcopy(tiled)
    assert set_tiled_mlp(plain, None) == 2
    calls = []
    for module in tiled.modules():
        if hasattr(module, "_desktune_tiling"):
            module.gate_proj.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[:-1])))
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(0))
    for model in (plain, tiled):
        model(input_ids=ids, labels=ids).loss.backward()
    gp, gt = trainable_grads(plain), trainable_grads(tiled)
    assert len(gt) == 2 * 7 * 2
    for name in gp:
        torch.testing.assert_close(gt[name], gp[name], rtol=1e-10, atol=1e-12)
    # 2 layers x (3 forward chunks + 3 recomputed in backward), 30 tokens in chunks of 10
    assert calls == [(10,)] * 12
    with torch.no_grad():  # inference never tiles
        calls.clear()
        tiled(input_ids=ids)
        assert calls == [(2, 15)] * 2


def test_registry_patch_sets_default_tiling(tiny_model_dir):
    from desktune.api import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False, max_seq_length=64)
    tilings = [m._desktune_tiling for m in model.modules() if hasattr(m, "_desktune_tiling")]
    assert len(tilings) == 2 and all(t == TiledMLPConfig() for t in tilings)


def test_dropout_masks_are_replayed_in_backward():
    """A LoRA-style dropout inside the MLP: the backward recompute must draw the forward's masks."""
    gate, up, down, _ = _mlp()
    drop = torch.nn.Dropout(0.5)

    def fn(x):
        return down(torch.nn.functional.silu(gate(drop(x))) * up(x))

    x = torch.randn(2, 11, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 11, 12, dtype=torch.float64)
    torch.manual_seed(7)
    ref_out = torch.cat([fn(part) for part in x.reshape(-1, 12).chunk(3)]).view_as(x)  # same chunked draws
    ref = torch.autograd.grad(ref_out, [x, gate.weight], g)
    torch.manual_seed(7)
    out = tiled_mlp(fn, x, 3, tuple(gate.parameters()))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    out.backward(g)
    torch.testing.assert_close(x.grad, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(gate.weight.grad, ref[1], rtol=1e-12, atol=1e-12)
