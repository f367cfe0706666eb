"""Data-parallel LoRA / QLoRA under torchrun on CPU (gloo): the notebook API and `desktune train`.

With the same global batch, N processes must train exactly what one process trains: the same
loss at every step and the same adapter at the end (up to float summation order). Only rank 0
writes (progress, metrics, checkpoints, the adapter), and a run resumes on another number of
processes.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HERE, read_result, run_single, run_torchrun, run_two_nodes
from safetensors.torch import load_file

WORKER = str(HERE / "ddp_worker.py")


def _assert_same_losses(got, want, rtol=1e-3):
    assert [s for s, _ in got] == [s for s, _ in want]
    torch.testing.assert_close(torch.tensor([l for _, l in got]), torch.tensor([l for _, l in want]), rtol=rtol, atol=0)


def _assert_same_adapter(got_dir, want_dir):
    got, want = load_file(f"{got_dir}/adapter_model.safetensors"), load_file(f"{want_dir}/adapter_model.safetensors")
    assert sorted(got) == sorted(want) and len(want) > 0
    moved = max((w.abs().max().item() for k, w in want.items() if "lora_B" in k), default=0)
    assert moved > 0.05  # the adapters trained far (lora_B starts at zero), so equality means something
    for key in want:
        # PEFT keeps these adapters in bf16: a different summation order may round a weight to the
        # neighbouring bf16 value (1-2 ulps); a wrong gradient average would be off by ~moved.
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=2**-7, atol=2**-9)


@pytest.fixture(scope="module")
def single_qlora(llama_dir, tmp_path_factory):
    """The reference: one process, batch 4, QLoRA with offloaded checkpointing."""
    out = tmp_path_factory.mktemp("single")
    run_single([WORKER, "--model", llama_dir, "--out", str(out), "--batch", "4", "--steps", "4",
                "--load-in-4bit", "--checkpointing", "unsloth"])
    return out


def test_two_process_qlora_equals_one_process(single_qlora, llama_dir, tmp_path):
    out = run_torchrun([WORKER, "--model", llama_dir, "--out", str(tmp_path), "--batch", "2", "--steps", "4",
                        "--load-in-4bit", "--checkpointing", "unsloth"])
    got, want = read_result(tmp_path), read_result(single_qlora)
    assert got["world_size"] == 2 and want["world_size"] == 1
    _assert_same_losses(got["losses"], want["losses"])
    _assert_same_adapter(tmp_path / "adapter", single_qlora / "adapter")
    # only rank 0 drew a progress bar and wrote metrics
    assert (tmp_path / "metrics-0.jsonl").is_file() and not (tmp_path / "metrics-1.jsonl").exists()
    assert len(json.loads((tmp_path / "metrics-0.jsonl").read_text().splitlines()[0])) > 1
    assert out.count("4/4 [") >= 1 and "rank 1 done" in out


def test_two_nodes_on_loopback_equal_one_process(single_qlora, llama_dir, tmp_path):
    """--nnodes 2 with c10d rendezvous: the multi-node path, two "nodes" of one process each."""
    outputs = run_two_nodes([WORKER, "--model", llama_dir, "--out", str(tmp_path), "--batch", "2", "--steps", "4",
                             "--load-in-4bit", "--checkpointing", "unsloth"])
    got = read_result(tmp_path)
    assert got["world_size"] == 2
    _assert_same_losses(got["losses"], read_result(single_qlora)["losses"])
    _assert_same_adapter(tmp_path / "adapter", single_qlora / "adapter")
    assert sum("rank 0 done" in o for o in outputs) == 1 and sum("rank 1 done" in o for o in outputs) == 1
