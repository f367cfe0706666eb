"""from_pretrained on tiny random models of every family, in 16-bit and 4-bit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from desktune import FastLanguageModel
from desktune.fixtures.tiny_models import TINY_CONFIGS
from desktune.models.registry import FAMILIES, supported_model_types

FAMILY_TYPES = sorted(TINY_CONFIGS)


def test_every_registered_family_has_a_tiny_fixture():
    # gpt-oss (MoE, own loader) has its fixture and tests apart: fixtures/tiny_gpt_oss.py, tests/models/
    assert sorted(supported_model_types()) == sorted(FAMILY_TYPES + ["gpt_oss"])


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_16bit_load_patches_and_matches_transformers(tiny_model_dir, model_type):
    folder = tiny_model_dir(model_type)
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=False)
    assert model.dtype == torch.float32  # dtype=None on the CPU
    assert model.max_seq_length == 64 and tokenizer.model_max_length == 64
    family = next(f for f in FAMILIES if model_type in f.model_types)
    norms = [m for m in model.modules() if type(m).__name__ in family.norm_classes]
    assert model._desktune_patches["rmsnorm"] == len(norms) > 0
    assert all("forward" in vars(m) for m in norms)  # patched on the instance, not the class
    assert model._desktune_patches["gated_mlp"] == model.config.num_hidden_layers

    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    batch = tokenizer(["Reverse the letters of the word: apple", "Add 2 and 3"], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        ours = model(**batch, labels=labels)
        ref = plain(**batch, labels=labels)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_patching_leaves_other_instances_alone(tiny_model_dir):
    folder = tiny_model_dir("llama")
    plain = AutoModelForCausalLM.from_pretrained(folder)
    FastLanguageModel.from_pretrained(folder, load_in_4bit=False)
    assert not hasattr(plain, "_desktune_patches")
    assert "forward" not in vars(plain) and "forward" not in vars(plain.model.norm)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_4bit_load_is_nf4_double_quant(tiny_model_dir, model_type):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir(model_type), max_seq_length=64, load_in_4bit=True)
    proj = model.model.layers[0].mlp.gate_proj
    assert type(proj).__name__ == "Linear4bit"
    state = proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantisation
    assert type(model.lm_head).__name__ == "Linear"  # the head stays 16/32-bit
    assert all(not p.requires_grad for p in model.parameters())


def test_8bit_load(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False, load_in_8bit=True)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"


def test_full_finetuning_trains_every_weight_unquantised(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("qwen3"), load_in_4bit=True, full_finetuning=True)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear"
    assert all(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing


def test_sdpa_models_switch_to_varlen_attention_softcapped_ones_keep_eager(tiny_model_dir):
    from desktune.models.attention import NAME

    llama, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False)
    gemma2, _ = FastLanguageModel.from_pretrained(tiny_model_dir("gemma2"), load_in_4bit=False)
    assert llama.config._attn_implementation == NAME
    assert gemma2.config._attn_implementation == "eager"  # attention soft-capping needs the eager path
