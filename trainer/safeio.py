"""File I/O that never runs code from a file and never leaves half-written files behind.

`load_tensors` reads torch files with `weights_only=True`: a file holding pickled code (a crafted `__reduce__`)
is refused with `UnsafeFileError` instead of being executed. Writes go to a temporary name in the same folder,
are fsynced, then renamed over the target, so a crash leaves the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UnsafeFileError


def load_tensors(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers; pickled code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"refusing to load {path}: it contains objects other than tensors and plain data (pickled code "
            f"would run on load). If you did not create this file, delete it. Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise UnsafeFileError(f"cannot read {path}: not a valid torch file ({str(e).splitlines()[0]})") from None


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_tensors(obj: Any, path: Path) -> None:
    """torch.save then fsync (callers write inside a temporary checkpoint folder)."""
    torch.save(obj, path)
    fsync_file(path)


def write_json(obj: Any, path: Path) -> None:
    """Atomically replace `path` with `obj` as JSON."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
