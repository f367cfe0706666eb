"""Out-of-memory during training -> GPUOutOfMemoryError that says what to lower.

`catch_oom(model, tokens=...)` is a context manager around a training step;
`install_oom_advice(trainer)` wraps one trainer instance's `training_step` with it
(a TrainerCallback cannot: callbacks do not see exceptions). The advice is read
from the model itself (LoRA rank, checkpointing mode, 4-bit or not,
max_seq_length) and the batch that failed, and names the planner's estimate of
what fits this GPU at the current settings.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from desktune.errors import GPUOutOfMemoryError
from desktune.log import logger


def is_oom(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeErrors cuBLAS / cuDNN raise when an
    allocation inside them fails."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "cublas_status_alloc_failed" in text)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def describe(model) -> dict:
    """The memory-relevant settings of a desktune / transformers model."""
    base = _base(model)
    peft_config = getattr(model, "peft_config", None) or {}
    adapter = next(iter(peft_config.values()), None)
    if getattr(base, "_desktune_offload", None) is not None:
        checkpointing = "unsloth"
    elif getattr(base, "is_activation_checkpointing", None) or any(
            getattr(m, "gradient_checkpointing", False) for m in base.modules()):
        checkpointing = True
    else:
        checkpointing = False
    quantization = "nf4" if getattr(base, "is_loaded_in_4bit", False) else (
        "int8" if getattr(base, "is_loaded_in_8bit", False) else "16bit")
    return {"lora_rank": getattr(adapter, "r", None), "checkpointing": checkpointing, "quantization": quantization,
            "max_seq_length": getattr(model, "max_seq_length", None) or getattr(base, "max_seq_length", None)}


def _planned_tokens(model, settings: dict, batch_size: int) -> int | None:
    if not torch.cuda.is_available():
        return None
    try:
        from desktune.memory import planner

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return planner.max_context(_base(model).config, total, lora_rank=settings["lora_rank"] or 0,
                                   quantization=settings["quantization"], checkpointing=settings["checkpointing"],
                                   batch_size=batch_size)
    except Exception as exc:  # advice is best effort: never hide the OOM behind a planner error
        logger.debug("planner estimate unavailable: %s", exc)
        return None


def oom_advice(model, batch_size: int | None = None, seq_len: int | None = None) -> str:
    settings = describe(model)
    shape = f"batch size {batch_size}" if batch_size else "this batch"
    if seq_len:
        shape += f" x {seq_len} tokens"
    hints = []
    if batch_size and batch_size > 1:
        hints.append(f"per_device_train_batch_size={max(1, batch_size // 2)} with twice the "
                     "gradient_accumulation_steps (same effective batch)")
    planned = _planned_tokens(model, settings, batch_size or 1)
    limit = settings["max_seq_length"] or seq_len
    if limit:
        target = min(planned, limit // 2) if planned else limit // 2
        hints.append(f"max_seq_length={max(256, target // 64 * 64)}"
                     + (f" (desktune plans about {planned:,} tokens per row on this GPU at these settings)"
                        if planned else ""))
    if settings["checkpointing"] != "unsloth":
        hints.append('use_gradient_checkpointing="unsloth" (recomputes layers and keeps their inputs in CPU RAM)')
    if settings["quantization"] == "16bit":
        hints.append("load_in_4bit=True (4-bit base weights)")
    if settings["lora_rank"] and settings["lora_rank"] > 8:
        hints.append(f"r={settings['lora_rank'] // 2} (LoRA rank; fewer adapter weights and optimizer state)")
    used = ""
    if torch.cuda.is_available():
        used = (f" Peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB of "
                f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30:.1f} GiB.")
    return (f"the GPU ran out of memory training {shape} (LoRA r={settings['lora_rank']}, "
            f"use_gradient_checkpointing={settings['checkpointing']!r}, {settings['quantization']} weights).{used} "
            "Lower one at a time: " + "; ".join(hints) + ".")


@contextlib.contextmanager
def catch_oom(model, batch_size: int | None = None, seq_len: int | None = None):
    """Re-raise an out-of-memory error in the block as GPUOutOfMemoryError with advice."""
    try:
        yield
    except Exception as error:
        if not is_oom(error) or isinstance(error, GPUOutOfMemoryError):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # so the caller can still save or report
        raise GPUOutOfMemoryError(oom_advice(model, batch_size, seq_len)) from error


def _batch_shape(inputs) -> tuple[int | None, int | None]:
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.shape[0], ids.shape[1]
    return None, None


def install_oom_advice(trainer) -> None:
    """Wrap this trainer instance's training_step so an OOM says what to lower."""
    original = trainer.training_step

    @functools.wraps(original)
    def training_step(self, model, inputs, *args, **kwargs):
        batch, seq = _batch_shape(inputs)
        if batch == 1 and isinstance(inputs, dict) and "position_ids" in inputs and "attention_mask" not in inputs:
            batch = getattr(self.args, "per_device_train_batch_size", None)  # a padding-free row of examples
        with catch_oom(model, batch, seq):
            return original(model, inputs, *args, **kwargs)

    trainer.training_step = types.MethodType(training_step, trainer)
