"""The errors a user can cause and fix, each shown as one screen without a traceback (a leaf: imports nothing of
ours). The CLI maps every `TrainerError` to its message and exit code; anything else is a bug and keeps its
traceback.

- `ConfigError` (exit 2): the recipe or its overrides, listing every problem at once as `Problem`s.
- `DataError`, `CheckpointError`, `UnsafeFileError`, `LossScaleCollapsed` (exit 1): what a run met while
  running, each message saying what was found and what to do.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Callable

EXIT_RECIPE = 2
EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by Ctrl-C
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


KeySource = Callable[[str], str]  # where a recipe key's value came from: 'command line', 'recipe' or 'default'


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
    """An error the user can fix; str() is the whole message. `on_every_rank`: every rank of a job raises the same
    one (the ranks agreed on it), so under torchrun only rank 0 shows it. `exit_code` may be given per error."""

    exit_code = EXIT_RUNTIME
    on_every_rank = False

    def __init__(self, message: str = "", *, on_every_rank: bool | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        if on_every_rank is not None:
            self.on_every_rank = on_every_rank
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(TrainerError):
    """A recipe with problems; str() is the one-screen message shown to the user. Every rank resolves the same
    recipe, so every rank finds the same problems."""

    exit_code = EXIT_RECIPE
    on_every_rank = True

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
    """fp16 overflowed on too many consecutive steps (the ranks share one loss scale)."""

    on_every_rank = True


class TrainingDiverged(TrainerError):
    """The loss or the gradient norm became NaN or inf (outside fp16's loss scaling); decided on global numbers."""

    on_every_rank = True


class NotSharded(TrainerError):
    """A rank holds more of the frozen base than the memory plan's share for it (ZeRO-3 did not partition it);
    decided on every rank's measurement."""

    on_every_rank = True


def os_error_message(e: OSError) -> str:
    """An OSError as a user reads it: what failed, on which path, and what usually fixes it."""
    hints = {errno.ENOSPC: "the disk is full: free space or choose another output_dir",
             errno.EFBIG: "the file grew past a size limit (ulimit -f, or the filesystem's): raise it or choose "
                          "another output_dir",
             errno.EDQUOT: "the disk quota is exhausted: free space or choose another output_dir",
             errno.EACCES: "no permission: fix the permissions or choose another path",
             errno.EPERM: "not permitted: fix the permissions or choose another path",
             errno.EROFS: "the filesystem is read-only: choose another output_dir",
             errno.ENOENT: "it does not exist: check the path",
             errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
             errno.EISDIR: "it is a directory where a file was expected: check the path"}
    where = f" {e.filename!r}" if e.filename else ""
    hint = hints.get(e.errno or -1, "check the path and the disk")
    return f"{e.strerror or e}{where}: {hint}"
