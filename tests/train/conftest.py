"""Fixtures of the training tests: one tiny random Llama folder per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    from desktune.fixtures.tiny_models import save_tiny_model

    return str(save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama")))
