#!/usr/bin/env python3
"""Docker HEALTHCHECK: healthy when Jupyter answers /api and sshd sends its banner."""

import os
import socket
import sys
import urllib.request


def main() -> int:
    jupyter_port = int(os.environ.get("JUPYTER_PORT", "8888"))
    ssh_port = int(os.environ.get("SSH_PORT", "22"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{jupyter_port}/api", timeout=5) as r:
            if r.status != 200:
                print(f"jupyter: HTTP {r.status}")
                return 1
        with socket.create_connection(("127.0.0.1", ssh_port), timeout=5) as s:
            banner = s.recv(64)
            if not banner.startswith(b"SSH-"):
                print(f"sshd: unexpected banner {banner!r}")
                return 1
    except OSError as e:
        print(f"unhealthy: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
