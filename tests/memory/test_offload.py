"""Offloaded checkpointing on CPU tensors: same losses and gradients as plain
checkpointing, inputs really go through the host copies, prefetch order, RAM check."""

from __future__ import annotations

import copy

import pytest
import torch
from memory_helpers import add_lora, tiny_llama, trainable_grads

from desktune.errors import HostMemoryError
from desktune.memory.checkpointing import apply_gradient_checkpointing
from desktune.memory.offload import OffloadedCheckpoint, piece_sizes


def _batch(seed=0, batch=2, seq=19):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    losses = []
    for b in batches:  # gradient accumulation over several micro-batches
        loss = model(**b).loss
        loss.backward()
        losses.append(loss.detach())
    return losses, trainable_grads(model)


@pytest.mark.parametrize("mode", ["offload", "unsloth"])
def test_offload_equals_plain_checkpointing_lora(mode):
    base = add_lora(tiny_llama(layers=3))
    plain, offl = base, copy.deepcopy(base)
    apply_gradient_checkpointing(plain.get_base_model(), True)
    apply_gradient_checkpointing(offl.get_base_model(), mode)
    offload = offl.get_base_model()._desktune_offload
    assert isinstance(offload, OffloadedCheckpoint) and offload.num_layers == 3
    batches = [_batch(0), _batch(1)]
    losses_p, grads_p = _loss_and_grads(plain, batches)
    losses_o, grads_o = _loss_and_grads(offl, batches)
    for a, b in zip(losses_p, losses_o):
        assert torch.equal(a, b)
    assert grads_p.keys() == grads_o.keys() and len(grads_p) == 3 * 7 * 2
    for name in grads_p:
        assert torch.equal(grads_p[name], grads_o[name]), name
    assert any(g.abs().sum() > 0 for g in grads_o.values())
    # One saved input per layer per micro-batch, each brought back once, newest first.
    assert offload.stats.packed == 6
    assert offload.stats.bytes_offloaded == 6 * 2 * 19 * 32 * 4
    assert list(offload.stats.unpack_order) == [2, 1, 0, 5, 4, 3]
    # Every layer but the last one's input was already prefetched when its recompute began.
    assert offload.stats.sync_fetches == 2 and offload.stats.prefetch_hits == 4


def test_offload_full_finetuning_grads_equal():
    plain = tiny_llama(layers=2, dtype=torch.float64)
    offl = copy.deepcopy(plain)
    apply_gradient_checkpointing(plain, True)
    apply_gradient_checkpointing(offl, "offload")
    lp, gp = _loss_and_grads(plain, [_batch(3)])
    lo, go = _loss_and_grads(offl, [_batch(3)])
    assert torch.equal(lp[0], lo[0])
    assert len(go) == len(list(offl.parameters()))
    for name in gp:
        assert torch.equal(gp[name], go[name]), name


def test_recompute_reads_the_host_copy():
    """The recompute must use the offloaded copy: corrupt it and the gradients change."""
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(5, 8, requires_grad=True)
    offload = OffloadedCheckpoint(num_layers=1)
    y = offload(lambda a: torch.tanh(layer(a)), x)
    (saved,) = [s for s in _saved_handles(offload)]
    for piece in saved.pieces:
        piece.zero_()
    y.sum().backward()
    expected_weight_grad = torch.zeros_like(layer.weight)  # d/dW of tanh(W*0 + b) is 0
    assert torch.equal(layer.weight.grad, expected_weight_grad)


def _saved_handles(offload):
    ref = offload._last
    out = []
    while ref is not None and ref() is not None:
        out.append(ref())
        ref = ref().prev
    return out


def test_backward_twice_with_retain_graph_fetches_again():
    layer = torch.nn.Linear(6, 6)
    x = torch.randn(4, 6, requires_grad=True)
    offload = OffloadedCheckpoint(num_layers=1)
    y = offload(lambda a: layer(a).pow(2), x).sum()
    y.backward(retain_graph=True)
    first = layer.weight.grad.clone()
    y.backward()
    torch.testing.assert_close(layer.weight.grad, 2 * first)
    assert list(offload.stats.unpack_order) == [0, 0]


def test_parameters_and_markers_are_not_copied():
    offload = OffloadedCheckpoint(num_layers=1)
    p = torch.nn.Parameter(torch.randn(3))
    assert offload._pack(p) is p
    ids = torch.arange(4)
    assert offload._pack(ids) is ids
    assert offload.stats.packed == 0


