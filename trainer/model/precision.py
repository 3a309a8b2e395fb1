"""Dtype policy of the native engine: autocast for bf16/fp16 over fp32 master weights, and dynamic loss scaling
for fp16.

fp16 uses torch.amp.GradScaler: the loss is multiplied by the scale before backward; at the step the
gradients are unscaled, and if any is inf/nan the step is skipped and the scale halved; after
`loss_scale_growth_interval` clean steps it doubles. What a run of skipped steps means is the non-finite policy's
to decide (trainer/engine/nonfinite.py), for every engine alike.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager

import torch

from trainer.dtypes import torch_dtype
from trainer.recipe.schema import PrecisionConfig

log = logging.getLogger(__name__)


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
        return self.scaler.get_scale() < before

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
