"""Shared by the image tests: paths, free ports, and clients for Jupyter's login and SSH."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.cookiejar import CookieJar
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
LIB = DOCKER / "lib"
ARTIFACTS = REPO / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process serving port {port} exited before it listened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # keep 302s visible to the test
        return None


class JupyterClient:
    """Logs in through Jupyter's real /login form (cookie + _xsrf), like a browser does."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def xsrf(self) -> str:
        for c in self.jar:
            if c.name == "_xsrf":
                return c.value
        return ""

    def login(self, password: str) -> int:
        self.request("GET", "/login")
        form = urllib.parse.urlencode({"password": password, "_xsrf": self.xsrf()}).encode()
        status, headers, _ = self.request(
            "POST", "/login?next=%2Flab", form, {"Content-Type": "application/x-www-form-urlencoded"}
        )
        return status

    def api(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        return self.request(method, path, data, {"X-XSRFToken": self.xsrf(), "Content-Type": "application/json"})

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


def run_in_kernel(client: JupyterClient, code: str, timeout: float = 300) -> str:
    """Starts a kernel through the REST API, runs `code` over the websocket, returns its stdout.

    Raises AssertionError with the traceback when the code raises.
    """
    import asyncio

    import tornado.httpclient
    import tornado.websocket

    status, _, body = client.api("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, (status, body)
    kernel_id = json.loads(body)["id"]
    ws_url = client.base.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels"

    async def go() -> str:
        req = tornado.httpclient.HTTPRequest(ws_url, headers={"Cookie": client.cookie_header(),
                                                               "X-XSRFToken": client.xsrf()})
        conn = await tornado.websocket.websocket_connect(req)
        msg_id = uuid.uuid4().hex
        conn.write_message(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        out: list[str] = []
        error = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = await conn.read_message()
            if raw is None:
                raise AssertionError("the kernel websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])
            elif kind == "error":
                error = "\n".join(msg["content"]["traceback"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
        conn.close()
        if error is not None:
            raise AssertionError("the kernel raised:\n" + re.sub(r"\x1b\[[0-9;]*m", "", error))
        return "".join(out)

    try:
        return asyncio.run(asyncio.wait_for(go(), timeout + 30))
    finally:
        client.api("DELETE", f"/api/kernels/{kernel_id}")
