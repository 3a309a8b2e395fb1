"""Dtype policy: autocast for bf16/fp16 over fp32 master weights, and dynamic loss scaling for fp16.

fp16 uses torch.amp.GradScaler: the loss is multiplied by the scale before backward; at the step the
gradients are unscaled, and if any is inf/nan the step is skipped and the scale halved; after
`loss_scale_growth_interval` clean steps it doubles. A scale that keeps collapsing (many skipped steps in a
row) means fp16 cannot represent this run: we stop and say so instead of silently not training.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from trainer.dtypes import torch_dtype
from trainer.errors import LossScaleCollapsed, TrainingDiverged
from trainer.schema import PrecisionConfig

log = logging.getLogger(__name__)


@dataclass
class SkipCounter:
    """fp16 steps skipped on overflow, in all and in a row: every engine's rule is to log each one and raise
    LossScaleCollapsed after `limit` in a row. The counts are checkpointed (state_dict)."""

    limit: int
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def record(self, skipped: bool, scale: float) -> None:
        """Count this optimizer step; `scale` is the loss scale after it."""
        if not skipped:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        log.warning("fp16 overflow: step skipped, loss scale now %g (%d skipped so far)", scale, self.skipped_steps)
        if self.consecutive_skips >= self.limit:
            raise LossScaleCollapsed(
                f"fp16 loss scale collapsed to {scale:g}: {self.consecutive_skips} steps in a row "
                "overflowed (inf/nan gradients), so nothing is being trained. Use precision.dtype=bf16 "
                "(same memory, no overflow), lower optimizer.lr, or enable optimizer.grad_clip; raise "
                "precision.max_consecutive_skips only if you know the overflows will pass.")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


@dataclass
class NonFiniteSteps:
    """Steps whose loss or gradient norm was NaN/inf outside fp16's loss scaling. At the first one beyond `limit`
    the run stops with TrainingDiverged (nothing saved after it); up to `limit` are skipped with a warning. The
    count is checkpointed with the loop's counters."""

    limit: int
    skipped: int = 0

    def record(self, step: int, loss: float, grad_norm: float | None, last_good: object) -> None:
        what = f"loss {loss:.6g}" + (f", gradient norm {grad_norm:.6g}" if grad_norm is not None else "")
        if self.skipped < self.limit:
            self.skipped += 1
            log.warning("step %d: %s: not finite; step skipped (%d of train.max_nonfinite_steps=%d)", step, what,
                        self.skipped, self.limit)
            return
        resume = (f"The last good checkpoint is {last_good}: " if last_good else "No checkpoint was saved before "
                  "it: ")
        raise TrainingDiverged(
            f"step {step}: {what}: training diverged, so the run stopped before this step's update and saved "
            f"nothing after it. {resume}lower optimizer.lr, set optimizer.grad_clip or more warmup, check the data, "
            "then run the same command to resume from it (or set train.max_nonfinite_steps to skip a few such "
            "steps).")


class Precision:
    """Autocast context and (fp16) loss scaler for one device."""

    def __init__(self, cfg: PrecisionConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = torch_dtype(cfg.dtype)
        self.scaler: torch.amp.GradScaler | None = None
        if cfg.dtype == "fp16":
            self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg.initial_loss_scale,
                                               growth_interval=cfg.loss_scale_growth_interval)
        self.skips = SkipCounter(cfg.max_consecutive_skips)

    def autocast(self) -> ContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """optimizer.step() unless fp16 overflowed; returns True when the step was skipped."""
        if self.scaler is None:
            optimizer.step()
            return False
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < before
        self.skips.record(skipped, self.scaler.get_scale())
        return skipped

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.skips.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skips.load_state_dict(state)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
