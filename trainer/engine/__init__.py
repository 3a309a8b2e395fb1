"""How a step is executed. The loop sees only the `Engine` protocol; `build_engine` picks the implementation."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager

from torch import nn

from trainer.config import DistributedConfig, OptimizerConfig, PrecisionConfig
from trainer.distributed import DistInfo
from trainer.engine.base import Engine, StepResult
from trainer.engine.native import NativeEngine
from trainer.optim import build_optimizer, build_scheduler
from trainer.optim.per_layer import PerLayerUpdates
from trainer.precision import Precision

log = logging.getLogger(__name__)

# Why distributed.engine=deepspeed with zero_stage=0 trains on the native engine (logged when it happens).
STAGE0_NOTE = ("distributed.zero_stage=0: running on the native engine (DDP), which is what ZeRO stage 0 is "
               "(plain data parallelism, nothing sharded); DeepSpeed's own stage 0 never scales an fp16 loss "
               "(DeepSpeed PR #8393) and updates bf16 differently from its stages 1-3")


def model_init_context(distributed: DistributedConfig, precision: PrecisionConfig) -> ContextManager[Any]:
    """Wraps model construction: an engine that partitions parameters at creation (ZeRO-3) enters its
    context here, so the full model never materializes on one rank (partitions are made in the training
    dtype, hence `precision`). The native engine needs nothing."""
    if distributed.engine == "deepspeed" and distributed.zero_stage == 3:
        from trainer.engine.deepspeed import zero3_init_context

        return zero3_init_context(distributed, precision)
    return contextlib.nullcontext()


def build_engine(model: nn.Module, optimizer: OptimizerConfig, precision: PrecisionConfig,
                 distributed: DistributedConfig, max_steps: int, dist: DistInfo,
                 batch: tuple[int, int] = (1, 1)) -> Engine:
    """The engine named by distributed.engine, owning the optimizer, LR schedule and loss scaler. `batch` is
    (micro_batch_size, grad_accum_steps): DeepSpeed's config carries them."""
    if distributed.engine == "deepspeed" and distributed.zero_stage > 0:
        from trainer.engine.deepspeed import ZeroEngine  # imported here: DeepSpeed is slow to import

        return ZeroEngine(model, optimizer, precision, distributed, max_steps, dist, micro_batch_size=batch[0],
                          grad_accum_steps=batch[1])
    if distributed.engine == "deepspeed":
        log.info(STAGE0_NOTE)
    model = model.to(dist.device)  # optimizer state must be created on the parameters' device
    # zero_stage 1 on the native engine: optimizer state sharded by whole parameters (optim/sharded.py).
    opt = build_optimizer(model, optimizer, shard_state=distributed.zero_stage == 1 and dist.is_distributed)
    per_layer = None
    if optimizer.name.startswith("galore") and optimizer.galore.per_layer:
        per_layer = PerLayerUpdates(model, opt, optimizer.grad_clip, dist.world_size)  # type: ignore[arg-type]
    return NativeEngine(model, opt, build_scheduler(opt, optimizer, max_steps), Precision(precision, dist.device),
                        dist, optimizer.grad_clip, per_layer)


__all__ = ["Engine", "StepResult", "NativeEngine", "build_engine", "model_init_context"]
