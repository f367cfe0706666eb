"""The image's scripts (docker/start.sh and docker/lib/*) run on the host: fast checks of the
same code the image runs. The image itself is tested in test_image.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from image_helpers import DOCKER, LIB, JupyterClient, free_port, wait_for_port

BASH = shutil.which("bash")


def bash(script: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Runs `script` in bash with secrets.sh sourced, in a clean environment plus `env`."""
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([BASH, "-c", f"set -euo pipefail; source {LIB}/secrets.sh; {script}"],
                          env=full_env, capture_output=True, text=True, check=check, timeout=60)


# ---------------------------------------------------------------------------- secrets.sh


def test_secret_from_file_wins_over_nothing_and_drops_trailing_newline(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-a-file-123\n")
    r = bash('printf "[%s]" "$(load_secret JUPYTER_PASSWORD)"', {"JUPYTER_PASSWORD_FILE": str(secret)}, check=True)
    assert r.stdout == "[from-a-file-123]"


def test_secret_set_twice_is_refused(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("one-password")
    r = bash("load_secret JUPYTER_PASSWORD", {"JUPYTER_PASSWORD": "other-password", "JUPYTER_PASSWORD_FILE": str(secret)})
    assert r.returncode == 2
    assert "both JUPYTER_PASSWORD and JUPYTER_PASSWORD_FILE" in r.stderr


def test_secret_file_missing_is_refused(tmp_path):
    r = bash("load_secret SSH_PASSWORD", {"SSH_PASSWORD_FILE": str(tmp_path / "nope")})
    assert r.returncode == 2 and "not a readable file" in r.stderr


def test_short_password_refused_with_clear_message():
    r = bash("resolve_secrets", {"JUPYTER_PASSWORD": "short7!"})
    assert r.returncode == 2
    assert "JUPYTER_PASSWORD has 7 characters; use at least 8" in r.stderr
    r = bash("resolve_secrets", {"JUPYTER_PASSWORD": "long-enough", "SSH_PASSWORD": "abc"})
    assert r.returncode == 2 and "SSH_PASSWORD has 3 characters" in r.stderr


def test_ssh_password_falls_back_to_jupyters():
    r = bash('resolve_secrets; echo "$jupyter_password|$ssh_password|$generated_password"',
             {"JUPYTER_PASSWORD": "jupyter-secret"}, check=True)
    assert r.stdout.strip() == "jupyter-secret|jupyter-secret|0"
    r = bash('resolve_secrets; echo "$jupyter_password|$ssh_password"',
             {"JUPYTER_PASSWORD": "jupyter-secret", "SSH_PASSWORD": "ssh-secret-9"}, check=True)
    assert r.stdout.strip() == "jupyter-secret|ssh-secret-9"


def test_generated_password_is_strong_and_fresh():
    outs = [bash('resolve_secrets; echo "$generated_password $jupyter_password"', check=True).stdout.split()
            for _ in range(2)]
    assert [o[0] for o in outs] == ["1", "1"]
    assert len(outs[0][1]) >= 20 and outs[0][1] != outs[1][1]


def test_scrub_removes_secrets_and_tokens_from_children_env(tmp_path):
    env = {"JUPYTER_PASSWORD": "p" * 10, "SSH_PASSWORD": "q" * 10, "JUPYTER_TOKEN": "tok",
           "JUPYTER_TOKEN_FILE": "/x", "JUPYTER_PASSWORD_FILE": "", "HF_TOKEN": "keep-me"}
    r = bash("resolve_secrets; scrub_secret_env; env", env, check=True)
    names = {line.split("=", 1)[0] for line in r.stdout.splitlines()}
    assert not names & {"JUPYTER_PASSWORD", "SSH_PASSWORD", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE",
                        "JUPYTER_PASSWORD_FILE"}
    assert "HF_TOKEN" in names  # not a login secret: notebooks need it for gated models
    assert "p" * 10 not in r.stdout and "q" * 10 not in r.stdout


# -------------------------------------------------------------------------- setup-user.sh


def _dry_run(workspace: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LIB / "setup-user.sh"), "--dry-run", "desktune", str(workspace)],
                          env={"PATH": os.environ["PATH"], **(env or {})}, capture_output=True, text=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown of the test workspace needs root")
def test_user_ids_follow_workspace_owner(tmp_path):
    os.chown(tmp_path, 1234, 5678)
    r = _dry_run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1234", "5678"]
    assert "owner of" in r.stderr


def test_user_ids_from_puid_pgid_and_root_workspace(tmp_path):
    if os.stat(tmp_path).st_uid == 0:
        r = _dry_run(tmp_path)
        assert r.stdout.split() == ["1000", "1000"]
    r = _dry_run(tmp_path, {"PUID": "2001", "PGID": "2002"})
    assert r.stdout.split() == ["2001", "2002"]
    r = _dry_run(tmp_path, {"PUID": "2001"})
    assert r.stdout.split() == ["2001", "2001"]


def test_root_or_garbage_ids_refused(tmp_path):
    r = _dry_run(tmp_path, {"PUID": "0"})
    assert r.returncode == 2 and "refusing to run the workspace user as root" in r.stderr
    r = _dry_run(tmp_path, {"PUID": "me"})
    assert r.returncode == 2 and "PUID=me is not a number" in r.stderr


# -------------------------------------------------------------------------- sshd-setup.sh


def _sshd_setup(tmp_path: Path, port: int = 2222) -> Path:
    config = tmp_path / "etc" / "sshd_config"
    env = {"PATH": f"/opt/venv/bin:{os.environ['PATH']}", "VIRTUAL_ENV": "/opt/venv", "WORKSPACE": "/workspace/work",
           "HF_HOME": "/home/desktune/.cache/huggingface"}
    subprocess.run([str(LIB / "sshd-setup.sh"), str(config), str(tmp_path / "keys"), "desktune", str(port)],
                   env=env, check=True, capture_output=True, text=True)
    return config


def _fingerprints(keydir: Path) -> list[str]:
    return [subprocess.run(["ssh-keygen", "-l", "-f", str(p)], capture_output=True, text=True, check=True).stdout
            for p in sorted(keydir.glob("*.pub"))]


@pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="openssh-server is not installed")
def test_sshd_config_is_valid_and_locked_down(tmp_path):
    config = _sshd_setup(tmp_path)
    text = config.read_text()
    check = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for line in ("PermitRootLogin no", "AllowUsers desktune", "PermitEmptyPasswords no", "Port 2222"):
        assert line in text.splitlines()
    # sshd honours only the first SetEnv line: everything must be on one.
    setenv = [line for line in text.splitlines() if line.startswith("SetEnv")]
    assert len(setenv) == 1
    assert "PATH=/opt/venv/bin:" in setenv[0] and "VIRTUAL_ENV=/opt/venv" in setenv[0]
    assert "WORKSPACE=/workspace/work" in setenv[0] and "HF_HOME=" in setenv[0]


