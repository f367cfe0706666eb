"""TRL's SFTTrainer with atomic checkpoints and a clear out-of-memory error.

Why build on SFTTrainer rather than a plain loop: it already tokenizes chat and text
datasets, packs, and (through transformers' Trainer) saves and restores the model,
optimizer, scheduler, gradient-scaler and every RNG state, and on resume skips the
batches already seen in the epoch with the same seeded sampler order, which is what
makes a resumed loss curve identical to an uninterrupted one. What it lacks is an
atomic checkpoint write; `_save_checkpoint` below stages the folder and publishes it
with one rename (see `desktune.train.checkpoints`).
"""

from __future__ import annotations

import contextlib
import os

import torch
from trl import SFTTrainer

from desktune.train import checkpoints


class DesktuneSFTTrainer(SFTTrainer):
    """SFTTrainer whose checkpoints appear complete or not at all."""

    _staging_checkpoint = False

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, checkpoints.STAGING) if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staged = os.path.join(run_dir, checkpoints.STAGING, name)
        checkpoints.clean_staging(run_dir)
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)  # writes everything under .staging/
        finally:
            self._staging_checkpoint = False
        if self.args.should_save:
            checkpoints.publish(staged, os.path.join(run_dir, name))
            checkpoints.clean_staging(run_dir)
            checkpoints.rotate(run_dir, self.args.save_total_limit)


def oom_message(batch_size: int, grad_accum: int, max_seq_length: int, gradient_checkpointing, load_in_4bit: bool) -> str:
    hints = []
    if batch_size > 1:
        hints.append(
            f"training.per_device_train_batch_size={max(1, batch_size // 2)} with "
            f"training.gradient_accumulation_steps={grad_accum * 2} (same effective batch)"
        )
    hints.append(f"model.max_seq_length={max(256, max_seq_length // 2)} (longer rows are then reported as over-long)")
    if not gradient_checkpointing:
        hints.append('lora.gradient_checkpointing=unsloth (recomputes activations instead of keeping them)')
    if not load_in_4bit:
        hints.append("quantization.load_in_4bit=true (4-bit base weights)")
    hints.append("lora.r=8 (fewer adapter weights and optimizer state)")
    return (
        f"the GPU ran out of memory (batch size {batch_size}, max_seq_length {max_seq_length}). "
        "Lower, one at a time: " + "; ".join(hints) + ". Then resume from the last checkpoint with --resume."
    )


@contextlib.contextmanager
def reraise_oom(**settings):
    """Turn CUDA's out-of-memory error into a GPUOutOfMemoryError that says what to lower."""
    from desktune.errors import GPUOutOfMemoryError

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise GPUOutOfMemoryError(oom_message(**settings)) from err
