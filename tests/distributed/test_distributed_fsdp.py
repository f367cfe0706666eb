"""FSDP2 QLoRA on CPU (torch 2.13 runs `fully_shard` over gloo): two processes, each holding half of
every 4-bit base weight and LoRA weight, train what one unsharded process trains on the whole batch.
"""

from __future__ import annotations

import torch
from conftest import HERE, read_result, run_torchrun
from fsdp_worker import train
from safetensors.torch import load_file


def test_fsdp2_qlora_equals_one_process(llama_dir, tmp_path):
    want = train(llama_dir, single=True, load_in_4bit=True, steps=3, adapter_dir=tmp_path / "single-adapter")
    run_torchrun([str(HERE / "fsdp_worker.py"), "--model", llama_dir, "--out", str(tmp_path), "--load-in-4bit"])
    got = read_result(tmp_path)
    # every decoder layer's 4-bit base weights and LoRA weights are sharded, not replicated
    assert any(".base_layer.weight" in n and "layers.1." in n for n in got["sharded"])
    assert any("lora_A" in n for n in got["sharded"]) and any("lora_B" in n for n in got["sharded"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-4, atol=0)
    assert want["losses"][-1] < want["losses"][0]
    assert sorted(got["lora"]) == sorted(want["lora"])
    assert max(max(abs(v) for v in w) for k, w in want["lora"].items() if "lora_B" in k) > 0.05  # it trained
    for key, weights in want["lora"].items():
        torch.testing.assert_close(torch.tensor(got["lora"][key]), torch.tensor(weights), rtol=2**-7, atol=2**-9)
    # save_sharded_adapter gathers the shards into the adapter one process would have saved
    saved, reference = load_file(tmp_path / "adapter/adapter_model.safetensors"), load_file(
        tmp_path / "single-adapter/adapter_model.safetensors")
    assert sorted(saved) == sorted(reference) and len(reference) == len(want["lora"])
    for key in reference:
        torch.testing.assert_close(saved[key].float(), reference[key].float(), rtol=2**-7, atol=2**-9)
