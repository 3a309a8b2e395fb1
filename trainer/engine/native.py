"""The native engine: one process, or DDP under torchrun (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.distributed import DistInfo
from trainer.engine.base import StepResult
from trainer.precision import Precision


class NativeEngine:
    """Plain PyTorch: autocast + GradScaler, DDP with no_sync on accumulation micro-steps, clip, step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision, dist: DistInfo,
                 grad_clip: float | None) -> None:
        self.module = model.to(dist.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.dist = dist
        self.grad_clip = grad_clip
        self.wrapped: nn.Module = self.module
        if dist.is_distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.wrapped = DDP(self.module, device_ids=ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            out = self.wrapped(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits

    def accumulate(self, is_last: bool) -> ContextManager[Any]:
        if isinstance(self.wrapped, DDP) and not is_last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; our loss is already this rank's share of the global mean.
        self.precision.scale(loss * self.dist.world_size).backward()

    def step(self) -> StepResult:
        self.precision.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        # max_norm=inf measures the global norm without clipping, so grad_norm is logged either way.
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf")))
        scale = self.precision.loss_scale
        lr = self.lr()
        skipped = self.precision.step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm, skipped=skipped, loss_scale=scale, lr=lr,
                          skipped_steps=self.precision.skipped_steps)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "precision": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
