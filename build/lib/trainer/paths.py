"""How a recipe's path-or-name values are read: a local path, or a hub name."""

from __future__ import annotations

from pathlib import Path


def looks_local(value: str) -> bool:
    """True for a value meant as a local path (absolute, relative with ./ or ../, ~, or an existing path); False
    for a hub name like `org/name`, which is only a path when it exists."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()
