"""Launching the distributed tests' workers: alone, or as N processes through torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: the workers share two cores. No launcher variables leak in from outside.
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, output: str, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{output[-6000:]}"


def run_single(target: list[str]) -> str:
    """`python TARGET...` as one plain process; returns its stderr+stdout."""
    proc = subprocess.run([sys.executable, *target], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    _check(proc, proc.stdout + proc.stderr, " ".join(target))
    return proc.stdout + proc.stderr


def run_torchrun(target: list[str], nproc: int = 2) -> str:
    """`torchrun --standalone --nproc-per-node N TARGET...` (TARGET: a script, or -m module)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    _check(proc, proc.stdout + proc.stderr, " ".join(cmd))
    return proc.stdout + proc.stderr


def run_two_nodes(target: list[str]) -> list[str]:
    """Two torchrun launches of one process each, joined as `--nnodes 2` through c10d on loopback."""
    port = free_port()
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=desktune-test", "--local-addr=127.0.0.1", "--max-restarts=0"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv, *target], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        _check(proc, out, "a node of the two-node launch")
    return outputs


def read_result(folder: Path) -> dict:
    return json.loads((Path(folder) / "result.json").read_text())


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")
