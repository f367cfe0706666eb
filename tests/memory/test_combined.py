"""All long-context pieces at once (offloaded checkpointing, tiled MLP, a packed row)
on a LoRA model: the same loss and gradients as plain checkpointing untiled."""

from __future__ import annotations

import copy

import torch
from memory_helpers import add_lora, tiny_llama, trainable_grads

from desktune.data.packing import PaddingFreeCollator
from desktune.memory.checkpointing import apply_gradient_checkpointing
from desktune.memory.tiled_mlp import TiledMLPConfig
from desktune.models import patches


def test_offload_tiled_packed_equals_plain():
    base = tiny_llama(layers=3, dtype=torch.float64)
    base.config.use_cache = False
    for module in base.modules():
        if type(module).__name__ == "LlamaMLP":
            patches.patch_gated_mlp(module, "silu", TiledMLPConfig(min_tokens=16, num_chunks=3))
    fast = add_lora(base)
    plain = copy.deepcopy(fast)
    for module in plain.modules():
        if hasattr(module, "_desktune_tiling"):
            module._desktune_tiling = None
    apply_gradient_checkpointing(fast.get_base_model(), "unsloth")
    apply_gradient_checkpointing(plain.get_base_model(), True)
    g = torch.Generator().manual_seed(5)
    examples = [{"input_ids": torch.randint(0, 97, (n,), generator=g).tolist()} for n in (7, 12, 4, 9)]
    batch = PaddingFreeCollator()(examples)
    losses = []
    for model in (plain, fast):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    gp, gf = trainable_grads(plain), trainable_grads(fast)
    assert len(gf) == 3 * 7 * 2
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-6, atol=1e-9)
    offload = fast.get_base_model()._desktune_offload
    assert offload.stats.packed == 3 and offload.stats.prefetch_hits == 2
