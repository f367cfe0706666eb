"""A progress bar with loss, tokens/s and ETA, and the loss curve afterwards.

`TrainingProgress.attach(trainer)` swaps it in for the stock progress bar and log
printer of a transformers/TRL trainer. In a notebook `tqdm.auto` draws a live widget
bar; over SSH a text bar.
It also keeps every logged (step, loss) for `plot_loss`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class TrainingProgress(TrainerCallback):
    def __init__(self, metrics_file: str | Path | None = None, notebook: bool | None = None):
        """`metrics_file`: append each log entry there as one JSON line (the CLI keeps one per run)."""
        self.metrics_file = Path(metrics_file) if metrics_file else None
        self.notebook = notebook
        self.losses: list[tuple[int, float]] = []
        self.bar = None

    @classmethod
    def attach(cls, trainer, metrics_file: str | Path | None = None, notebook: bool | None = None):
        """Replace the trainer's stock progress bar / log printer with this one; returns the callback."""
        # By class name: importing transformers.utils.notebook needs IPython, which a
        # headless machine may lack (seen on the H200 run: ModuleNotFoundError).
        stock = {"PrinterCallback", "ProgressCallback", "NotebookProgressCallback"}
        for callback in list(trainer.callback_handler.callbacks):
            if type(callback).__name__ in stock:
                trainer.remove_callback(callback)
        if trainer.args.include_num_input_tokens_seen in ("no", False, None):  # tokens/s needs the count
            trainer.args.include_num_input_tokens_seen = "non_padding"
        progress = cls(metrics_file=metrics_file, notebook=notebook)
        trainer.add_callback(progress)
        return progress

    def _tqdm(self):
        if self.notebook is False:
            from tqdm import tqdm
        else:
            from tqdm.auto import tqdm
        return tqdm

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # under torchrun only rank 0 draws and writes metrics
            self.metrics_file = None
            return
        self.bar = self._tqdm()(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)
        self._start_time = time.perf_counter()
        self._start_step = state.global_step
        self._start_tokens = state.num_input_tokens_seen or 0
        self._last = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))
        if self.metrics_file is not None:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
        if self.bar is None:
            return
        elapsed = max(time.perf_counter() - self._start_time, 1e-9)
        tokens = (state.num_input_tokens_seen or 0) - self._start_tokens
        if "loss" in logs:
            self._last["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            self._last["lr"] = f"{logs['learning_rate']:.2e}"
        if tokens:
            self._last["tok/s"] = f"{tokens / elapsed:,.0f}"
        self.bar.set_postfix(self._last, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def loss_history(trainer_or_state) -> list[tuple[int, float]]:
    """(step, training loss) of every logged step, from a Trainer or its TrainerState."""
    state = getattr(trainer_or_state, "state", trainer_or_state)
    return [(entry["step"], float(entry["loss"])) for entry in state.log_history if "loss" in entry]


def plot_loss(trainer_or_state, ax=None, title: str = "Training loss"):
    """The loss curve with matplotlib; returns the Axes (a notebook shows it inline)."""
    import matplotlib.pyplot as plt

    history = loss_history(trainer_or_state)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    steps = [s for s, _ in history]
    ax.plot(steps, [loss for _, loss in history], marker="." if len(history) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax
