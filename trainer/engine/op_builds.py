"""DeepSpeed's C++ ops are compiled on first use into the extensions cache (TORCH_EXTENSIONS_DIR), one folder per op,
guarded by a `lock` file that torch's builder creates and removes. A run killed during a build (Ctrl-C, a timeout,
an OOM kill, a preemption) leaves the lock behind, and every later run that needs the op then waits for it forever,
silently, at 0% CPU. Here:

- `clear_stale_locks` removes a lock that was left before this process started and that no live process holds
  (on Linux: no process runs in, or names, that op's folder, which a compiler or ninja building it always does), or
  that is older than STALE_AFTER_S, saying so in one line. A lock younger than this process is always kept: the
  builder holds its lock for a moment before ninja starts and after it ends (with a built op, ninja only checks and
  exits), and the other ranks of the same launch, started at the same time, must not take it for a stale one;
- `BuildWatch` logs, every REPORT_EVERY_S seconds while a lock exists, which op is being built or waited for, so a
  long wait is never silent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)
LOCK = "lock"
STALE_AFTER_S = 3600.0  # no build takes an hour; a lock older than that is left over wherever its holder runs
REPORT_EVERY_S = 30.0


def _processes_using(folder: Path) -> list[int]:
    """Pids of processes whose working directory is in `folder` or whose command line names it (Linux /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    target = str(folder.resolve())
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if cwd == target or cwd.startswith(target + os.sep) or target in cmdline:
            found.append(int(entry.name))
    return found


def locks(extensions_dir: Path) -> list[Path]:
    return sorted(extensions_dir.glob(f"*/{LOCK}")) if extensions_dir.is_dir() else []


def clear_stale_locks(extensions_dir: Path, started_at: float | None = None) -> list[Path]:
    """Remove the build locks left before `started_at` (default: when this process started) that nobody holds, and
    those older than STALE_AFTER_S; returns those removed."""
    started_at = psutil.Process().create_time() if started_at is None else started_at
    removed = []
    for lock in locks(extensions_dir):
        try:
            made = lock.stat().st_mtime
        except FileNotFoundError:
            continue
        age = time.time() - made
        if age < STALE_AFTER_S and made >= started_at:
            continue  # made while this process runs: by another rank of this launch, or another live run
        builders = _processes_using(lock.parent)
        if builders and age < STALE_AFTER_S:
            continue
        why = f"{age:.0f} s old" + ("" if builders else ", and no process is building it")
        log.warning("removing a stale build lock of DeepSpeed's %s op (%s; %s): an earlier run was stopped while "
                    "compiling it; it will be built again", lock.parent.name, lock, why)
        lock.unlink(missing_ok=True)
        removed.append(lock)
    return removed


class BuildWatch:
    """A daemon thread that reports builds in progress while a lock exists (a context manager)."""

    def __init__(self, extensions_dir: Path, every_s: float = REPORT_EVERY_S) -> None:
        self.extensions_dir = extensions_dir
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trainer-op-build-watch", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            for lock in locks(self.extensions_dir):
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                log.info("DeepSpeed's %s op is being compiled (by this or another process; lock %s, %.0f s so far): "
                         "waiting for it", lock.parent.name, lock, age)

    def __enter__(self) -> BuildWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_watching: set[Path] = set()


def prepare_builds(extensions_dir: Path) -> None:
    """Before DeepSpeed may compile anything in this process: clear stale locks, then keep reporting builds (a
    daemon thread, once per process and folder)."""
    clear_stale_locks(extensions_dir)
    if extensions_dir not in _watching:
        _watching.add(extensions_dir)
        BuildWatch(extensions_dir).__enter__()
