"""`desktune merge` and `desktune export` on a tiny model with a LoRA adapter whose B is
non-zero, so a merge that dropped the adapter would give different weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from desktune.cli.main import main

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        logits = peft_model(ids).logits
    return {"folder": folder, "base": base, "ids": ids, "logits": logits,
            "down": peft_model.get_base_model().model.layers[0].mlp.down_proj}


def test_merge_writes_a_folder_plain_transformers_loads(adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", str(adapter["folder"]), str(out), "--dtype", "f32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = merged(adapter["ids"]).logits
    torch.testing.assert_close(logits, adapter["logits"], atol=1e-4, rtol=1e-4)
    assert not (out / "adapter_config.json").exists()
    assert (out / "tokenizer.json").is_file()


def test_export_adapter_folder_to_gguf_and_modelfile(adapter, tmp_path):
    import torch

    out = tmp_path / "gguf"
    assert main(["export", str(adapter["folder"]), str(out), "-q", "f16", "--dtype", "f32", "--name", "tiny"]) == 0
    path = out / "tiny.F16.gguf"
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    down = adapter["down"]
    with torch.no_grad():
        expected = (down.get_base_layer().weight + down.get_delta_weight("default")).numpy()
    got = np.asarray(tensor.data, dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())
    assert not np.allclose(got, down.get_base_layer().weight.detach().numpy(), atol=1e-3)  # the adapter is in
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.F16.gguf\n") and 'PARAMETER stop "<|eot_id|>"' in modelfile
    assert not [p for p in out.iterdir() if p.name.startswith(".merged-")]  # temporary merge cleaned up


def test_export_merged_folder_names_files_after_it(tiny_model_dir, tmp_path, capsys):
    folder = Path(tiny_model_dir("qwen3"))
    assert main(["export", str(folder), str(tmp_path), "--no-modelfile"]) == 0
    path = tmp_path / f"{folder.name}.Q8_0.gguf"
    assert path.is_file() and not (tmp_path / "Modelfile").exists()
    assert f"wrote {path}" in capsys.readouterr().out
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the fixture's plain ByteLevel split


def test_export_rejects_unknown_method_before_loading(tmp_path):
    from desktune.errors import GGUFExportError

    with pytest.raises(GGUFExportError, match="unknown quantization_method 'q9'"):
        main(["export", str(tmp_path), str(tmp_path / "out"), "-q", "q9"])
