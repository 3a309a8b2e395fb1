"""Which engine runs a step, built from the resolved run: the native engine (one process or DDP, optionally with
optimizer state sharded by whole parameters), or DeepSpeed ZeRO 1-3."""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager, Iterator

from torch import nn

from trainer.distributed import DistInfo
from trainer.engine.base import Engine
from trainer.engine.native import NativeEngine
from trainer.model.build import WHOLE, Placement
from trainer.optim import build_optimizer, build_scheduler
from trainer.optim.per_layer import PerLayerUpdates
from trainer.model.precision import Precision
from trainer.recipe.resolved import ResolvedRun

log = logging.getLogger(__name__)

# Why distributed.engine=deepspeed with zero_stage=0 trains on the native engine (logged when it happens).
STAGE0_NOTE = ("distributed.zero_stage=0: running on the native engine (DDP), which is what ZeRO stage 0 is "
               "(plain data parallelism, nothing sharded); DeepSpeed's own stage 0 never scales an fp16 loss "
               "(DeepSpeed PR #8393) and updates bf16 differently from its stages 1-3")


@contextlib.contextmanager
def _whole_parameters() -> Iterator[Placement]:
    yield WHOLE


def model_init_context(run: ResolvedRun) -> ContextManager[Placement]:
    """Wraps model construction: an engine that partitions parameters (ZeRO-3) enters its context here, so the full
    model never materializes on one rank (from scratch and full fine-tuning: partitioned at creation, in the
    training dtype; adapter runs: the base partitioned module by module as it loads). It yields the Placement that
    model.build_model follows; the native engine's parameters are whole."""
    if run.execution.zero3:
        from trainer.engine.deepspeed import zero3_init_context  # imported here: DeepSpeed is slow to import

        return zero3_init_context(run)
    return _whole_parameters()


def build_engine(run: ResolvedRun, model: nn.Module, dist: DistInfo) -> Engine:
    """The engine named by distributed.engine, owning the optimizer, LR schedule and loss scaler."""
    r = run.recipe
    if run.execution.deepspeed:
        from trainer.engine.deepspeed import ZeroEngine  # imported here: DeepSpeed is slow to import

        return ZeroEngine(run, model, dist)
    if run.execution.deepspeed_stage0:
        log.info(STAGE0_NOTE)
    model = model.to(dist.device)  # optimizer state must be created on the parameters' device
    # zero_stage 1 on the native engine: optimizer state sharded by whole parameters (optim/sharded.py).
    opt = build_optimizer(model, r.optimizer, shard_state=run.sharded_native_state)
    per_layer = None
    if r.optimizer.per_layer:  # GaLore or APOLLO updating each weight inside backward
        per_layer = PerLayerUpdates(model, opt, r.optimizer.grad_clip, dist.world_size)  # type: ignore[arg-type]
    scheduler = build_scheduler(opt, r.optimizer, r.train.max_steps)
    return NativeEngine(model, opt, scheduler, Precision(r.precision, dist.device), dist, r.optimizer.grad_clip,
                        per_layer)
