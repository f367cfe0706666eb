"""Fixtures of the export tests: tiny trained model folders (see gguf_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_helpers import build_model_folder


@pytest.fixture(scope="session")
def trained_folder(tmp_path_factory):
    """trained_folder(model_type, hidden=64, steps=120, tokenizer="bpe"|"spm") -> model folder
    (trained tiny model + tokenizer), built once per session."""
    made: dict[tuple, Path] = {}

    def make(model_type: str = "llama", hidden: int = 64, steps: int = 120, tokenizer: str = "bpe") -> Path:
        key = (model_type, hidden, steps, tokenizer)
        if key not in made:
            made[key] = build_model_folder(tmp_path_factory.mktemp(f"{model_type}-{hidden}"), *key)
        return made[key]

    return make
