"""Which checkpoint a run resumes from (`checkpoint.resume`: auto, never or PATH), decided once, in one place:
`resume_candidates` lists them (newest first, manifests and sizes checked); `peek_resume` takes the first for a
cheap look before anything is built; `choose_checkpoint` verifies their checksums with every rank, each a share of
the files, until one passes, and refuses (or with `train --force` moves aside) when none can be resumed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from trainer.checkpoint.commit import clean_partial
from trainer.checkpoint.layout import (MANIFEST, checkpoint_folders, checkpoints_root, complete_checkpoints,
                                       move_aside, read_manifest, verification_share)
from trainer.checkpoint.state import SavedRun, read_saved
from trainer.distributed import DistInfo, barrier, broadcast_object, gather_objects
from trainer.errors import EXIT_RECIPE, CheckpointError
from trainer.safeio import sha256

log = logging.getLogger(__name__)


def resume_candidates(output_dir: Path, resume: str) -> tuple[list[Path], list[str]]:
    """(the checkpoints a resume could continue from, newest first, their manifests and sizes checked; why the
    others could not). `auto`: this run's own; PATH: that checkpoint, or the newest complete one of that run
    (CheckpointError when it has none, or its manifest is damaged); `never`: none."""
    if resume == "never":
        return [], []
    if resume != "auto":
        path = Path(resume).expanduser()
        if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
            done = complete_checkpoints(path)
            if not done:
                raise CheckpointError(f"checkpoint.resume = {resume!r}: that run has no complete checkpoint")
            path = done[-1][1]
        read_manifest(path, checksums=False)
        return [path], []
    candidates, damaged = [], []
    for _, path in reversed(checkpoint_folders(output_dir)):
        try:
            read_manifest(path, checksums=False)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        candidates.append(path)
    return candidates, damaged


def peek_resume(output_dir: Path, resume: str) -> SavedRun | None:
    """The checkpoint a resume would continue from, unverified, or None when a run would start from scratch (or
    cannot read it: choose_checkpoint then reports what is wrong)."""
    try:
        candidates, _ = resume_candidates(output_dir, resume)
        return read_saved(candidates[0]) if candidates else None
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def choose_checkpoint(resume: str, output_dir: Path, dist: DistInfo, start_over: bool) -> Path | None:
    """The checkpoint to resume from, the same on every rank (a collective): rank 0 lists the candidates, then all
    ranks verify the checksums of each in turn until one passes. `start_over` (train --force) moves unusable or
    foreign checkpoints aside instead of refusing."""
    found: Any = ([], [])
    if dist.is_main:
        clean_partial(output_dir)
        try:
            if resume == "never":
                _refuse_to_mix(output_dir, start_over)
            found = resume_candidates(output_dir, resume)
        except CheckpointError as e:  # every rank must raise it, not wait in the broadcast below
            found = e
    found = broadcast_object(found)
    if isinstance(found, CheckpointError):  # the resume cannot go ahead as configured: a setup problem
        raise CheckpointError(str(found), on_every_rank=True, exit_code=EXIT_RECIPE)
    candidates, damaged = found
    if dist.is_main and resume == "auto":
        for reason in damaged:
            log.warning("%s; trying an older one", reason)
    for path in candidates:
        problems = _verify_together(path, dist)
        if not problems:
            if dist.is_main and resume == "auto":
                log.info("resume: auto picked %s, the newest complete checkpoint in %s", path.name, output_dir)
            return path
        damaged.append(problems[0])
        if dist.is_main and resume == "auto":
            log.warning("%s; trying an older one", problems[0])
    if damaged:
        _after_all_damaged(resume, damaged, output_dir, dist, start_over)
    return None


def _verify_together(path: Path, dist: DistInfo) -> list[str]:
    """Every rank checksums its share of the checkpoint's files (a collective); the problems found by any."""
    problems = []
    try:
        manifest = read_manifest(path, checksums=False)
        for name in verification_share(manifest["files"], dist.world_size, dist.rank):
            if sha256(path / name) != manifest["files"][name]["sha256"]:
                problems.append(f"{path}: file {name} does not match its checksum; the checkpoint is damaged")
    except CheckpointError as e:
        problems.append(str(e))
    gathered: list[Any] = gather_objects(problems)
    return [p for per_rank in gathered for p in per_rank]


def _after_all_damaged(resume: str, damaged: list[str], output_dir: Path, dist: DistInfo, start_over: bool) -> None:
    """No checkpoint can be resumed: refuse on every rank, or (train --force) move them aside on rank 0."""
    if resume != "auto":
        raise CheckpointError(f"checkpoint.resume = {resume!r} cannot be resumed: {damaged[0]}. Nothing was changed; "
                              "restore it from a backup, or point checkpoint.resume at another checkpoint",
                              on_every_rank=True, exit_code=EXIT_RECIPE)
    why = (f"no checkpoint in {checkpoints_root(output_dir)} can be resumed; each one failed its check:\n"
           + "\n".join(f"  - {reason}" for reason in damaged)
           + "\nnothing was changed. Restore them from a backup, or start over: add --force (moves checkpoints/ "
           "and metrics.jsonl aside into output_dir/previous-<time>/, deletes nothing), or use a new output_dir")
    if not start_over:
        raise CheckpointError(why, on_every_rank=True, exit_code=EXIT_RECIPE)
    if dist.is_main:
        aside = move_aside(output_dir)
        log.warning("--force: starting over; the earlier checkpoints and metrics are in %s", aside)
    barrier()


def _refuse_to_mix(output_dir: Path, start_over: bool) -> None:
    """checkpoint.resume=never over an earlier run's checkpoints would interleave the two runs, and keep_last
    would delete the earlier run's checkpoints as the new one saves (rank 0; `start_over` moves them aside)."""
    found = checkpoint_folders(output_dir)
    if not found:
        return
    if not start_over:
        raise CheckpointError(
            f"checkpoint.resume=never, but {output_dir} holds {len(found)} checkpoint(s) of an earlier run "
            f"(newest: {found[-1][1].name}); starting over here would mix the runs and keep_last would delete "
            "them. Use a new output_dir, resume (checkpoint.resume=auto), or add --force to move them aside")
    aside = move_aside(output_dir)
    log.warning("--force: starting over; the earlier checkpoints and metrics are in %s", aside)


def verified_resume(resume: str, output_dir: Path, dist: DistInfo, start_over: bool) -> SavedRun | None:
    """The checkpoint a resume would continue from, its checksums verified by every rank as at resume, read."""
    path = choose_checkpoint(resume, output_dir, dist, start_over)
    point = peek_resume(output_dir, str(path)) if path is not None and dist.is_main else None
    return broadcast_object(point)