def test_host_ram_shortage_raises_before_copying():
    gib = 1 << 30
    # 2 layers x (1 x 4096 x 4096 fp32 = 64 MiB) = 128 MiB per step, with 1.05 GiB free of 4 GiB
    offload = OffloadedCheckpoint(num_layers=2, memory_probe=lambda: (gib + 50 * 2**20, 4 * gib))
    x = torch.zeros(1, 4096, 4096, requires_grad=True)
    with pytest.raises(HostMemoryError) as info:
        offload(lambda a: a * 2, x)
    message = str(info.value)
    assert "0.12 GiB" in message and "max_seq_length" in message and "use_gradient_checkpointing=True" in message
    assert offload.stats.packed == 0
    ok = OffloadedCheckpoint(num_layers=2, memory_probe=lambda: (8 * gib, 16 * gib))
    ok(lambda a: a * 2, x).sum().backward()
    assert ok.stats.packed == 1


def test_disable_removes_offload():
    model = tiny_llama(layers=2)
    apply_gradient_checkpointing(model, "offload")
    assert model._desktune_offload is not None
    apply_gradient_checkpointing(model, True)
    assert model._desktune_offload is None
    layers = model.model.layers
    assert all(not isinstance(layer._gradient_checkpointing_func, OffloadedCheckpoint) for layer in layers)
    apply_gradient_checkpointing(model, False)
    assert not any(layer.gradient_checkpointing for layer in layers)


def test_piece_sizes_are_powers_of_two_that_cover_the_tensor():
    mib = 1 << 20
    assert piece_sizes(547 * mib) == [512 * mib, 32 * mib, 2 * mib, mib]
    assert piece_sizes(3 * mib + 5) == [4 * mib]
    assert piece_sizes(100, unit=8) == [64, 32, 8]
    for n in (1, 7, 4096, 10**6 + 3):
        sizes = piece_sizes(n, unit=16)
        assert sum(sizes) >= n and sum(sizes) - n < 16
        assert all(s & (s - 1) == 0 for s in sizes) and len(set(sizes)) == len(sizes)


def test_tensor_split_over_many_pieces_comes_back_exactly():
    """Small pieces (16 bytes) split every layer input; the step still equals plain."""
    base = add_lora(tiny_llama(layers=2))
    plain, offl = base, copy.deepcopy(base)
    apply_gradient_checkpointing(plain.get_base_model(), True)
    apply_gradient_checkpointing(offl.get_base_model(), "offload")
    offload = offl.get_base_model()._desktune_offload
    offload.piece_unit = 16
    batch = [_batch(4, batch=1, seq=13)]  # 13 x 32 fp32 = 1664 bytes -> pieces of 1024 + 512 + 128
    lp, gp = _loss_and_grads(plain, batch)
    lo, go = _loss_and_grads(offl, batch)
    assert torch.equal(lp[0], lo[0])
    for name in gp:
        assert torch.equal(gp[name], go[name]), name


def test_offload_survives_trainer_reenabling_checkpointing():
    """Trainer / SFTTrainer(gradient_checkpointing=True) call the model's enable again
    when training starts; the offload must stay (it is the same instance after)."""
    peft_model = add_lora(tiny_llama(layers=2))
    base = peft_model.get_base_model()
    apply_gradient_checkpointing(base, "unsloth")
    offload = base._desktune_offload
    enable = getattr(peft_model, "activation_checkpointing_enable", None) or peft_model.gradient_checkpointing_enable
    enable()  # what Trainer does, through the PeftModel
    assert all(layer._gradient_checkpointing_func is offload for layer in base.model.layers)
    clone = copy.deepcopy(base)  # the copy's hook is bound to the copy, with its own offload
    assert clone._desktune_offload is not offload and clone._desktune_offload.stats.packed == 0
    assert all(layer._gradient_checkpointing_func is clone._desktune_offload for layer in clone.model.layers)
    (getattr(clone, "activation_checkpointing_enable", None) or clone.gradient_checkpointing_enable)()
    assert clone._desktune_offload is not offload
    assert all(layer._gradient_checkpointing_func is clone._desktune_offload for layer in clone.model.layers)
    apply_gradient_checkpointing(base, True)
    enable()
    assert not any(isinstance(layer._gradient_checkpointing_func, OffloadedCheckpoint) for layer in base.model.layers)
