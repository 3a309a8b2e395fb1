"""What a step whose numbers are not finite does, decided in one place for every engine.

- fp16 (loss scaling): an overflow is expected now and then. The engine skips the update and halves the scale (its
  verdict: `StepResult.skipped`); here each skip is logged and counted, and after
  `precision.max_consecutive_skips` in a row the run stops (LossScaleCollapsed): fp16 cannot represent it.
- Otherwise a NaN/inf global loss or gradient norm means the run diverged. It is found before the update: the loss
  right after the forward passes (with per-layer updates, before each backward, since those update inside it), the
  gradient norm by the engine, which never applies a non-finite one. The run stops (TrainingDiverged), or, up to
  `train.max_nonfinite_steps`, the step is skipped with a warning.
- Validation refuses what cannot be skipped: per-layer updates (here), DeepSpeed in fp32, which does not check
  its gradients (its spec).

The counts are checkpointed with the loop's counters (`NonFiniteCounts`), so a resumed run keeps them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from trainer.engine.base import StepResult
from trainer.errors import KeySource, LossScaleCollapsed, Problem, TrainingDiverged
from trainer.recipe.schema import Recipe

log = logging.getLogger(__name__)


@dataclass
class NonFiniteCounts:
    """What the policy has seen so far in this run (checkpointed)."""

    skipped: int = 0  # steps skipped for a NaN/inf loss or gradient norm (train.max_nonfinite_steps)
    overflows: int = 0  # fp16: steps skipped for an overflow
    consecutive_overflows: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NonFiniteCounts:
        return cls(int(state.get("skipped", 0)), int(state.get("overflows", 0)),
                   int(state.get("consecutive_overflows", 0)))


def problems(r: Recipe, src: KeySource) -> list[Problem]:
    """Skipping a non-finite step needs an update that has not happened yet when it is found."""
    if r.train.max_nonfinite_steps == 0 or r.precision.dtype == "fp16" or not r.optimizer.per_layer:
        return []
    return [Problem("train.max_nonfinite_steps", r.train.max_nonfinite_steps, "per-layer updates change each weight "
                    "during backward, so a step cannot be skipped once its gradients exist; set it to 0 (the run "
                    "stops at the first NaN/inf loss, before its backward)", src("train.max_nonfinite_steps"))]


class NonFinitePolicy:
    """Acts on the global loss before the update and on the engine's verdict after it."""

    def __init__(self, recipe: Recipe, counts: NonFiniteCounts | None = None) -> None:
        self.loss_scaled = recipe.precision.dtype == "fp16"
        self.max_skipped = recipe.train.max_nonfinite_steps
        self.max_consecutive_overflows = recipe.precision.max_consecutive_skips
        self.counts = counts or NonFiniteCounts()

    def check_loss(self, step: int, loss: float, last_good: object) -> None:
        """The step's global loss, before its update: NaN/inf stops the run or counts the step as skipped (the
        engine will not apply its non-finite gradient). fp16 leaves it to the loss scaling."""
        if not self.loss_scaled and not math.isfinite(loss):
            self._diverged(step, f"loss {loss:.6g}", last_good)

    def check_before_backward(self, step: int, any_rank_bad: bool, last_good: object) -> None:
        """Per-layer updates: a non-finite micro-batch loss on any rank, before its backward applies anything."""
        if any_rank_bad:
            self._diverged(step, "loss nan", last_good)

    def judge(self, step: int, loss: float, result: StepResult, last_good: object) -> None:
        """The engine's verdict on the step it just took."""
        if self.loss_scaled:
            self._count_overflow(result)
        elif math.isfinite(loss) and result.grad_norm is not None and not math.isfinite(result.grad_norm):
            self._diverged(step, f"loss {loss:.6g}, gradient norm {result.grad_norm:.6g}", last_good)

    def _count_overflow(self, result: StepResult) -> None:
        c = self.counts
        if not result.skipped:
            c.consecutive_overflows = 0
            return
        c.overflows += 1
        c.consecutive_overflows += 1
        scale = result.next_loss_scale or 0.0
        log.warning("fp16 overflow: step skipped, loss scale now %g (%d skipped so far)", scale, c.overflows)
        if c.consecutive_overflows >= self.max_consecutive_overflows:
            raise LossScaleCollapsed(
                f"fp16 loss scale collapsed to {scale:g}: {c.consecutive_overflows} steps in a row "
                "overflowed (inf/nan gradients), so nothing is being trained. Use precision.dtype=bf16 "
                "(same memory, no overflow), lower optimizer.lr, or enable optimizer.grad_clip; raise "
                "precision.max_consecutive_skips only if you know the overflows will pass.")

    def _diverged(self, step: int, what: str, last_good: object) -> None:
        if self.counts.skipped < self.max_skipped:
            self.counts.skipped += 1
            log.warning("step %d: %s: not finite; step skipped (%d of train.max_nonfinite_steps=%d)", step, what,
                        self.counts.skipped, self.max_skipped)
            return
        resume = (f"The last good checkpoint is {last_good}: " if last_good else "No checkpoint was saved before "
                  "it: ")
        raise TrainingDiverged(
            f"step {step}: {what}: training diverged, so the run stopped before this step's update and saved "
            f"nothing after it. {resume}lower optimizer.lr, set optimizer.grad_clip or more warmup, check the data, "
            "then run the same command to resume from it (or set train.max_nonfinite_steps to skip a few such "
            "steps).")