def test_host_keys_made_once_and_kept(tmp_path):
    _sshd_setup(tmp_path)
    keydir = tmp_path / "keys"
    first = _fingerprints(keydir)
    assert len(first) == 2 and "ED25519" in "".join(first)
    assert stat.S_IMODE(os.stat(keydir / "ssh_host_ed25519_key").st_mode) == 0o600
    _sshd_setup(tmp_path)  # a restart with the same volume
    assert _fingerprints(keydir) == first


# ------------------------------------------------------------------------ jupyter-config.py


def _jupyter_config(tmp_path: Path, password: str, port: int = 8888) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LIB / "jupyter-config.py"), "--out",
                           str(tmp_path / "cfg" / "jupyter_server_config.json"), "--port", str(port),
                           "--root-dir", str(tmp_path)], input=password, capture_output=True, text=True)


def test_jupyter_config_stores_only_an_argon2_hash_readable_by_owner(tmp_path):
    from jupyter_server.auth import passwd_check

    r = _jupyter_config(tmp_path, "correct horse battery\n")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "cfg" / "jupyter_server_config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "correct horse" not in text
    cfg = json.loads(text)
    hashed = cfg["PasswordIdentityProvider"]["hashed_password"]
    assert hashed.startswith("argon2:")
    assert passwd_check(hashed, "correct horse battery") and not passwd_check(hashed, "wrong horse battery")
    assert cfg["IdentityProvider"]["token"] == ""
    assert cfg["PasswordIdentityProvider"]["allow_password_change"] is False


