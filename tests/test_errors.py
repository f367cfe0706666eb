"""Bad input gets a clear error that says what to do, and loses nothing."""

from __future__ import annotations

import builtins

import pytest
import torch

from desktune import FastLanguageModel
from desktune.errors import (
    DesktuneError,
    ModelPathError,
    QuantizationUnavailableError,
    SequenceTooLongError,
    UnsupportedModelError,
)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        FastLanguageModel.from_pretrained(str(tmp_path / "no-such-model"))


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelPathError, match="holds no config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_unknown_hub_id_offline():
    with pytest.raises(ModelPathError, match="neither a local model folder nor a Hugging Face model"):
        FastLanguageModel.from_pretrained("desktune-tests/definitely-not-a-model")


@pytest.mark.parametrize("bad", [0, -5, 1.5, "2048", True])
def test_max_seq_length_must_be_positive_int(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="max_seq_length must be a positive whole number"):
        FastLanguageModel.from_pretrained(tiny_model_dir("llama"), max_seq_length=bad)


def test_sequence_longer_than_max_seq_length_raises_in_training(tiny_model_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), max_seq_length=8,
                                                         load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.train()
    ids = torch.randint(0, 100, (1, 9))
    with pytest.raises(SequenceTooLongError, match="9 tokens but the model was loaded with max_seq_length=8"):
        model(input_ids=ids, labels=ids)
    model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()  # at the limit: fine
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[1] == 9  # inference is not limited


def test_4bit_without_bitsandbytes(tiny_model_dir, monkeypatch):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(QuantizationUnavailableError, match=r"load_in_4bit=True needs bitsandbytes.*pip install"):
        FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=True)


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*llama.*qwen3"):
        FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False)


def test_unsupported_architecture_explicit_fallback(tmp_path, tiny_model_dir, caplog):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=600)).save_pretrained(tmp_path)
    llama = tiny_model_dir("llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{llama}/{name}", tmp_path / name)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, fallback_to_transformers=True)
    assert "no desktune family" in caplog.text
    assert not hasattr(model, "_desktune_patches")
    peft_model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["c_attn"])
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_wrong_target_module_names(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False)
    with pytest.raises(DesktuneError, match=r"\['qkv_proj'\] match no linear layer.*q_proj"):
        FastLanguageModel.get_peft_model(model, target_modules=["q_proj", "qkv_proj"])


def test_lora_on_full_finetuning_model(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), full_finetuning=True)
    with pytest.raises(DesktuneError, match="full_finetuning=True"):
        FastLanguageModel.get_peft_model(model)


def test_unknown_keyword_argument(tiny_model_dir):
    with pytest.raises(TypeError, match="load_in_3bit"):
        FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_3bit=True)


def test_bad_checkpointing_mode(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False)
    with pytest.raises(ValueError, match="use_gradient_checkpointing='yes'"):
        FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="yes")
