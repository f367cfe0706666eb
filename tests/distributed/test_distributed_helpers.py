"""desktune.distributed without a launcher, and with the variables torchrun sets (no processes started)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from desktune import distributed
from desktune.errors import DistributedSetupError
from desktune.log import logger

LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture
def launcher(monkeypatch):
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)

    def set_(rank, local_rank, world, local_world):
        for name, value in zip(LAUNCHER, (rank, local_rank, world, local_world)):
            monkeypatch.setenv(name, str(value))

    return set_


def test_one_process_without_a_launcher(launcher):
    info = distributed.process_info()
    assert (info.rank, info.local_rank, info.world_size, info.num_nodes) == (0, 0, 1, 1)
    assert info.is_main and not info.is_distributed and distributed.is_main_process()
    assert distributed.device_map() == "cpu" and distributed.local_device() == torch.device("cpu")
    distributed.wait_for_everyone()  # no process group: returns at once


def test_second_node_second_gpu(launcher):
    launcher(rank=3, local_rank=1, world=4, local_world=2)
    info = distributed.process_info()
    assert (info.rank, info.local_rank, info.world_size, info.num_nodes) == (3, 1, 4, 2)
    assert not info.is_main and info.is_distributed and not distributed.is_main_process()


def test_each_process_gets_its_own_gpu(launcher, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.local_device() == torch.device("cuda", 1)  # no launcher: the caller's current device
    launcher(rank=6, local_rank=2, world=8, local_world=4)
    assert distributed.local_device() == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible per process
    assert distributed.local_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DistributedSetupError, match="LOCAL_RANK 2 but only 2 GPU"):
        distributed.local_device()


def test_bad_launcher_variables_are_named(launcher, monkeypatch):
    launcher(rank=2, local_rank=0, world=2, local_world=2)
    with pytest.raises(DistributedSetupError, match="RANK=2 .*WORLD_SIZE=2"):
        distributed.process_info()
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(DistributedSetupError, match="RANK='zero'.*torchrun"):
        distributed.process_info()


def test_only_rank_zero_logs_info(launcher):
    before = logger.level
    try:
        logger.setLevel(logging.INFO)
        launcher(rank=0, local_rank=0, world=2, local_world=2)
        distributed.quiet_other_ranks()
        assert logger.getEffectiveLevel() == logging.INFO
        launcher(rank=1, local_rank=1, world=2, local_world=2)
        distributed.quiet_other_ranks()
        assert logger.getEffectiveLevel() == logging.WARNING
    finally:
        logger.setLevel(before)


def test_adapter_save_is_rank_zero_only(launcher, tiny_model_dir, tmp_path):
    from desktune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), max_seq_length=64, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    launcher(rank=1, local_rank=1, world=2, local_world=2)
    model.save_pretrained(tmp_path / "rank1")
    model.save_pretrained_merged(tmp_path / "rank1-merged", save_method="merged_16bit")
    assert not (tmp_path / "rank1").exists() and not (tmp_path / "rank1-merged").exists()
    launcher(rank=0, local_rank=0, world=2, local_world=2)
    model.save_pretrained(tmp_path / "rank0")
    assert (tmp_path / "rank0" / "adapter_config.json").is_file()


def test_decoder_layers_and_shard_model_needs_a_group(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    layers = distributed.decoder_layers(model)
    assert layers == list(model.model.layers) and len(layers) == 2
    with pytest.raises(DistributedSetupError, match="process group"):
        distributed.shard_model(model)
    assert distributed.decoder_layers(nn.Sequential(nn.Linear(2, 2))) == []
