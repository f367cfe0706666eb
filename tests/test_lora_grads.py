"""LoRA gradients through desktune equal those of plain transformers + peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from desktune import FastLanguageModel
from desktune.fixtures.tiny_models import TINY_CONFIGS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise_lora_b(model, seed=1):
    # PEFT starts B at zero, which would make every A-gradient zero and the test vacuous.
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _lora_grads(model, batch, labels):
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    grads = {n.replace("base_model.model.", ""): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _batch(tokenizer):
    batch = tokenizer(["Reverse the letters of the word: apple", "Add the two numbers: 2 and 3 is 5"],
                      return_tensors="pt", padding=True)
    return batch, batch.input_ids.masked_fill(batch.attention_mask == 0, -100)


# Every family in 16-bit; 4-bit on two of them (the quantised path does not depend on the family).
CASES = [(t, False) for t in sorted(TINY_CONFIGS)] + [("llama", True), ("gemma2", True)]


@pytest.mark.parametrize(("model_type", "four_bit"), CASES)
def test_lora_gradients_match_plain_peft(tiny_model_dir, model_type, four_bit):
    folder = tiny_model_dir(model_type)
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=four_bit)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    # 4-bit LoRA layers run desktune's fused QLoRA Function, not PEFT's forward.
    assert model.get_base_model()._desktune_patches["qlora_linear"] == (14 if four_bit else 0)
    quant = None
    if four_bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant,
                                                 device_map="cpu")
    torch.manual_seed(0)
    plain = get_peft_model(plain, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    for m in (model, plain):
        _randomise_lora_b(m)
    # Same starting adapters: A from the same seed, B from _randomise_lora_b.
    for (n1, p1), (n2, p2) in zip(sorted(model.named_parameters()), sorted(plain.named_parameters())):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)

    batch, labels = _batch(AutoTokenizer.from_pretrained(folder))
    loss, grads = _lora_grads(model, batch, labels)
    ref_loss, ref_grads = _lora_grads(plain, batch, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
