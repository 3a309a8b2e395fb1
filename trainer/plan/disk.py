"""What one checkpoint takes on disk (asked of the engine's spec: engine/specs.py), and whether the output
directory has room for it."""

from __future__ import annotations

import shutil

from trainer.engine.specs import spec_of
from trainer.plan.items import CheckpointSize, Shapes
from trainer.plan.shapes import shapes
from trainer.recipe.resolved import ResolvedRun


def checkpoint_size(run: ResolvedRun, sh: Shapes) -> CheckpointSize:
    return spec_of(run.execution).checkpoint_size(run, sh)


def disk_shortfall(run: ResolvedRun) -> str | None:
    """None when output_dir has room for one checkpoint, else the message that says how much is missing."""
    needed = checkpoint_size(run, shapes(run)).total
    free = shutil.disk_usage(run.output_dir).free
    if free >= needed:
        return None
    return (f"output_dir {run.output_dir} has {free / 1e9:.2f} GB free, but one checkpoint of this run takes about "
            f"{needed / 1e9:.2f} GB (trainable weights in fp32 and the optimizer state); free space or choose another "
            "output_dir")
