"""The training run on a GPU: 4-bit base, bf16, 8-bit AdamW, and an exact resume with CUDA RNG state."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from desktune.fixtures.dataset import tiny_alpaca_path
from desktune.train.config import load_config


def _config(model_dir, out):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "model.max_seq_length=256",
            "quantization.load_in_4bit=true",
            f"data.path={tiny_alpaca_path()}",
            "template.name=llama-3.1",
            "lora.dropout=0.1",
            "training.max_steps=8",
            "training.save_steps=3",
            "training.per_device_train_batch_size=4",
            "training.gradient_accumulation_steps=2",
            "training.learning_rate=5e-3",
            "training.optim=adamw_8bit",
            f"output.dir={out}",
        ],
    )


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.gpu
def test_gpu_qlora_run_resumes_on_the_same_curve(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from desktune.train.runner import build_trainer, run

    ref = run(_config(tiny_model_dir("llama"), tmp_path / "ref"))
    assert ref.global_step == 8 and ref.losses[-1][1] < ref.losses[0][1]
    assert ref.final_dir is not None and (ref.final_dir / "adapter_model.safetensors").is_file()

    out = tmp_path / "stopped"
    trainer = build_trainer(_config(tiny_model_dir("llama"), out))
    assert trainer.args.bf16 or trainer.args.fp16
    trainer.add_callback(_StopAt(5))  # stops after step 5; the last checkpoint is step 3
    trainer.train()
    resumed = run(_config(tiny_model_dir("llama"), out), resume=True)
    assert resumed.resumed_from.name == "checkpoint-3"
    assert [s for s, _ in resumed.losses] == list(range(1, 9))
    for (step, got), (_, want) in zip(resumed.losses, ref.losses):
        assert got == pytest.approx(want, rel=2e-3), f"step {step}"
