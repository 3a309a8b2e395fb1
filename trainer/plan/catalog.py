"""The shipped recipes: `python -m trainer recipes` lists them, `python -m trainer recipes copy NAME DEST` copies
one to edit. They live in the repository's top-level `recipes/` folder; `trainer/recipes` points there, so the same
files are found from a clone, an editable install and a built wheel (which packs them as package data).

The planned peak listed is the plan's own, computed here for the number of GPUs the recipe's header names (`# plan:
N x 24GiB, ...`): the header's figure is a note for its reader, and can lag behind the plan's formulas."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import TrainerError
from trainer.paths import SHIPPED_RECIPES, shipped_recipes
from trainer.plan.items import GiB
from trainer.plan.peak import plan
from trainer.recipe.resolve import resolve

RECIPES = SHIPPED_RECIPES
PLAN = re.compile(r"# plan: (\d+) x (\S+), planned peak")


@dataclass(frozen=True)
class ShippedRecipe:
    name: str  # the path under recipes/ without .yaml, e.g. 24gb/llama3-8b-qlora
    path: Path
    description: str  # the header's first sentence
    gpus: str  # e.g. "2 x 24GiB", or "" when the header gives no plan
    world_size: int  # the header's number of GPUs (1 when it gives none)


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return lines


def _describe(name: str, path: Path) -> ShippedRecipe:
    header = _header(path)
    text = " ".join(line for line in header if line and not line.startswith(("plan:", "launch:")))
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    sentence = sentence if len(sentence) <= 110 else sentence[:107].rsplit(" ", 1)[0] + "..."
    header_plan = PLAN.search(path.read_text(encoding="utf-8"))
    return ShippedRecipe(name, path, sentence, header_plan.group(1) + " x " + header_plan.group(2) if header_plan
                         else "", int(header_plan.group(1)) if header_plan else 1)


def shipped() -> list[ShippedRecipe]:
    return [_describe(name, path) for name, path in shipped_recipes(RECIPES).items()]


def planned_peak(recipe: ShippedRecipe) -> str:
    """The plan's predicted peak per GPU, e.g. "15.25 GiB per GPU", for a recipe whose header gives a plan; "" for
    the others (they run on this machine, or need files an earlier command makes)."""
    if not recipe.gpus:
        return ""
    return f"{plan(resolve(recipe.path, world_size=recipe.world_size)).peak_bytes / GiB:.2f} GiB per GPU"


def table() -> str:
    """The list `python -m trainer recipes` prints."""
    recipes = shipped()
    width = max(len(r.name) for r in recipes)
    lines = [f"{'recipe':<{width}}  {'GPUs':<10}  {'planned peak':<18}  what", ""]
    for r in recipes:
        lines.append(f"{r.name:<{width}}  {r.gpus or '-':<10}  {planned_peak(r) or '-':<18}  {r.description}")
    lines += ["", f"(in {RECIPES}; copy one to edit: python -m trainer recipes copy NAME DEST)"]
    return "\n".join(lines)


def copy(name: str, dest: Path, force: bool = False) -> Path:
    """Copy a shipped recipe to `dest` (a file, or a folder to put it in); never over a file unless `force`."""
    found = {r.name: r for r in shipped()}
    recipe = found.get(name.removesuffix(".yaml")) or next((r for r in found.values() if r.path.stem == name), None)
    if recipe is None:
        raise TrainerError(f"no shipped recipe {name!r}; `python -m trainer recipes` lists them: "
                           + ", ".join(sorted(found)))
    target = dest / recipe.path.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise TrainerError(f"{target} exists; choose another destination or pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe.path, target)
    return target
