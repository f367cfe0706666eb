"""Entry point of the `desktune` command.

Each subcommand lives in its own module under desktune.cli and exposes
`register(subparsers)`, which adds its parser and sets `func` to the handler.
Handlers return the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `desktune --help` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = ("doctor", "train", "merge", "export", "bench", "plan")


def build_parser() -> argparse.ArgumentParser:
    from desktune import __version__

    parser = argparse.ArgumentParser(prog="desktune", description="Fast LoRA / QLoRA fine-tuning on one GPU.")
    parser.add_argument("--version", action="version", version=f"desktune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"desktune.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
