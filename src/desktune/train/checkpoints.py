"""Atomic checkpoints: a checkpoint folder either is complete or does not exist.

transformers' Trainer writes `checkpoint-N/` file by file, so a run killed mid-save
leaves a folder that `--resume` would pick as the latest and then fail on (or load a
half-written optimizer from). Here each checkpoint is written under
`<run>/.staging/checkpoint-N`, every file and folder is fsync'ed, and only then is it
renamed to `<run>/checkpoint-N` (a rename within one filesystem is atomic), followed
by an fsync of the run folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder`, then every folder bottom-up (entries before their parent)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: str | Path, final: str | Path) -> None:
    """Make the complete folder `staged` appear as `final` in one rename (replacing an older `final`)."""
    staged, final = Path(staged), Path(final)
    fsync_tree(staged)
    if final.exists():  # the same step saved again (e.g. after a resume): move the old one aside first
        old = final.parent / STAGING / f"{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)
    fsync_dir(final.parent)


def clean_staging(run_dir: str | Path) -> None:
    """Drop half-written checkpoints a killed run left behind."""
    shutil.rmtree(Path(run_dir) / STAGING, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def last_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def rotate(run_dir: str | Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (None keeps every one)."""
    if keep is None or keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
