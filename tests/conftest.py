"""Shared test setup: no network, GPU tests skipped without CUDA, tiny model folders."""

from __future__ import annotations

import os

# Tests never reach a model hub; fail fast instead of waiting on the closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(model_type) -> folder with a random tiny model + tokenizer (made once per session)."""
    from desktune.fixtures.tiny_models import save_tiny_model

    made: dict[str, str] = {}

    def make(model_type: str = "llama") -> str:
        if model_type not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            made[model_type] = str(save_tiny_model(model_type, folder))
        return made[model_type]

    return make
