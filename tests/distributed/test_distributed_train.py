"""`desktune train` under torchrun (2 processes, gloo on CPU): rank 0 alone writes the run folder,
checkpoints hold every rank's RNG state, and the run resumes on ONE process with the same global
batch, continuing the very loss curve and adapter of an uninterrupted single-process run.
"""

from __future__ import annotations

import json

import torch
from conftest import run_single, run_torchrun
from safetensors.torch import load_file

from desktune.fixtures.dataset import tiny_alpaca_path
from desktune.train.config import dump_config, load_config


def _config(model_dir, out, batch: int, steps: int):
    return load_config(None, [
        f"model.name={model_dir}",
        "model.max_seq_length=128",
        "quantization.load_in_4bit=true",
        f"data.path={tiny_alpaca_path()}",
        "template.name=llama-3.1",
        "lora.r=4",
        "lora.alpha=8",
        "lora.gradient_checkpointing=unsloth",
        f"training.max_steps={steps}",
        "training.save_steps=3",
        f"training.per_device_train_batch_size={batch}",
        "training.gradient_accumulation_steps=1",
        "training.optim=sgd",  # linear in the gradient: summation-order noise stays noise (see the DDP test)
        "training.learning_rate=1.0",
        "training.warmup_steps=0",
        "training.lr_scheduler_type=constant",  # max_steps does not change the schedule
        f"output.dir={out}",
    ])


def _losses(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_train_on_two_processes_resumes_on_one(llama_dir, tmp_path):
    from desktune.train.runner import run

    # Reference: one process, batch 4, six steps, in this process.
    ref = run(_config(llama_dir, tmp_path / "ref", batch=4, steps=6))
    assert [s for s, _ in ref.losses] == [1, 2, 3, 4, 5, 6]

    # Steps 1-3 on two processes of batch 2 (the same global batch).
    out = tmp_path / "ddp"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_config(_config(llama_dir, out, batch=2, steps=3)))
    log = run_torchrun(["-m", "desktune.cli.main", "train", str(config_file)])
    assert log.count("trained 3 steps") == 1  # rank 0 alone reports
    checkpoint = out / "checkpoint-3"
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not (out / ".staging").exists()
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's only
    assert [s for s, _ in _losses(out)] == [1, 2, 3]  # one line per step: only rank 0 writes metrics
    torch.testing.assert_close(torch.tensor([l for _, l in _losses(out)]),
                               torch.tensor([l for _, l in ref.losses[:3]]), rtol=1e-3, atol=0)

    # Steps 4-6 on one process of batch 4, resumed from the two-process checkpoint.
    run_single(["-m", "desktune.cli.main", "train", str(config_file), "training.max_steps=6",
                "training.per_device_train_batch_size=4", "--resume"])
    resumed = _losses(out)
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([l for _, l in resumed]), torch.tensor([l for _, l in ref.losses]),
                               rtol=1e-3, atol=0)
    got, want = load_file(out / "final/adapter_model.safetensors"), load_file(ref.final_dir / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    assert max(w.abs().max().item() for k, w in want.items() if "lora_B" in k) > 0.05  # it trained
    for key in want:  # bf16 adapters: 1-2 ulps of rounding (see the DDP test)
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=2**-7, atol=2**-9)
