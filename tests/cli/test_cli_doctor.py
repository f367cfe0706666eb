"""`desktune doctor` end to end on this machine (no GPU) and with faked facts."""

from __future__ import annotations

import subprocess
import sys

from desktune import doctor
from desktune.cli.main import main
from desktune.doctor import GPU, Facts, Probe


def test_cpu_machine_says_so_and_exits_zero():
    r = subprocess.run([sys.executable, "-m", "desktune.cli.main", "doctor"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "desktune doctor" in r.stdout and "No CUDA GPU is visible" in r.stdout
    assert "WARNING" in r.stdout and "ERROR" not in r.stdout


def test_require_gpu_fails_without_one(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "gather", lambda: Facts("3.11", "2.13.0+cpu", None))
    assert main(["doctor", "--require-gpu"]) == 1
    assert "--require-gpu: no usable CUDA GPU" in capsys.readouterr().out
    assert main(["doctor"]) == 0


def test_broken_gpu_kernel_fails_with_the_message(monkeypatch, capsys):
    facts = Facts("3.12", "2.10.0+cu128", "12.8", ["sm_120"], True, None, "570.1",
                  [GPU(0, "RTX 5090", (12, 0))],
                  [Probe("bitsandbytes", "0.50.2", ran=False,
                         error="RuntimeError: no kernel image is available for execution on the device")])
    monkeypatch.setattr(doctor, "gather", lambda: facts)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "bitsandbytes 0.50.2 has no kernels compiled for this GPU (RTX 5090, sm_120)" in out
