"""Saving a checkpoint so that a crash at any moment leaves the previous ones untouched.

Rank 0 makes `.tmp-step-N`; every rank writes its files there; every rank fsyncs and hashes the files it wrote
(checkpoint/layout.py `writer_of`), and the digests are gathered, so rank 0 never reads another rank's files; rank 0
writes the manifest, renames the folder to `step-N`, fsyncs the parent, and only then deletes checkpoints beyond
keep_last. A rank that fails to write (a full disk, a file-size limit) does not leave the others waiting: all ranks
learn of it, the partial folder is removed, and every rank raises the same CheckpointError.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError

from trainer.checkpoint.layout import (FORMAT_VERSION, MANIFEST, checkpoints_root, complete_checkpoints, step_name,
                                       writer_of)
from trainer.distributed import DistInfo, barrier, gather_objects
from trainer.errors import CheckpointError, os_error_message
from trainer.safeio import current_umask, fsync_dir, fsync_file, sha256, write_json

log = logging.getLogger(__name__)

Digests = dict[str, dict[str, Any]]  # file name -> {"size", "sha256"}


@dataclass
class AtomicSave:
    """The commit protocol of one run's checkpoints, on every rank."""

    output_dir: Path
    dist: DistInfo
    keep_last: int

    def save(self, step: int, write_files: Callable[[Path], None], last_good: Path | None) -> Path:
        """`write_files(tmp)` writes this rank's part; then hash, commit, prune. Returns the committed folder (the
        same on every rank)."""
        started = time.perf_counter()
        root = checkpoints_root(self.output_dir)
        final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        self._agree(step, tmp, last_good, write_files, tmp)
        digests = self._agree(step, tmp, last_good, self._hash_own_files, tmp)
        size = self._agree(step, tmp, last_good, self._commit_on_main, tmp, final, step, digests)[0]
        if self.dist.is_main:
            log.info("checkpoint saved: %s (%.1f MB in %.2f s)", final, size / 1e6, time.perf_counter() - started)
            self._prune()
        barrier()
        return final

    def _agree(self, step: int, tmp: Path, last_good: Path | None, write: Callable[..., Any], *args: Any) -> Any:
        """Run `write` on this rank, then learn whether every rank's write worked (one collective); on any failure
        remove the partial folder and raise the same CheckpointError everywhere. Returns every rank's result, in
        rank order."""
        failure, result = None, None
        try:
            result = write(*args)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as RuntimeError
            failure = f"rank {self.dist.rank}: {os_error_message(e) if isinstance(e, OSError) else e}"
        outcomes: list[Any] = gather_objects((failure, result))
        failures = [f for f, _ in outcomes if f]
        if failures:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.output_dir).free
            raise CheckpointError(
                f"could not write the checkpoint of step {step} ({'; '.join(map(str, failures))[:600]}); "
                f"{free / 1e9:.1f} GB free in {self.output_dir}. The partial checkpoint was removed; the last good "
                f"one, {last_good or 'none yet'}, is intact, and `resume: auto` continues from it once the "
                "problem is fixed", on_every_rank=True)
        return [r for _, r in outcomes]

    def _hash_own_files(self, tmp: Path) -> Digests:
        """This rank's files (by name, `writer_of`): readable as a plain open() makes them (some writers create
        files readable only by us), fsynced, sized and hashed, while they are still in this rank's page cache."""
        mode = 0o666 & ~current_umask()
        out = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            name = f.relative_to(tmp).as_posix()
            if name == MANIFEST or writer_of(name, self.dist.world_size) != self.dist.rank:
                continue
            f.chmod(mode)
            fsync_file(f)
            out[name] = {"size": f.stat().st_size, "sha256": sha256(f)}
        return out

    def _commit_on_main(self, tmp: Path, final: Path, step: int, digests: list[Digests]) -> int:
        """Rank 0: the manifest from every rank's digests, then rename into place; returns the bytes committed (0
        elsewhere). Every file in the folder must have been hashed by some rank."""
        if not self.dist.is_main:
            return 0
        files = {name: meta for per_rank in digests for name, meta in per_rank.items()}
        present = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
        if present != set(files):
            raise RuntimeError(f"checkpoint files and digests disagree: unhashed {sorted(present - set(files))[:3]}, "
                               f"missing {sorted(set(files) - present)[:3]}")
        for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}):
            fsync_dir(d)
        write_json({"format": FORMAT_VERSION, "step": step, "world_size": self.dist.world_size,
                    "files": dict(sorted(files.items()))}, tmp / MANIFEST)
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
        return sum(m["size"] for m in files.values())

    def _prune(self) -> None:
        """Delete complete checkpoints beyond keep_last (only ever after a newer one is committed)."""
        for _, path in complete_checkpoints(self.output_dir)[:-self.keep_last]:
            shutil.rmtree(path)
            log.info("removed old checkpoint %s (keep_last=%d)", path.name, self.keep_last)


def clean_partial(output_dir: Path) -> None:
    """Rank 0: remove folders left by a save that never committed."""
    root = checkpoints_root(output_dir)
    for p in root.glob(".tmp-step-*") if root.is_dir() else []:
        log.warning("removing incomplete checkpoint %s (a save was interrupted)", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".old-step-*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
