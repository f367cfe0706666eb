"""OOM during training becomes a GPUOutOfMemoryError that names what to lower,
read from the model's own settings."""

from __future__ import annotations

import pytest
import torch
from memory_helpers import add_lora, tiny_llama

from desktune.errors import GPUOutOfMemoryError
from desktune.memory.checkpointing import apply_gradient_checkpointing
from desktune.memory.oom import catch_oom, describe, install_oom_advice, is_oom


def _lora_model(mode):
    model = add_lora(tiny_llama(layers=2), r=16)
    apply_gradient_checkpointing(model.get_base_model(), mode)
    model.max_seq_length = 4096
    return model


def test_describe_reads_the_model():
    assert describe(_lora_model("unsloth")) == {"lora_rank": 16, "checkpointing": "unsloth", "quantization": "16bit",
                                                "max_seq_length": 4096}
    assert describe(_lora_model(True))["checkpointing"] is True
    assert describe(_lora_model(False))["checkpointing"] is False


def test_oom_is_reraised_with_what_to_lower():
    model = _lora_model(True)
    with pytest.raises(GPUOutOfMemoryError) as info:
        with catch_oom(model, batch_size=4, seq_len=4096):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(info.value)
    assert "batch size 4 x 4096 tokens" in message
    assert "per_device_train_batch_size=2" in message
    assert "max_seq_length=2048" in message
    assert 'use_gradient_checkpointing="unsloth"' in message
    assert "r=8" in message and "load_in_4bit=True" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_advice_skips_what_is_already_low():
    model = add_lora(tiny_llama(layers=2), r=4)
    apply_gradient_checkpointing(model.get_base_model(), "unsloth")
    with pytest.raises(GPUOutOfMemoryError) as info:
        with catch_oom(model, batch_size=1, seq_len=1024):
            raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
    message = str(info.value)
    assert "per_device_train_batch_size" not in message and "use_gradient_checkpointing=" not in message.split(
        "Lower")[1]
    assert "r=" not in message.split("Lower")[1] and "max_seq_length=512" in message


def test_other_errors_pass_through():
    assert not is_oom(ValueError("out of memory"))  # not a runtime error
    with pytest.raises(KeyError):
        with catch_oom(_lora_model(True)):
            raise KeyError("labels")


def test_install_on_a_trainer_instance():
    class FakeTrainer:
        class args:
            per_device_train_batch_size = 8

        def training_step(self, model, inputs, num_items_in_batch=None):
            if inputs["input_ids"].shape[1] > 100:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return torch.tensor(1.0)

    model = _lora_model(True)
    trainer, other = FakeTrainer(), FakeTrainer()
    install_oom_advice(trainer)
    assert trainer.training_step(model, {"input_ids": torch.zeros(2, 10)}) == 1.0
    with pytest.raises(GPUOutOfMemoryError, match="batch size 2 x 512 tokens"):
        trainer.training_step(model, {"input_ids": torch.zeros(2, 512)})
    # Padding-free row: the batch size is the trainer's, not the row count.
    with pytest.raises(GPUOutOfMemoryError, match="batch size 8 x 512 tokens"):
        trainer.training_step(model, {"input_ids": torch.zeros(1, 512), "position_ids": torch.zeros(1, 512)})
    with pytest.raises(torch.OutOfMemoryError):  # other instances are untouched
        other.training_step(model, {"input_ids": torch.zeros(2, 512)})
