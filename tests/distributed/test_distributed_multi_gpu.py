"""On a machine with 2+ GPUs: FSDP2 QLoRA over two GPUs (NCCL, desktune's Triton kernels inside the
sharded layers) trains what one GPU trains. bf16 on the GPU, so the tolerances are bf16's."""

from __future__ import annotations

import pytest
import torch
from conftest import HERE, read_result, run_torchrun
from fsdp_worker import train
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]


def test_fsdp2_qlora_on_two_gpus_equals_one(llama_dir, tmp_path):
    want = train(llama_dir, single=True, load_in_4bit=True, steps=3, adapter_dir=tmp_path / "single-adapter")
    run_torchrun([str(HERE / "fsdp_worker.py"), "--model", llama_dir, "--out", str(tmp_path), "--load-in-4bit"])
    got = read_result(tmp_path)
    assert any(".base_layer.weight" in n for n in got["sharded"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=2e-2, atol=0)
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    reference = load_file(tmp_path / "single-adapter/adapter_model.safetensors")
    assert sorted(saved) == sorted(reference)
    moved = max(reference[k].abs().max().item() for k in reference if "lora_B" in k)
    assert moved > 0.05
    for key in reference:  # off by a few bf16 ulps at most, far below how far the weights moved
        assert (saved[key].float() - reference[key].float()).abs().max().item() < 0.1 * moved, key
