"""Padding-free packing: no attention across examples, the same per-example loss as
unpacked / padded batches, and SFTTrainer training on packed batches."""

from __future__ import annotations

import pytest
import torch

from desktune.data.packing import PaddingFreeCollator, packed_position_ids, padding_free_is_exact, use_padding_free


def _tiny_llama(dtype=torch.float64, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    config._attn_implementation = attn
    config.use_cache = False  # as in training; the collator also passes use_cache=False
    return LlamaForCausalLM(config).to(dtype).train()


def _example(seed, n):
    return {"input_ids": torch.randint(1, 61, (n,), generator=torch.Generator().manual_seed(seed)).tolist()}


def test_collator_layout():
    batch = PaddingFreeCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}, {"input_ids": [3, 4],
                                                                                "completion_mask": [0, 1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4, -100]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 8] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 3 and "attention_mask" not in batch and batch["use_cache"] is False
    assert packed_position_ids([2, 3]).tolist() == [[0, 1, 0, 1, 2]]
    with pytest.raises(ValueError, match="no tokens"):
        PaddingFreeCollator()([{"input_ids": []}])


def _grads_of_last_example(model, first, last, packed=True):
    """Gradients of the loss of `last` when packed after `first`."""
    batch = PaddingFreeCollator()([first, last])
    n_first = len(first["input_ids"])
    batch["labels"][0, :n_first] = -100  # only the last example's loss
    if not packed:
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        batch.pop(key)  # the sdpa path reads the example boundaries from position_ids alone
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_changing_one_example_does_not_change_another_examples_gradients():
    model = _tiny_llama()
    last = _example(1, 9)
    loss_a, grads_a = _grads_of_last_example(model, _example(2, 7), last)
    loss_b, grads_b = _grads_of_last_example(model, _example(3, 7), last)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Control: the same rows without restarting positions do see the other example.
    _, leaky_a = _grads_of_last_example(model, _example(2, 7), last, packed=False)
    _, leaky_b = _grads_of_last_example(model, _example(3, 7), last, packed=False)
    assert max((a - b).abs().max().item() for a, b in zip(leaky_a, leaky_b)) > 1e-6


def _per_example_losses_packed(model, examples):
    losses = []
    for k in range(len(examples)):
        batch = PaddingFreeCollator()(examples)
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        start, end = batch["cu_seq_lens_q"][k].item(), batch["cu_seq_lens_q"][k + 1].item()
        keep[0, start:end] = True
        batch["labels"][~keep] = -100
        with torch.no_grad():
            losses.append(model(**batch).loss)
    return torch.stack(losses)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_per_example_equals_unpacked_and_padded(attn):
    model = _tiny_llama(attn=attn)
    examples = [_example(i, n) for i, n in enumerate((5, 11, 3, 8))]
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([e["input_ids"]]),
                                   labels=torch.tensor([e["input_ids"]])).loss for e in examples])
    packed = _per_example_losses_packed(model, examples)
    torch.testing.assert_close(packed, alone, rtol=2e-6, atol=1e-6)  # the loss runs in float32
    # Whole-batch loss (mean over predicted tokens) equals a right-padded batch's.
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, :len(e["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        packed_all = model(**PaddingFreeCollator()(examples)).loss
    torch.testing.assert_close(packed_all, padded, rtol=2e-6, atol=1e-6)


def test_exactness_decision():
    model = _tiny_llama()
    assert padding_free_is_exact(model)
    assert use_padding_free(model, per_device_batch_size=8)
    assert not use_padding_free(model, per_device_batch_size=1)
    model.config._attn_implementation = "some_kernel_without_masks"
    assert not padding_free_is_exact(model)


def test_sft_trainer_padding_free_with_desktune_model(tiny_model_dir, tmp_path):
    """SFTTrainer(padding_free=True) feeds the patched model packed rows; its loss on
    such a row equals the padded batch's, and training runs."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from desktune.api import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False,
                                                         max_seq_length=64, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    texts = [f"example {i} " + "word " * (3 + 5 * (i % 4)) for i in range(16)]
    dataset = Dataset.from_dict({"text": texts})
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3,
                     padding_free=True, max_length=None, report_to=[], logging_steps=1, save_strategy="no",
                     use_cpu=True, bf16=False, fp16=False, dataset_num_proc=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert (batch["position_ids"][0] == 0).sum().item() == 4
    ours = PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id)([{"input_ids": r["input_ids"]} for r in rows])
    assert torch.equal(ours["input_ids"], batch["input_ids"]) and torch.equal(ours["labels"], batch["labels"])
    model.eval()
    with torch.no_grad():
        packed_loss = model(input_ids=batch["input_ids"], labels=batch["labels"],
                            position_ids=batch["position_ids"]).loss
        padded = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt")
        labels = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
        padded_loss = model(**padded, labels=labels).loss
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    model.train()
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    # get_peft_model's default "unsloth" checkpointing offloaded each layer's input: 2 layers x 2 steps
    assert model.get_base_model()._desktune_offload.stats.packed == 4
