"""The errors a user can cause and fix, each shown as one screen without a traceback (a leaf: imports nothing of
ours). The CLI maps every `TrainerError` to its message and exit code; anything else is a bug and keeps its
traceback.

- `ConfigError` (exit 2): the recipe or its overrides, listing every problem at once as `Problem`s.
- `DataError`, `CheckpointError`, `UnsafeFileError`, `LossScaleCollapsed`, `HubError` (exit 1): what a run met
  while running, each message saying what was found and what to do.
- `os_error_message`, `library_error_message`: an OSError or a library's error (safetensors, the Hugging Face hub)
  as one screen, with the fix for that kind of failure.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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


class HubError(TrainerError):
    """A model or tokenizer could not be fetched from the Hugging Face hub: not in the local cache while offline or
    without network, gated, private or not there."""


# Fix texts per errno: what usually causes it and what to do. An errno not listed gets no invented advice.
OS_ERROR_FIXES = {
    errno.ENOSPC: "the disk is full: free space or choose another output_dir",
    errno.EFBIG: "the file grew past a size limit (ulimit -f, or the filesystem's): raise it or choose another "
                 "output_dir",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another output_dir",
    errno.EACCES: "no permission: fix the permissions or choose another path",
    errno.EPERM: "not permitted: fix the permissions or choose another path",
    errno.EROFS: "the filesystem is read-only: choose another output_dir",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "it is a directory where a file was expected: check the path",
    errno.EEXIST: "it already exists: remove it or choose another path",
    errno.ENOTEMPTY: "the directory is not empty: remove what is in it or choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.ELOOP: "the path has a loop of symbolic links: fix the links",
    errno.EXDEV: "a rename across two filesystems: keep the path on the filesystem of output_dir",
    errno.EBUSY: "it is in use by another process: stop that process or choose another path",
    errno.ETXTBSY: "it is in use by another process: stop that process or choose another path",
    errno.EMFILE: "this process has too many files open: raise the limit (ulimit -n)",
    errno.ENFILE: "the system has too many files open: close other programs or raise the system's limit",
    errno.ENOMEM: "out of memory: use less (a smaller micro-batch, gradient checkpointing) or stop other programs",
    errno.EIO: "the disk or network filesystem reported an I/O error: check the device (dmesg) and retry",
    errno.ESTALE: "the network filesystem lost the file (stale handle): remount it or retry",
    errno.EPIPE: "the program at the other end of a pipe has exited",
    errno.ECONNREFUSED: "nothing is listening at that address: check the host and port, and that the server runs",
    errno.ECONNRESET: "the other side closed the connection: check that it is still running, then retry",
    errno.ETIMEDOUT: "the connection timed out: check the network and the address",
    errno.ENETUNREACH: "the network is unreachable: check this machine's network",
    errno.EHOSTUNREACH: "the host is unreachable: check the network and the address",
}

CONNECTION_FAILURES = frozenset({"ConnectError", "ConnectTimeout", "ReadTimeout", "ConnectionError", "Timeout",
                                 "TimeoutError", "gaierror", "ProxyError", "SSLError"})


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and every exception it was raised from or while handling."""
    seen: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and not any(current is s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _class_names(e: BaseException) -> set[str]:
    return {cls.__name__ for x in _chain(e) for cls in type(x).__mro__}


def _from_the_hub(e: BaseException) -> bool:
    """Whether the chain shows huggingface_hub's own errors or transformers' message for a failed hub fetch."""
    return any(type(x).__module__.startswith("huggingface_hub") or "couldn't connect to 'https://huggingface.co'"
               in str(x) for x in _chain(e))


def download_advice(name: str | None) -> str:
    """How to get a hub model onto a machine, or name a local copy instead."""
    repo = name or "ORG/NAME"
    return (f"download it first where the hub can be reached (`hf download {repo}`, or `huggingface-cli download "
            f"{repo}` with an older huggingface_hub) into the cache this machine reads (HF_HOME), or give a local "
            "directory that holds it")


def hub_problem(e: BaseException, name: str | None = None, fetching: bool = False) -> str | None:
    """What went wrong fetching `name` from the Hugging Face hub, and the fix; None when `e` is no hub failure.
    `fetching`: `e` came out of a from_pretrained call, so a bare connection error is the hub's too."""
    names = _class_names(e)
    if not fetching and not _from_the_hub(e):
        return None
    what = repr(name) if name else "a model or tokenizer the recipe names by hub id"
    if "GatedRepoError" in names:
        return (f"{what} is gated on the Hugging Face hub: accept its terms on its page, then log in with an account "
                "that has access (`hf auth login`, or set HF_TOKEN)")
    if "RepositoryNotFoundError" in names:
        return (f"{what} is not on the Hugging Face hub, or is private: check the name (a local directory must "
                "exist), and log in (`hf auth login`) if it is private")
    if "RevisionNotFoundError" in names:
        return f"{what}: the hub has no such revision: check model.revision"
    offline = "OfflineModeIsEnabled" in names or any("outgoing traffic has been disabled" in str(x) for x in _chain(e))
    if offline:
        return f"{what} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids the network: " \
            + download_advice(name)
    if names & CONNECTION_FAILURES or "LocalEntryNotFoundError" in names:
        return f"{what} is not in the local Hugging Face cache, and the hub cannot be reached: " + download_advice(name)
    return None


@contextmanager
def fetching_from_hub(name: str) -> Iterator[None]:
    """Around a `from_pretrained(name)`: a failure to fetch `name` from the hub becomes a HubError naming it and the
    fix (transformers raises an OSError, or the HTTP client's own error, either way ending in a traceback or in
    advice about paths and disks)."""
    try:
        yield
    except Exception as e:
        message = hub_problem(e, name, fetching=True)
        if message is None:
            raise
        raise HubError(message) from e


def os_error_message(e: OSError) -> str:
    """An OSError as a user reads it: what failed, on which path, and what fixes that kind of failure."""
    hub = hub_problem(e)
    if hub:
        return hub
    where = f" {e.filename!r}" if e.filename else ""
    if type(e).__name__ == "gaierror":
        hint = "a host name could not be resolved: check the network (DNS) and the name"
    else:
        hint = OS_ERROR_FIXES.get(e.errno or -1, "check that path" if e.filename else "")
    text = f"{e.strerror or e}{where}"
    return f"{text}: {hint}" if hint else text


def library_error_message(e: Exception) -> str | None:
    """A library's error the user can fix, as one screen; None for anything else (a bug: its traceback is kept)."""
    if type(e).__name__ == "SafetensorError":  # safetensors' I/O errors ("File too large", a full disk)
        return f"writing or reading a safetensors file failed: {e}; check the free space and permissions of the " \
               "output directory"
    return hub_problem(e)