def test_jupyter_config_refuses_short_password(tmp_path):
    r = _jupyter_config(tmp_path, "1234567")
    assert r.returncode == 2 and "at least 8" in r.stderr
    assert not (tmp_path / "cfg").exists()


def test_real_jupyter_server_with_the_config(tmp_path):
    """A real Jupyter Server on loopback with the generated config: only the password logs in."""
    port = free_port()
    cfg_dir = tmp_path / "cfg"
    assert _jupyter_config(tmp_path, "s3cret-password", port).returncode == 0
    cfg = json.loads((cfg_dir / "jupyter_server_config.json").read_text())
    cfg["ServerApp"]["ip"] = "127.0.0.1"
    (cfg_dir / "jupyter_server_config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(cfg_dir), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    env.pop("JUPYTER_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--allow-root"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, 60, alive=lambda: proc.poll() is None)
        anon = JupyterClient(port)
        assert anon.request("GET", "/api/contents")[0] == 403
        wrong = JupyterClient(port)
        assert wrong.login("not-the-password") == 401  # the form again, with an error
        assert wrong.api("GET", "/api/contents")[0] == 403
        right = JupyterClient(port)
        assert right.login("s3cret-password") == 302
        status, _, body = right.api("GET", "/api/contents")
        assert status == 200 and json.loads(body)["type"] == "directory"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# ------------------------------------------------------------------------ copy-examples.sh


def test_examples_copied_once_and_never_overwrite(tmp_path):
    src, dest, manifest = tmp_path / "src", tmp_path / "ws" / "examples", tmp_path / "ws" / ".desktune" / "copied"
    src.mkdir()
    (src / "a.ipynb").write_text("a v1")
    (src / "b.ipynb").write_text("b v1")
    ids = [str(os.getuid()), str(os.getgid())]

    def copy():
        subprocess.run([str(LIB / "copy-examples.sh"), str(src), str(dest), str(manifest), *ids],
                       check=True, capture_output=True)

    copy()
    assert (dest / "a.ipynb").read_text() == "a v1"
    (dest / "a.ipynb").write_text("my edits")
    (dest / "b.ipynb").unlink()  # the user deleted it
    (src / "a.ipynb").write_text("a v2")
    (src / "c.ipynb").write_text("c v1")  # new in a later image
    copy()
    assert (dest / "a.ipynb").read_text() == "my edits"
    assert not (dest / "b.ipynb").exists()
    assert (dest / "c.ipynb").read_text() == "c v1"


# ---------------------------------------------------------------------- healthcheck.py etc.


def _serve_ssh_banner(sock: socket.socket) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.sendall(b"SSH-2.0-OpenSSH_test\r\n")
        conn.close()


def test_healthcheck_needs_both_services(tmp_path):
    class Api(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    http = HTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    ssh = socket.socket()
    ssh.bind(("127.0.0.1", 0))
    ssh.listen()
    threading.Thread(target=_serve_ssh_banner, args=(ssh,), daemon=True).start()

    def check(jupyter_port, ssh_port):
        env = {"PATH": os.environ["PATH"], "JUPYTER_PORT": str(jupyter_port), "SSH_PORT": str(ssh_port)}
        return subprocess.run([sys.executable, str(LIB / "healthcheck.py")], env=env, capture_output=True,
                              text=True, timeout=60).returncode

    try:
        assert check(http.server_port, ssh.getsockname()[1]) == 0
        assert check(http.server_port, free_port()) == 1
        assert check(free_port(), ssh.getsockname()[1]) == 1
    finally:
        http.shutdown()
        ssh.close()


def test_warm_triton_parses_arch_lists():
    import importlib.util

    spec = importlib.util.spec_from_file_location("warm_triton", LIB / "warm-triton.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_arch_list("12.0") == [120]
    assert mod.parse_arch_list("8.9;9.0+PTX 9.0a, 12.0") == [89, 90, 120]
    with pytest.raises(ValueError, match="sm_90"):
        mod.parse_arch_list("sm_90")


def test_start_sh_refuses_short_password_before_touching_anything():
    env = {"PATH": os.environ["PATH"], "JUPYTER_PASSWORD": "short"}
    r = subprocess.run([str(DOCKER / "start.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "JUPYTER_PASSWORD has 5 characters" in r.stderr
