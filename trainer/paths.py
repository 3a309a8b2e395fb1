"""How a recipe's path-or-name values are read: a local path, or a hub name; where the shipped recipes are."""

from __future__ import annotations

from pathlib import Path

# The shipped recipes: the repository's top-level recipes/ folder, which trainer/recipes links to, so a clone, an
# editable install and a built wheel (which packs them as package data) all find them here.
SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"


def shipped_recipes(folder: Path = SHIPPED_RECIPES) -> dict[str, Path]:
    """The recipes shipped in the package by name (their path under the folder, without .yaml), sorted: the names
    `recipes list`, `recipes copy` and the did-you-mean of a missing recipe path use."""
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in sorted(folder.rglob("*.yaml"))}


def looks_local(value: str) -> bool:
    """True for a value meant as a local path (absolute, relative with ./ or ../, ~, or an existing path); False
    for a hub name like `org/name`, which is only a path when it exists."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()
