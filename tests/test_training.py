"""Short fine-tunes on the tiny in-repo dataset lower the loss, via SFTTrainer and a plain loop."""

from __future__ import annotations

import torch

from desktune import FastLanguageModel
from desktune.fixtures.dataset import alpaca_texts

STEPS = 30


def _model(folder, load_in_4bit):
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=256, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    return model, tokenizer


def test_plain_loop_halves_the_loss(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir("llama"), load_in_4bit=False)
    texts = alpaca_texts(tokenizer.eos_token)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(STEPS):
        rows = [texts[(step * 4 + i) % len(texts)] for i in range(4)]
        batch = tokenizer(rows, return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first / 2, losses


def test_sft_trainer_halves_the_loss(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _model(tiny_model_dir("qwen3"), load_in_4bit=True)
    dataset = Dataset.from_dict({"text": alpaca_texts(tokenizer.eos_token)})
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], max_length=256, use_cpu=True, seed=0,
        lr_scheduler_type="constant", dataset_text_field="text", bf16=False,  # CPU bf16 GEMMs are slow
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first / 2, losses
