"""Saved adapters reload in plain transformers + peft; merged models give the adapter's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from desktune import FastLanguageModel
from desktune.errors import AdapterFolderConflictError


def _trained_adapter_model(folder, load_in_4bit):
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    # Move the adapters off their zero init so that merging them changes the weights.
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return FastLanguageModel.for_inference(model), tokenizer


def _logits(model, tokenizer):
    batch = tokenizer(["Translate the colour into French: green"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_adapter_reloads_in_plain_peft(tiny_model_dir, tmp_path, model_type):
    folder = tiny_model_dir(model_type)
    model, tokenizer = _trained_adapter_model(folder, load_in_4bit=False)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == folder and config["r"] == 8
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                      str(tmp_path / "adapter")).eval()
    ours = _logits(model, tokenizer)
    base = _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer)
    assert (ours - base).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(_logits(plain, tokenizer), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16bit", "4bit"])
def test_merged_model_matches_adapter_model(tiny_model_dir, tmp_path, load_in_4bit):
    folder = tiny_model_dir("llama")
    model, tokenizer = _trained_adapter_model(folder, load_in_4bit)
    model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").eos_token == tokenizer.eos_token
    # A 4-bit base is dequantised exactly as the QLoRA forward dequantises it: same logits.
    torch.testing.assert_close(_logits(merged, tokenizer), _logits(model, tokenizer), rtol=1e-4, atol=1e-4)


def test_save_method_lora_writes_adapter_and_tokenizer(tiny_model_dir, tmp_path):
    model, tokenizer = _trained_adapter_model(tiny_model_dir("qwen2"), load_in_4bit=False)
    model.save_pretrained_merged(tmp_path / "lora", tokenizer, save_method="lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "lora" / "tokenizer.json").exists()
    assert not (tmp_path / "lora" / "config.json").exists()


def test_adapter_save_refuses_a_folder_with_another_model(tiny_model_dir, tmp_path):
    model, tokenizer = _trained_adapter_model(tiny_model_dir("llama"), load_in_4bit=False)
    model.save_pretrained_merged(tmp_path / "full", tokenizer)
    before = sorted(p.name for p in (tmp_path / "full").iterdir())
    with pytest.raises(AdapterFolderConflictError, match="already holds a full model"):
        model.save_pretrained(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == before  # nothing lost or added

    other = tmp_path / "other-adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some/other-model"}))
    with pytest.raises(AdapterFolderConflictError, match="some/other-model"):
        model.save_pretrained(other)


def test_adapter_save_overwrites_its_own_adapter_atomically(tiny_model_dir, tmp_path):
    model, _ = _trained_adapter_model(tiny_model_dir("llama"), load_in_4bit=False)
    model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1.0)
    model.save_pretrained(tmp_path / "a")  # same base: allowed, replaces the files
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    first_a = next(v for k, v in sorted(saved.items()) if "lora_A" in k)
    ours = next(p for n, p in sorted(model.named_parameters()) if "lora_A" in n)
    torch.testing.assert_close(first_a, ours.detach())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp folder left behind
