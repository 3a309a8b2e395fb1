"""The errors a user can cause and fix, each shown as one screen without a traceback (a leaf: imports nothing of
ours). The CLI maps every `TrainerError` to its message and exit code; anything else is a bug and keeps its
traceback.

- `ConfigError` (exit 2): the recipe or its overrides, listing every problem at once as `Problem`s.
- `DataError`, `CheckpointError`, `UnsafeFileError`, `LossScaleCollapsed` (exit 1): what a run met while
  running, each message saying what was found and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EXIT_RECIPE = 2
EXIT_RUNTIME = 1
SHOWN_CHARS = 160  # a value in a message is cut to this many characters (a path fits)


def show_value(value: Any) -> str:
    """A value as a message shows it: YAML-like, cut to SHOWN_CHARS. A huge value (a YAML alias bomb, a long
    list) is never turned into one long string first: containers are described, strings sliced before repr."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value[:SHOWN_CHARS + 1])
    elif isinstance(value, dict):
        text = "{...}" if value else "{}"
    elif isinstance(value, (list, tuple)):
        text = _show_list(value)
    else:
        text = str(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _show_list(items: list[Any] | tuple[Any, ...]) -> str:
    shown: list[str] = []
    for item in items:
        shown.append(show_value(item))
        if sum(len(s) + 2 for s in shown) > SHOWN_CHARS:
            return "[" + ", ".join(shown) + ", ...]"
    return "[" + ", ".join(shown) + "]"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: the dotted key, what was given, where it came from, and what to do."""

    key: str
    value: Any
    message: str
    source: str = ""

    def render(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.key} = {show_value(self.value)}{where}: {self.message}"


class TrainerError(Exception):
    """An error the user can fix; str() is the whole message."""

    exit_code = EXIT_RUNTIME


class ConfigError(TrainerError):
    """A recipe with problems; str() is the one-screen message shown to the user."""

    exit_code = EXIT_RECIPE

    def __init__(self, problems: list[Problem], origin: str = "recipe") -> None:
        self.problems = problems
        self.origin = origin
        lines = [f"{origin} has {len(problems)} problem{'s' if len(problems) != 1 else ''}:"]
        lines += [f"  - {p.render()}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(TrainerError):
    """The data cannot be used as configured; the message says what is wrong and what to change."""


class CheckpointError(TrainerError):
    """A checkpoint that cannot be used, or a resume that would not continue the same run."""


class UnsafeFileError(TrainerError):
    """A file that would need arbitrary code to load (or is not a torch file at all)."""


class LossScaleCollapsed(TrainerError):
    """fp16 overflowed on too many consecutive steps."""
