"""Tiny in-memory models for the memory tests (no files, float32 or float64)."""

from __future__ import annotations

import torch


def tiny_llama(layers: int = 3, hidden: int = 32, intermediate: int = 80, dtype=torch.float32, seed: int = 0,
               attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, attention_dropout=0.0)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to(dtype).train()


def add_lora(model, r: int = 4):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
