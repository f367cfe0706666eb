"""model.save_pretrained_gguf on a FastLanguageModel with LoRA adapters (a 4-bit base on
CPU through bitsandbytes, and a 16-bit one on the GPU): the GGUF holds the merged weights,
named after the model, with a Modelfile next to it, and no temporary folder left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from desktune import FastLanguageModel

gguf = pytest.importorskip("gguf")


def _adapter_model(folder, load_in_4bit):
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # off the zero init, so the merge changes the weights
                param.copy_(torch.randn(param.shape, generator=gen).to(param) * 0.2)
    return model, tokenizer


def _check_export(model, tokenizer, tmp_path):
    from safetensors.torch import load_file

    files = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method=["f16", "q8_0"],
                                       file_stem="tiny", maximum_memory_usage=0.75)  # Unsloth's option: ignored
    assert [f.name for f in files] == ["tiny.F16.gguf", "tiny.Q8_0.gguf"]
    model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = merged["model.layers.1.mlp.down_proj.weight"].float().numpy()
    for f in files:
        t = next(t for t in gguf.GGUFReader(f).tensors if t.name == "blk.1.ffn_down.weight")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, atol=1e-2 * np.abs(expected).max(), rtol=0)
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.F16.gguf\n")
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["Modelfile", "tiny.F16.gguf", "tiny.Q8_0.gguf"]


def test_save_pretrained_gguf_from_a_4bit_base(tiny_model_dir, tmp_path):
    model, tokenizer = _adapter_model(tiny_model_dir("llama"), load_in_4bit=True)
    _check_export(model, tokenizer, tmp_path)


@pytest.mark.gpu
def test_save_pretrained_gguf_from_a_gpu_model(tiny_model_dir, tmp_path):
    model, tokenizer = _adapter_model(tiny_model_dir("qwen3"), load_in_4bit=False)
    assert next(model.parameters()).is_cuda
    _check_export(model, tokenizer, tmp_path)
