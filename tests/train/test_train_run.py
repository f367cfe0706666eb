"""Training runs on a tiny model on CPU: resume after a kill, response-only labels, run folder contents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from desktune.errors import GPUOutOfMemoryError, TrainConfigError
from desktune.fixtures.dataset import tiny_alpaca_path
from desktune.train.config import dump_config, load_config


def _config(model_dir, out, *extra):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "model.max_seq_length=128",
            "quantization.load_in_4bit=false",
            f"data.path={tiny_alpaca_path()}",
            "template.name=llama-3.1",
            "lora.r=4",
            "lora.dropout=0.1",  # dropout draws random numbers: the RNG state must be restored too
            "lora.gradient_checkpointing=false",
            "training.max_steps=6",
            "training.save_steps=2",
            "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=1",
            "training.learning_rate=1e-2",
            "training.warmup_steps=1",
            "training.lr_scheduler_type=cosine",
            f"output.dir={out}",
            *extra,
        ],
    )


def _step_losses(checkpoint: Path) -> list[tuple[int, float]]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]


def test_killed_run_resumes_with_the_same_loss_curve(tiny_model_dir, tmp_path):
    from desktune.cli.main import main as cli_main
    from desktune.train.runner import run

    model_dir = tiny_model_dir("llama")
    ref = run(_config(model_dir, tmp_path / "ref"))
    assert [s for s, _ in ref.losses] == [1, 2, 3, 4, 5, 6]
    assert ref.losses[-1][1] < ref.losses[0][1]  # it learns

    # The same run as a `desktune train` process, SIGKILLed right after its first checkpoint.
    out = tmp_path / "killed"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_config(_config(model_dir, out)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "desktune.cli.main", "train", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-2").exists():
            assert proc.poll() is None, "the training process ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists() and not (out / "checkpoint-6").exists()

    assert cli_main(["train", str(config_file), "--resume"]) == 0
    resumed = _step_losses(out / "checkpoint-6")
    expected = _step_losses(ref.output_dir / "checkpoint-6")
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    for (step, got), (_, want) in zip(resumed, expected):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), f"step {step}"

    # what the run folder holds
    for ckpt in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        names = set(os.listdir(out / ckpt))
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names, ckpt
        assert "adapter_model.safetensors" in names
    assert not (out / ".staging").exists()
    assert (out / "final" / "adapter_config.json").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e][-4:] == [3, 4, 5, 6]  # the resumed part


def test_run_refuses_to_mix_runs(tiny_model_dir, tmp_path):
    from desktune.train.runner import run

    out = tmp_path / "run"
    with pytest.raises(TrainConfigError, match="no checkpoint-N folder"):
        run(_config(tiny_model_dir("llama"), out), resume=True)
    (out / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(TrainConfigError, match="--resume"):
        run(_config(tiny_model_dir("llama"), out))


def test_trainer_datasets_carry_response_only_labels(tiny_model_dir, tmp_path):
    from desktune.train.runner import build_trainer

    trainer = build_trainer(_config(tiny_model_dir("llama"), tmp_path / "run"))
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    trained = [label for label in row["labels"] if label != -100]
    first = json.loads(Path(tiny_alpaca_path()).read_text().splitlines()[0])
    assert tok.decode(trained) == first["output"] + "<|eot_id|>"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert (batch["labels"] != -100).sum() < (batch["input_ids"] != tok.pad_token_id).sum() / 3


def test_out_of_memory_in_a_step_says_what_to_lower(tiny_model_dir, tmp_path):
    from desktune.train.runner import build_trainer

    trainer = build_trainer(_config(tiny_model_dir("llama"), tmp_path / "run", "training.per_device_train_batch_size=4"))

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.compute_loss = no_memory
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with pytest.raises(GPUOutOfMemoryError) as err:
        trainer.training_step(trainer.model, batch)
    assert "per_device_train_batch_size=2" in str(err.value) and "max_seq_length=" in str(err.value)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
