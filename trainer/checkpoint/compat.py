"""Whether a checkpoint may be continued by the run resuming it: the resume policy.

- The recipe: by the schema's resume rules (trainer/recipe/schema.py): `must_match` keys block, `allowed` ones are
  logged, `ignored` ones are not compared.
- The global batch must stay; the world size and the accumulation may change. A global batch changed by an explicit
  command-line override is the user's choice (logged).
- The data: its content identity (data/identity.py) must be the same, unless `checkpoint.allow_data_change`
  (logged); a checkpoint from before content identities resumes with a warning.
- An adapter run's base must be the one it was trained on, unless `train --force` (logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.adapters.base_identity import Identity, describe, mismatch
from trainer.checkpoint.state import RunFingerprint, SavedRun
from trainer.data.identity import data_changes
from trainer.errors import EXIT_RECIPE, CheckpointError
from trainer.recipe.schema import Recipe, resume_rules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeAllowances:
    """What the person resuming allowed on purpose."""

    explicit_batch: bool = False  # the command line set the batch: a changed global batch is allowed
    data_change: bool = False  # checkpoint.allow_data_change: continue on changed data
    other_base: bool = False  # train --force: continue an adapter over another base than it was trained on


def _tuples_to_lists(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(x) for x in obj]
    return obj


def _value(recipe: dict[str, Any], key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def compare_recipes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(blocking differences, allowed differences), each as 'key: old -> new', by the schema's resume rules."""
    blocking: list[str] = []
    allowed: list[str] = []
    for key, rule in resume_rules().items():
        old, new = _value(saved, key), _value(current, key)
        if rule == "ignored" or _tuples_to_lists(old) == _tuples_to_lists(new):
            continue
        line = f"{key}: {old!r} -> {new!r}"
        (blocking if rule == "must_match" else allowed).append(line)
    return blocking, allowed


def batch_change_problem(saved: SavedRun, micro_batch_size: int, world_size: int, global_batch_size: int,
                         explicit: bool) -> str | None:
    """Why resuming with this batch setup is refused, or None: the numbers, and the overrides that keep the global
    batch (or the numbers of ranks that can)."""
    old = saved.global_batch_size
    if old == global_batch_size or explicit:
        return None
    head = (f"the checkpoint was trained with a global batch of {old} sequences (micro-batch "
            f"{saved.micro_batch_size} x accumulation {saved.grad_accum_steps} x {saved.world_size} ranks); on "
            f"{world_size} ranks this recipe gives {global_batch_size}")
    per_step = micro_batch_size * world_size
    if old % per_step == 0:
        return (f"{head}. To keep {old}, set train.global_batch_size={old} (accumulation "
                f"{old // per_step}), in the recipe or on the command line")
    fitting = [w for w in range(1, old // micro_batch_size + 1) if old % (micro_batch_size * w) == 0]
    return (f"{head}. {old} cannot be kept on {world_size} ranks: it is not a multiple of micro-batch "
            f"{micro_batch_size} x {world_size} ranks = {per_step}. It can be kept on "
            f"{', '.join(map(str, fitting[:12]))} ranks (train.global_batch_size={old}); or change the global batch "
            f"on purpose with an explicit train.global_batch_size=N (a multiple of {per_step}) on the command line")


def other_base_refusal(path: Path, why: str) -> str:
    return (f"cannot resume from {path}: the base model is not the one the adapter was trained on:\n{why}\n"
            "restore that base where model.name_or_path points, or add --force to resume over this one anyway (the "
            "adapter then continues from weights learned for another base; logged as a warning)")


def base_refusal(saved: SavedRun, current: Identity) -> str | None:
    """Why an adapter checkpoint cannot resume over the base `current`, or None (the same base, or a checkpoint
    that recorded none: check_compatible warns about that one)."""
    why = mismatch(saved.base_model, current) if saved.base_model is not None else None
    return other_base_refusal(saved.path, why) if why else None


def _batch_difference(saved: SavedRun, current: RunFingerprint, allowances: ResumeAllowances,
                      blocking: list[str], allowed: list[str]) -> None:
    old, new = saved.global_batch_size, current.global_batch_size
    if old == new:
        return
    if allowances.explicit_batch:
        allowed.append(f"train.global_batch_size: {old} -> {new} (set on the command line)")
    else:
        blocking.append(f"global_batch_size: {old!r} -> {new!r}")


def _data_differences(saved: SavedRun, current: RunFingerprint, allowances: ResumeAllowances) -> list[str]:
    """How the data's content differs, where that blocks the resume (logged instead when allowed)."""
    changes = data_changes(saved.data, current.data)
    if changes is None:
        log.warning("%s records no content identity of its data (written by an older version): resuming "
                    "without checking that the data is the same", saved.path)
        return []
    if changes and allowances.data_change:
        for line in changes:
            log.warning("resuming on changed data (checkpoint.allow_data_change: true): %s", line)
        return []
    return changes


def _check_base(saved: SavedRun, current: RunFingerprint, allowances: ResumeAllowances) -> None:
    """An adapter resumes over the base it was trained on, or is refused (`train --force`: resumes, warned)."""
    if current.base_model is None:
        return
    if saved.base_model is None:
        log.warning("%s records no identity of its base model (written before they were recorded): cannot check "
                    "that the base found now, %s, is the one the adapter was trained on", saved.path,
                    describe(current.base_model))
        return
    why = mismatch(saved.base_model, current.base_model)
    if why is None:
        return
    if not allowances.other_base:
        raise CheckpointError(other_base_refusal(saved.path, why), on_every_rank=True, exit_code=EXIT_RECIPE)
    log.warning("--force: resuming the adapter of %s over another base model than it was trained on:\n%s",
                saved.path, why)


def check_compatible(saved: SavedRun, recipe: Recipe, current: RunFingerprint,
                     allowances: ResumeAllowances) -> None:
    """Refuse (CheckpointError, exit 2, every difference listed) a resume that would not continue the same run;
    log the differences that are allowed."""
    blocking, allowed = compare_recipes(saved.recipe, recipe.model_dump())
    _batch_difference(saved, current, allowances, blocking, allowed)
    data_changed = _data_differences(saved, current, allowances)
    blocking += data_changed
    if blocking:
        raise CheckpointError(
            f"cannot resume from {saved.path}: the run differs from the one that saved it:\n"
            + "\n".join(f"  - {line}" for line in blocking)
            + "\nrestore those settings" + (" and the data" if data_changed else "")
            + ", start a new output_dir, or set checkpoint.resume=never"
            + ("; or, to continue this run on the changed data, set checkpoint.allow_data_change=true"
               if data_changed else ""),
            on_every_rank=True, exit_code=EXIT_RECIPE)
    for line in allowed:
        log.warning("resuming with a changed setting: %s", line)
    _check_base(saved, current, allowances)


def log_layout_change(saved: SavedRun, current: RunFingerprint) -> None:
    """One warning when the number of ranks or the accumulation changed: what changed and what stayed."""
    if (saved.world_size, saved.grad_accum_steps) == (current.world_size, current.grad_accum_steps):
        return
    old, new = saved.global_batch_size, current.global_batch_size
    batch = f"global batch {old} unchanged" if old == new else f"global batch {old} -> {new} (your override)"
    log.warning("resumed from step %d written by %d ranks, now %d ranks, accumulation %d -> %d, %s%s",
                saved.step, saved.world_size, current.world_size, saved.grad_accum_steps, current.grad_accum_steps,
                batch, "; dropout and other random streams are derived from the seed and the step, so they differ "
                "from an uninterrupted run" if saved.world_size != current.world_size else "")
