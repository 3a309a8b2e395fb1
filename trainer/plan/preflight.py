"""Before anything is built: will the recipe fit? Rank 0 plans against its GPU's free memory, and the size of one
checkpoint against the output directory's free disk space, and tells every rank, so a job that would run out of
memory or disk stops at once, on every rank, with the numbers and what to change (the GPU check can be overridden
with `train --force`)."""

from __future__ import annotations

import logging

import torch

from trainer.distributed import DistInfo, broadcast_object
from trainer.errors import EXIT_RECIPE, TrainerError
from trainer.plan.disk import disk_shortfall
from trainer.plan.items import GiB
from trainer.plan.report import render
from trainer.plan.suggest import full_plan
from trainer.recipe.resolved import ResolvedRun

log = logging.getLogger(__name__)


class DoesNotFit(TrainerError):
    """The memory plan predicts more than the GPU has free (rank 0 decides for every rank)."""

    exit_code = EXIT_RECIPE
    on_every_rank = True


class DiskTooSmall(TrainerError):
    """The output directory has less free space than one checkpoint needs (rank 0 decides for every rank)."""

    on_every_rank = True


def _verdict(run: ResolvedRun, dist: DistInfo, force: bool) -> str | None:
    """None when the run may start, else the message to show (rank 0 only)."""
    free, _ = torch.cuda.mem_get_info(dist.device)
    plan = full_plan(run, free)
    if plan.fits:
        return None
    if force:
        log.warning("the plan predicts %.1f GiB > %.1f GiB free; starting anyway (--force)", plan.peak_bytes / GiB,
                    free / GiB)
        return None
    return (render(plan, f"{run.recipe.output_dir} on this GPU ({free / GiB:.1f} GiB free)")
            + "\nthe recipe will not fit this GPU; apply a suggestion above or pass --force")


def check_memory(run: ResolvedRun, dist: DistInfo, force: bool) -> None:
    """Raise DoesNotFit on every rank when rank 0's plan says the recipe will not fit (GPU only)."""
    if dist.device.type != "cuda":
        return
    verdict = _verdict(run, dist, force) if dist.is_main else None
    verdict = broadcast_object(verdict)
    if verdict is not None:
        raise DoesNotFit(verdict)


def check_disk(run: ResolvedRun, dist: DistInfo) -> None:
    """Raise DiskTooSmall on every rank when rank 0 finds less free space in output_dir than one checkpoint."""
    if not (run.recipe.checkpoint.every_steps or run.recipe.checkpoint.save_final):
        return
    verdict = disk_shortfall(run) if dist.is_main else None
    verdict = broadcast_object(verdict)
    if verdict is not None:
        raise DiskTooSmall(verdict)
