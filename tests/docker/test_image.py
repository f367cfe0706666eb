"""The workstation image, really built from docker/Dockerfile and really run, with no Docker
engine and no GPU: buildah builds it (chroot isolation, vfs storage) on a debootstrap base with
CPU torch swapped in and no xformers (build args), and `buildah run` starts its ENTRYPOINT with
host networking; the tests then use it from outside like a user: SSH, Jupyter's login form and
kernels, a headless Chromium. The image is built once per session (slow: ~10 min on 2 cores).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from image_helpers import ARTIFACTS, LIB, REPO, JupyterClient, free_port, run_in_kernel, wait_for_port

pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]  # the first test also builds the image

STATE = Path("/var/tmp/desktune-image-test")  # buildah storage; the base image is kept between runs
BASE = "localhost/desktune-test-base:bookworm"
# Containers are per session, so two test runs on one machine never touch each other's; images
# are shared, made under a lock: the base once, the image once per content of its build context.
SESSION = f"{os.getpid()}"
WS_UID, WS_GID = 4321, 4322
BUILD_ARGS = {
    "BUILDER_BASE": BASE,
    "RUNTIME_BASE": BASE,
    "TORCH_VERSION": "2.13.0",  # the CPU wheel in the base's /opt/wheels
    "BUILD_XFORMERS": "0",  # CUDA-only build
    "BUILD_LLAMA_CPP": "0",
}
SECRET_NAMES = ("JUPYTER_PASSWORD", "SSH_PASSWORD", "JUPYTER_TOKEN")


def storage_driver() -> str:
    """overlay where the kernel allows it (far faster commits and containers), else vfs."""
    if not hasattr(storage_driver, "value"):
        probe = ["buildah", "--root", str(STATE / "overlay"), "--runroot", str(STATE / "run-overlay"),
                 "--storage-driver", "overlay"]
        r = subprocess.run([*probe, "from", "scratch"], capture_output=True, text=True)
        if r.returncode == 0:
            subprocess.run([*probe, "rm", r.stdout.strip()], capture_output=True)
        storage_driver.value = "overlay" if r.returncode == 0 else "vfs"
    return storage_driver.value


def buildah_cmd(*args: str) -> list[str]:
    driver = storage_driver()
    return ["buildah", "--root", str(STATE / driver), "--runroot", str(STATE / f"run-{driver}"),
            "--storage-driver", driver, *args]


def buildah(*args: str, timeout: float = 600) -> str:
    r = subprocess.run(buildah_cmd(*args), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def context_hash() -> str:
    """Hash of everything the image is built from (tracked and new files, not ignored ones)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "docker", "src",
                            "notebooks", "pyproject.toml", "README.md", ".dockerignore"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    h = hashlib.sha256(json.dumps(BUILD_ARGS, sort_keys=True).encode())
    for name in sorted(set(files)):
        path = REPO / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def image_exists(name: str) -> bool:
    return subprocess.run(buildah_cmd("inspect", "--type", "image", name), capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def image():
    if os.geteuid() != 0:
        pytest.skip("building the image with buildah (chroot isolation) needs root, as in CI")
    for tool in ("buildah", "debootstrap", "git"):
        assert shutil.which(tool), f"{tool} is missing: scripts/setup-test-env installs it (scripts/test-apt-packages.txt)"
    ARTIFACTS.mkdir(exist_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    digest = context_hash()
    image_name = f"localhost/desktune:test-{digest}"
    saved_log = STATE / f"build-{digest}.log"
    # One build at a time on a machine (2 cores); a second session with the same sources reuses it.
    with open(STATE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image_exists(BASE):
            env = {**os.environ, "BUILDAH_OPTS": " ".join(buildah_cmd()[1:])}
            subprocess.run([str(REPO / "tests" / "docker" / "make-test-base.sh"), BASE], env=env, check=True,
                           timeout=900)
        if not (image_exists(image_name) and saved_log.exists()):
            args = [a for k, v in BUILD_ARGS.items() for a in ("--build-arg", f"{k}={v}")]
            with open(saved_log.with_suffix(".partial"), "w") as log:
                r = subprocess.run(buildah_cmd("bud", "--isolation", "chroot", "--network", "host", "--format",
                                               "docker", "-f", "docker/Dockerfile", *args, "-t", image_name, "."),
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
            text = saved_log.with_suffix(".partial").read_text()
            (ARTIFACTS / "image-build.log").write_text(text)
            assert r.returncode == 0, f"the image build failed (log: test-artifacts/image-build.log):\n{text[-4000:]}"
            saved_log.with_suffix(".partial").rename(saved_log)
            # Older test images and the builder stage's leftovers (images in use are kept).
            for line in buildah("images", "--format", "{{.Name}}:{{.Tag}}").split():
                if line.startswith("localhost/desktune:test-") and line != image_name:
                    subprocess.run(buildah_cmd("rmi", line), capture_output=True)
            subprocess.run(buildah_cmd("rmi", "--prune"), capture_output=True)
    config = json.loads(buildah("inspect", "--type", "image", image_name))
    return {"name": image_name, "log": saved_log.read_text(), "config": config}


class Container:
    """A container of the image started through its own ENTRYPOINT by `buildah run`."""

    def __init__(self, name: str, image: dict, env: dict, workspace: Path, keys: Path):
        self.name = name
        self.env = env
        subprocess.run(buildah_cmd("rm", name), capture_output=True)
        buildah("from", "--name", name, image["name"])
        entrypoint = image["config"]["Docker"]["config"]["Entrypoint"]
        for k, v in env.items():
            buildah("config", "--env", f"{k}={v}", name)
        self.log_path = ARTIFACTS / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            buildah_cmd("run", "--isolation", "chroot", "--network", "host",
                        "-v", f"{workspace}:/workspace/work", "-v", f"{keys}:/etc/ssh/host-keys",
                        name, "--", *entrypoint),
            stdout=self.log, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 300) -> None:
        try:
            for port in (int(self.env["JUPYTER_PORT"]), int(self.env["SSH_PORT"])):
                wait_for_port(port, timeout, alive=lambda: self.proc.poll() is None)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"{e}\n--- container log ---\n{self.logs()[-4000:]}") from None

    def descendants(self) -> dict[int, list[str]]:
        """pid -> argv of every process under `buildah run` (no PID namespace here)."""
        children: dict[int, list[int]] = {}
        argvs: dict[int, list[str]] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argvs[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
        out, todo = {}, [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                out[child] = argvs.get(child, [])
                todo.append(child)
        return out

    def pid_of(self, program: str) -> int:
        """The process running `program` (its argv[0], or the script a Python runs). Not buildah's
        chroot helper, whose argv also names the command it starts."""
        for pid, argv in sorted(self.descendants().items()):
            names = [Path(a).name for a in argv[:2]] + ["", ""]
            if names[0] == program or (names[0].startswith("python") and names[1] == program):
                return pid
        raise AssertionError(f"no {program} process in the container: {self.descendants()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the container did not exit within {timeout} s:\n{self.logs()[-3000:]}") from None

    def remove(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid_of("tini"), signal.SIGKILL)
            except AssertionError:
                pass
            self.proc.kill()
            self.proc.wait(timeout=60)
        self.log.close()
        subprocess.run(buildah_cmd("rm", self.name), capture_output=True)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("image-run")
    workspace, keys = root / "work", root / "host-keys"
    workspace.mkdir()
    keys.mkdir()
    os.chown(workspace, WS_UID, WS_GID)  # the host user's workspace: its IDs must win
    import paramiko

    key = paramiko.RSAKey.generate(2048)
    return {"workspace": workspace, "keys": keys, "key": key,
            "pubkey": f"{key.get_name()} {key.get_base64()} test@host"}


@pytest.fixture(scope="module")
def first(image, volumes):
    env = {"JUPYTER_PASSWORD": "first-jupyter-pw", "SSH_PUBLIC_KEY": volumes["pubkey"],
           "JUPYTER_TOKEN": "leaky-token", "JUPYTER_PORT": str(free_port()), "SSH_PORT": str(free_port())}
    c = Container(f"desktune-test-{SESSION}-1", image, env, volumes["workspace"], volumes["keys"])
    try:
        c.wait_ready()
        yield c
    finally:
        c.remove()


def ssh(port: int, username: str, password: str | None = None, pkey=None, command: str = "true"):
    """(exit status, stdout, host key fingerprint); raises paramiko's AuthenticationException."""
    import paramiko

    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect("127.0.0.1", port=port, username=username, password=password, pkey=pkey,
                       allow_agent=False, look_for_keys=False, timeout=30, auth_timeout=30)
        fingerprint = client.get_transport().get_remote_server_key().fingerprint
        _, stdout, _ = client.exec_command(command, timeout=120)
        out = stdout.read().decode()
        return stdout.channel.recv_exit_status(), out, fingerprint
    finally:
        client.close()


# ------------------------------------------------------------------------------ the build


def test_build_checked_triton_for_the_target_arch_without_a_gpu(image):
    assert "warm-triton: Triton 3.6.0 compiles for sm_120" in image["log"]
    assert "BUILD_XFORMERS=0: no xformers in this image" in image["log"]


def test_image_config_has_entrypoint_healthcheck_and_no_secret(image):
    cfg = image["config"]["Docker"]["config"]
    assert cfg["Entrypoint"] == ["tini", "-g", "--", "/usr/local/bin/start.sh"]
    assert cfg["Healthcheck"]["Test"][0] == "CMD" and cfg["Healthcheck"]["Test"][-1].endswith("healthcheck.py")
    assert not [e for e in cfg["Env"] if re.search(r"PASSWORD|TOKEN|SECRET", e.split("=")[0])]
    assert {"8888/tcp", "22/tcp"} <= set(cfg["ExposedPorts"])


# --------------------------------------------------------------------- the first container


def test_started_healthy_after_gpu_preflight(first):
    env = {"PATH": os.environ["PATH"], "JUPYTER_PORT": first.env["JUPYTER_PORT"], "SSH_PORT": first.env["SSH_PORT"]}
    deadline = time.monotonic() + 120
    while subprocess.run([sys.executable, str(LIB / "healthcheck.py")], env=env, capture_output=True).returncode:
        assert time.monotonic() < deadline, first.logs()[-3000:]
        time.sleep(1)
    logs = first.logs()
    assert "desktune doctor" in logs and "No CUDA GPU is visible" in logs
    assert "first-jupyter-pw" not in logs and "generated" not in logs


def test_ssh_password_login_gets_the_notebook_environment(first, volumes):
    rc, out, _ = ssh(int(first.env["SSH_PORT"]), "desktune", "first-jupyter-pw",  # SSH falls back to it
                     command='id -u; echo "$PATH"; python -c "import desktune, sys; print(sys.prefix)"; '
                             'cd "$WORKSPACE" && pwd && touch from-ssh.txt; env')
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == str(WS_UID)
    assert lines[1].startswith("/opt/venv/bin:")
    assert lines[2] == "/opt/venv" and lines[3] == "/workspace/work"
    env_names = {line.split("=", 1)[0] for line in lines[4:] if "=" in line}
    assert not env_names & set(SECRET_NAMES) and "first-jupyter-pw" not in out and "leaky-token" not in out
    st = (volumes["workspace"] / "from-ssh.txt").stat()
    assert (st.st_uid, st.st_gid) == (WS_UID, WS_GID)


def test_image_stack_and_no_baked_host_keys(first, volumes):
    # Both host keys were made at start, in the volume (0700 root: checked from the host).
    assert sorted(p.name for p in volumes["keys"].glob("*.pub")) == ["ssh_host_ed25519_key.pub", "ssh_host_rsa_key.pub"]
    rc, out, _ = ssh(int(first.env["SSH_PORT"]), "desktune", "first-jupyter-pw", command=(
        "ls /etc/ssh | grep -c '^ssh_host_' || true; "
        "python -c 'import torch, transformers, peft, trl, bitsandbytes, desktune, jupyterlab; "
        "print(torch.__version__, transformers.__version__, peft.__version__)'; "
        "stat -c %G /opt/venv; id -Gn; command -v gcc tini sshd"))
    assert rc == 0, out
    lines = out.split()
    assert lines[0] == "0"  # no host key baked into the image's /etc/ssh
    pins = dict(line.split("==") for line in (REPO / "docker" / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert lines[1].startswith("2.13.0") and lines[2] == pins["transformers"] and lines[3] == pins["peft"]
    assert lines[4] == "desktune-venv" and "desktune-venv" in lines[5:-3]  # pip install works from notebooks
    assert [Path(p).name for p in lines[-3:]] == ["gcc", "tini", "sshd"]


def test_ssh_key_login(first, volumes):
    rc, out, _ = ssh(int(first.env["SSH_PORT"]), "desktune", pkey=volumes["key"], command="id -un")
    assert (rc, out.strip()) == (0, "desktune")


@pytest.mark.parametrize("user, password", [("desktune", "wrong-password"), ("root", "first-jupyter-pw"),
                                            ("daemon", "first-jupyter-pw"), ("nobody", "first-jupyter-pw")])
def test_ssh_refuses_wrong_password_root_and_other_users(first, user, password):
    import paramiko

    with pytest.raises(paramiko.AuthenticationException):
        ssh(int(first.env["SSH_PORT"]), user, password)


def test_ssh_refuses_root_even_with_the_authorized_key(first, volumes):
    import paramiko

    with pytest.raises(paramiko.AuthenticationException):
        ssh(int(first.env["SSH_PORT"]), "root", pkey=volumes["key"])


def test_jupyter_password_only_token_off(first):
    port = int(first.env["JUPYTER_PORT"])
    assert JupyterClient(port).request("GET", "/api/contents?token=leaky-token")[0] == 403
    assert JupyterClient(port).request("GET", "/api/contents", headers={"Authorization": "token leaky-token"})[0] == 403
    wrong = JupyterClient(port)
    assert wrong.login("wrong-password") == 401
    assert wrong.api("GET", "/api/contents")[0] == 403
    right = JupyterClient(port)
    assert right.login("first-jupyter-pw") == 302
    assert right.api("GET", "/api/contents")[0] == 200


TRAIN_CODE = r"""
import os, torch, desktune
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
print("LEAKED", sorted(k for k in os.environ if "PASSWORD" in k or k.startswith("JUPYTER_TOKEN")))
print("UID", os.getuid(), "DESKTUNE", desktune.__version__)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
x = torch.randint(0, 128, (2, 16))
losses = []
for _ in range(8):
    loss = model(input_ids=x, labels=x).loss
    loss.backward(); opt.step(); opt.zero_grad(); losses.append(round(loss.item(), 4))
print("LOSSES", losses)
open(os.path.join(os.environ["WORKSPACE"], "from-kernel.txt"), "w").write("written by a kernel")
"""


def test_kernel_imports_desktune_trains_and_sees_no_secret(first, volumes):
    client = JupyterClient(int(first.env["JUPYTER_PORT"]))
    assert client.login("first-jupyter-pw") == 302
    out = run_in_kernel(client, TRAIN_CODE)
    assert "LEAKED []" in out
    assert f"UID {WS_UID} DESKTUNE" in out
    losses = json.loads(re.search(r"LOSSES (\[.*\])", out).group(1))
    assert len(losses) == 8 and all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    st = (volumes["workspace"] / "from-kernel.txt").stat()
    assert (st.st_uid, st.st_gid) == (WS_UID, WS_GID)


def test_example_notebooks_copied_into_the_workspace(first, volumes):
    shipped = {p.name for p in (REPO / "notebooks").glob("*.ipynb")}
    examples = volumes["workspace"] / "examples"
    copied = {p.name for p in examples.glob("*.ipynb")} if examples.exists() else set()
    assert copied == shipped
    for p in examples.glob("*.ipynb"):
        assert p.stat().st_uid == WS_UID


def _cdp(ws, method: str, **params):
    _cdp.counter = getattr(_cdp, "counter", 0) + 1
    ws.send(json.dumps({"id": _cdp.counter, "method": method, "params": params}))
    while True:
        msg = json.loads(ws.recv())
        if msg.get("id") == _cdp.counter:
            if "error" in msg:
                raise AssertionError(f"{method}: {msg['error']}")
            return msg["result"]


def _js(ws, expression: str):
    return _cdp(ws, "Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def test_chromium_logs_in_through_the_form_and_screenshots_jupyterlab(first, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing: scripts/test-apt-packages.txt lists it"
    import websocket

    port = free_port()
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
         f"--remote-debugging-port={port}", "--remote-allow-origins=*", "--window-size=1400,900",
         f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 60, alive=lambda: browser.poll() is None)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        base = f"http://127.0.0.1:{first.env['JUPYTER_PORT']}"

        def wait_for(expression: str, timeout: float = 120):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                value = _js(ws, expression)
                if value:
                    return value
                time.sleep(0.5)
            raise AssertionError(f"timed out waiting for {expression}; page at {_js(ws, 'location.href')}")

        _cdp(ws, "Page.navigate", url=f"{base}/lab")
        wait_for("location.pathname === '/login' && !!document.querySelector('input[name=password]')")
        _js(ws, "document.querySelector('input[name=password]').value = 'first-jupyter-pw';"
                "document.querySelector('input[name=password]').form.submit(); true")
        wait_for("location.pathname.startsWith('/lab') && !!document.querySelector('.jp-LabShell')", 180)
        # The file browser lists the workspace (the examples folder start.sh made).
        wait_for("[...document.querySelectorAll('.jp-DirListing-item')]"
                 ".some(e => e.textContent.includes('examples'))", 120)
        time.sleep(2)  # let the layout settle before the picture
        png = base64.b64decode(_cdp(ws, "Page.captureScreenshot", format="png")["data"])
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "jupyterlab.png").write_bytes(png)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        ws.close()
    finally:
        browser.terminate()
        browser.wait(timeout=30)


def test_sigterm_stops_both_services_in_seconds(first):
    host_key = ssh(int(first.env["SSH_PORT"]), "desktune", "first-jupyter-pw")[2]
    first.host_key = host_key
    os.kill(first.pid_of("tini"), signal.SIGTERM)
    start = time.monotonic()
    assert first.wait_exit(60) == 0
    assert time.monotonic() - start < 30, "stopping took longer than the grace period allows"
    assert "stop requested: stopping sshd and Jupyter" in first.logs()


# ----------------------------------------------------- a re-created container, same volumes


@pytest.fixture(scope="module")
def second(image, volumes, first):
    assert first.proc.poll() is not None, "the first container must be stopped first"
    env = {"JUPYTER_PORT": str(free_port()), "SSH_PORT": str(free_port()), "SSH_PASSWORD": "second-ssh-pw"}
    c = Container(f"desktune-test-{SESSION}-2", image, env, volumes["workspace"], volumes["keys"])
    try:
        c.wait_ready()
        yield c
    finally:
        c.remove()


def test_recreated_container_keeps_host_key_and_generates_a_password(first, second):
    m = re.search(r"shown only here: (\S+)", second.logs())
    assert m, second.logs()[-3000:]
    generated = m.group(1)
    assert len(generated) >= 20
    assert JupyterClient(int(second.env["JUPYTER_PORT"])).login(generated) == 302
    rc, _, fingerprint = ssh(int(second.env["SSH_PORT"]), "desktune", "second-ssh-pw")
    assert rc == 0
    assert fingerprint == first.host_key


def test_a_dead_service_stops_the_container_with_its_code(second):
    os.kill(second.pid_of("jupyter-lab"), signal.SIGKILL)
    assert second.wait_exit(60) == 137
    logs = second.logs()
    assert "jupyter exited with code 137" in logs
    assert not [argv for argv in second.descendants().values() if "sshd" in " ".join(argv)]
