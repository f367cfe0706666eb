"""desktune: fast LoRA / QLoRA fine-tuning on one NVIDIA GPU.

Importing desktune changes nothing in torch, transformers, peft or trl: models are
patched one instance at a time by `FastLanguageModel`. The heavy imports happen on
first use of a public name, so `desktune --help` stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "FastLanguageModel": "desktune.api",
    "is_bfloat16_supported": "desktune.api",
    "get_chat_template": "desktune.data.templates",
    "train_on_responses_only": "desktune.data.masking",
    "standardize_sharegpt": "desktune.data.formats",
    "standardize_data_formats": "desktune.data.formats",
    "prepare_dataset": "desktune.data.pipeline",
    "TrainingProgress": "desktune.train.progress",
    "plot_loss": "desktune.train.progress",
}

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:  # pragma: no cover
    from desktune.api import FastLanguageModel, is_bfloat16_supported


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'desktune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
