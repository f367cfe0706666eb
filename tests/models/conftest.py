"""Tiny gpt-oss folders (BF16 layout and MXFP4), made once per session."""

import pytest


@pytest.fixture(scope="session")
def gpt_oss_dir(tmp_path_factory):
    from desktune.fixtures.tiny_gpt_oss import save_tiny_gpt_oss

    return str(save_tiny_gpt_oss(tmp_path_factory.mktemp("tiny-gpt-oss")))


@pytest.fixture(scope="session")
def gpt_oss_mxfp4_dir(tmp_path_factory):
    from desktune.fixtures.tiny_gpt_oss import save_tiny_gpt_oss

    return str(save_tiny_gpt_oss(tmp_path_factory.mktemp("tiny-gpt-oss-mxfp4"), mxfp4=True))
