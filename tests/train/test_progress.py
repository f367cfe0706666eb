"""TrainingProgress replaces the stock progress bar and log printer of a trainer."""

from __future__ import annotations

import sys

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from desktune.train.progress import TrainingProgress


def test_attach_swaps_out_the_stock_bar_without_importing_the_notebook_module(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=False)
    trainer = Trainer(model=model, args=args)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert "ProgressCallback" in names
    # A headless machine without IPython: transformers.utils.notebook must not be needed.
    monkeypatch.setitem(sys.modules, "transformers.utils.notebook", None)
    progress = TrainingProgress.attach(trainer)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert "ProgressCallback" not in names and "PrinterCallback" not in names
    assert progress in trainer.callback_handler.callbacks
