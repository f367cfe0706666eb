"""Saving adapters safely: refuse a folder holding another model, write atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from desktune.errors import AdapterFolderConflictError


def check_adapter_folder(folder: Path, base_model: str | None) -> None:
    """Raise if `folder` already holds a full model or an adapter of another base model."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise AdapterFolderConflictError(f"{str(folder)!r} is a file; choose a folder to save the adapter in")
    if (folder / "config.json").exists():
        raise AdapterFolderConflictError(
            f"{str(folder)!r} already holds a full model (config.json); saving an adapter there would mix two "
            f"models. Save the adapter to an empty folder or to one that holds this model's adapter."
        )
    existing = folder / "adapter_config.json"
    if existing.exists() and base_model is not None:
        try:
            other = json.loads(existing.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            other = None
        if other not in (None, base_model):
            raise AdapterFolderConflictError(
                f"{str(folder)!r} already holds an adapter for base model {other!r}, not {base_model!r}. Save to "
                f"another folder, or delete that adapter first if you no longer need it."
            )


def write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Run write(tmp) into a temporary sibling folder, then move its files into `folder`.

    A crash mid-write leaves the previous files intact (each file is moved with
    os.replace, which is atomic on one filesystem).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if not folder.exists():
            os.replace(tmp, folder)
            return
        for path in sorted(tmp.rglob("*")):
            target = folder / path.relative_to(tmp)
            if path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(peft_model, save_directory, original_save: Callable, **kwargs) -> None:
    folder = Path(os.path.expanduser(str(save_directory)))
    config = peft_model.peft_config.get(getattr(peft_model, "active_adapter", "default"))
    base = getattr(config, "base_model_name_or_path", None) if config is not None else None
    check_adapter_folder(folder, base)
    write_atomically(folder, lambda tmp: original_save(str(tmp), **kwargs))
