"""Exclusive lock files. One job per output directory: `OUTPUT_DIR/.lock`, held by rank 0 of the job that trains
there; a second job on the same output_dir is refused before it touches anything (two jobs would overwrite each
other's checkpoints and interleave their metrics). The token store uses the same lock so that one process builds a
store while the others wait.

The lock is a file created with O_EXCL (atomic on local filesystems and on NFS v3+), holding who took it: host,
pid, the torchrun job id and attempt (restart count), and the time. The holder refreshes its modification time
every HEARTBEAT_S seconds. A lock is stale, and taken over with a log line, when
- its holder is on this host and that process no longer exists;
- it was taken by an earlier attempt of the same torchrun job (an elastic restart: every worker died before the
  restart, whichever host rank 0 is on now); the ranks of one attempt wait for each other like any two jobs;
- its heartbeat is older than STALE_AFTER_S (the holder is on another host and stopped refreshing it).
Released on exit, also on errors; a process that dies leaves it behind, and the rules above clear it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from trainer.distributed import DistInfo, broadcast_object, restart_count
from trainer.errors import TrainerError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class OutputDirBusy(TrainerError):
    """Another job holds the output directory (rank 0 finds out and tells every rank)."""

    on_every_rank = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass
class Holder:
    host: str
    pid: int
    job: str
    started: float
    attempt: int = 0  # torchrun's restart count when it was taken

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"process {self.pid} on {self.host} (torchrun job {self.job or '-'}, since {when})"


def _read(path: Path) -> Holder | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return Holder(str(data["host"]), int(data["pid"]), str(data.get("job", "")), float(data["started"]),
                      int(data.get("attempt", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being written, or damaged: judged by its age


class FileLock:
    """An exclusive lock file with its holder written in it, refreshed by a heartbeat while held, taken over when
    stale (the rules in the module docstring)."""

    def __init__(self, path: Path, job: str) -> None:
        self.path = path
        self.me = Holder(socket.gethostname(), os.getpid(), job, time.time(), restart_count())
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _stale_reason(self) -> str | None:
        """Why the existing lock can be taken over, or None when its holder may be alive."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        holder = _read(self.path)
        if holder is None:
            return f"it is unreadable and {age:.0f} s old" if age > STALE_AFTER_S else None
        if holder.host == self.me.host and holder.pid == self.me.pid:
            return "this process holds it"
        if holder.host == self.me.host and not _alive(holder.pid):
            return f"its holder, {holder.describe()}, has exited"
        if self.me.job and holder.job == self.me.job and holder.attempt < self.me.attempt:
            return f"it was taken by an earlier attempt of this torchrun job ({holder.describe()})"
        if age > STALE_AFTER_S:
            return f"its holder, {holder.describe()}, last refreshed it {age:.0f} s ago"
        return None

    def try_acquire(self) -> Holder | None:
        """Take the lock (None), or return who holds it. A stale lock is taken over, with a log line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover races at most a few times with another starter
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                reason = self._stale_reason()
                if reason is None:
                    return _read(self.path) or Holder("?", 0, "", time.time())
                log.warning("taking over the lock %s: %s", self.path, reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(vars(self.me), f)
            self._beat = threading.Thread(target=self._heartbeat, name="trainer-lock-heartbeat", daemon=True)
            self._beat.start()
            return None
        return _read(self.path) or Holder("?", 0, "", time.time())

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the folder was removed under us: nothing left to protect
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        holder = _read(self.path)
        if holder is not None and (holder.host, holder.pid) == (self.me.host, self.me.pid):
            self.path.unlink(missing_ok=True)


class RunLock(FileLock):
    """The output directory's lock, for one job's rank 0 (a context manager): a second job is refused."""

    def __init__(self, output_dir: Path, job: str) -> None:
        super().__init__(output_dir / LOCK_FILE, job)

    def acquire(self) -> None:
        holder = self.try_acquire()
        if holder is not None:
            raise OutputDirBusy(
                f"output_dir {self.path.parent} is in use by {holder.describe()}: two runs on one output_dir would "
                f"overwrite each other's checkpoints. Wait for it to finish, stop it, or choose another output_dir. "
                f"(If that job is gone and this is wrong, delete {self.path}.)")

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def output_dir_lock(output_dir: Path, dist: DistInfo, job: str) -> Iterator[None]:
    """Rank 0 takes the lock and tells every rank whether it got it: all ranks refuse together."""
    lock = RunLock(output_dir, job) if dist.is_main else None
    refusal: str | None = None
    if lock is not None:
        try:
            lock.acquire()
        except OutputDirBusy as e:
            refusal = str(e)
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise OutputDirBusy(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
