#!/usr/bin/env python3
"""Writes Jupyter Server's config for start.sh: password login only, stored as an argon2 hash.

Usage: jupyter-config.py --out FILE --port N --root-dir DIR [--owner UID:GID] < password
The password comes on stdin, never in argv (argv is visible in `ps`). Token login is off, and
so is changing the password from the UI (it is set from the environment at every start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MIN_PASSWORD_LENGTH = 8


def build_config(hashed_password: str, port: int, root_dir: str) -> dict:
    return {
        "ServerApp": {
            # The container's port is published on 127.0.0.1 by compose; inside it, listen on all.
            "ip": "0.0.0.0",
            "port": port,
            "port_retries": 0,
            "open_browser": False,
            "root_dir": root_dir,
            # Requests arrive through Docker's port forwarding, not from loopback.
            "allow_remote_access": True,
        },
        "IdentityProvider": {"token": ""},
        "PasswordIdentityProvider": {
            "hashed_password": hashed_password,
            "password_required": True,
            "allow_password_change": False,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root-dir", required=True)
    parser.add_argument("--owner", help="UID:GID that owns the file (the only reader)")
    args = parser.parse_args(argv)

    password = sys.stdin.read().rstrip("\n")
    if len(password) < MIN_PASSWORD_LENGTH:
        print(f"jupyter-config.py: the password has {len(password)} characters; use at least "
              f"{MIN_PASSWORD_LENGTH}", file=sys.stderr)
        return 2
    from jupyter_server.auth import passwd

    config = build_config(passwd(password, algorithm="argon2"), args.port, args.root_dir)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # Created 0600 before anything is written, so the hash is never readable by others.
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    if args.owner:
        uid, gid = (int(x) for x in args.owner.split(":"))
        os.fchown(fd, uid, gid)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
