"""Before anything is built on a GPU: will the recipe fit? Rank 0 plans against its device's free memory and
tells every rank, so a job that would run out of memory stops at once, on every rank, with the plan and the
changes that make it fit (unless `train --force`)."""

from __future__ import annotations

import logging

import torch

from trainer.distributed import DistInfo, broadcast_object
from trainer.errors import EXIT_RECIPE, TrainerError
from trainer.memory_report import full_plan, render
from trainer.resolve import ResolvedRun

log = logging.getLogger(__name__)
GiB = 2**30


class DoesNotFit(TrainerError):
    """The memory plan predicts more than the GPU has free."""

    exit_code = EXIT_RECIPE


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
