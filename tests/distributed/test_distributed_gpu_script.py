"""scripts/gpu/multi_gpu_step.py (the lead's multi-GPU benchmark) runs its FSDP2 path end to end on CPU at a
tiny shape: the in-memory NF4 model gets desktune's fused QLoRA layers and trains under fully_shard."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import HERE, run_torchrun

SCRIPTS = HERE.parents[1] / "scripts" / "gpu"


def test_fsdp_step_script_on_cpu(tmp_path):
    results = tmp_path / "results.jsonl"
    run_torchrun([str(SCRIPTS / "multi_gpu_step.py"), "--mode", "fsdp", "--shape", "tiny", "--device", "cpu",
                  "--batch", "2", "--seq", "32", "--warmup", "1", "--steps", "2", "--out", str(results)])
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["gpus"] == 2 and row["mode"] == "fsdp" and row["finite"]
    assert row["fused_qlora_layers"] == 2 * 7  # every q/k/v/o/gate/up/down of both layers
    assert row["tokens_per_s"] > 0 and row["step_s"] > 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_multi_gpu_sh_is_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPTS / "multi_gpu.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
