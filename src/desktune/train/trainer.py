"""TRL's SFTTrainer with atomic checkpoints.

Why build on SFTTrainer rather than a plain loop: it already tokenizes chat and text
datasets, packs, and (through transformers' Trainer) saves and restores the model,
optimizer, scheduler, gradient-scaler and every RNG state, and on resume skips the
batches already seen in the epoch with the same seeded sampler order, which is what
makes a resumed loss curve identical to an uninterrupted one. What it lacks is an
atomic checkpoint write; `_save_checkpoint` below stages the folder and publishes it
with one rename (see `desktune.train.checkpoints`).
"""

from __future__ import annotations

import os

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
        if self.args.should_save:
            checkpoints.clean_staging(run_dir)
        # With several processes every rank writes its rng_state_<rank>.pth into the staged
        # folder: nobody writes before it is clean, and rank 0 publishes only once all have.
        self.accelerator.wait_for_everyone()
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)  # writes everything under .staging/
        finally:
            self._staging_checkpoint = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.publish(staged, os.path.join(run_dir, name))
            checkpoints.clean_staging(run_dir)
            checkpoints.rotate(run_dir, self.args.save_total_limit)
