"""How a step is executed. The loop sees only the `Engine` protocol; `build_engine` picks the implementation."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

from torch import nn

from trainer.config import DistributedConfig, OptimizerConfig, PrecisionConfig
from trainer.distributed import DistInfo
from trainer.engine.base import Engine, StepResult
from trainer.engine.native import NativeEngine
from trainer.optim import build_optimizer, build_scheduler
from trainer.optim.per_layer import PerLayerUpdates
from trainer.precision import Precision


def model_init_context(distributed: DistributedConfig) -> ContextManager[Any]:
    """Wraps model construction: an engine that partitions parameters at creation (ZeRO-3) enters its
    context here, so the full model never materializes on one rank. The native engine needs nothing."""
    return contextlib.nullcontext()


def build_engine(model: nn.Module, optimizer: OptimizerConfig, precision: PrecisionConfig,
                 distributed: DistributedConfig, max_steps: int, dist: DistInfo) -> Engine:
    """The engine named by distributed.engine, owning the optimizer, LR schedule and loss scaler."""
    if distributed.engine != "native":
        raise ValueError(f"distributed.engine={distributed.engine!r} is not available")  # checks.py rejects first
    model = model.to(dist.device)  # optimizer state must be created on the parameters' device
    # zero_stage 1 on the native engine: optimizer state sharded by whole parameters (optim/sharded.py).
    opt = build_optimizer(model, optimizer, shard_state=distributed.zero_stage == 1 and dist.is_distributed)
    per_layer = None
    if optimizer.name.startswith("galore") and optimizer.galore.per_layer:
        per_layer = PerLayerUpdates(model, opt, optimizer.grad_clip, dist.world_size)  # type: ignore[arg-type]
    return NativeEngine(model, opt, build_scheduler(opt, optimizer, max_steps), Precision(precision, dist.device),
                        dist, optimizer.grad_clip, per_layer)


__all__ = ["Engine", "StepResult", "NativeEngine", "build_engine", "model_init_context"]
