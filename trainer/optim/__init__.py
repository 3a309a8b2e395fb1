"""Optimizer and LR schedule from the recipe's `optimizer` section.

Weight decay applies to matrices (dim >= 2: linear and embedding weights) and never to biases or norm
scales, the usual rule for transformers. The schedule is a function of the optimizer step: linear warmup
from lr/warmup_steps to lr, then constant, linear or cosine decay to lr * min_lr_ratio at train.max_steps. It
advances once per optimizer step (also when fp16 skips the update, so the LR never depends on overflows).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import nn

from trainer.recipe.schema import OptimizerConfig

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A ZeRO-3 partitioned parameter is an empty 1-D placeholder; its real shape is ds_shape.
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _construct(cls: type, groups: list[dict], shard_state: bool, **kwargs: object) -> torch.optim.Optimizer:
    if not shard_state:
        return cls(groups, **kwargs)
    from trainer.optim.sharded import ShardedOptimizer, numel_cost

    return ShardedOptimizer(groups, cls, numel_cost, **kwargs)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, shard_state: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by optimizer.name over the model's trainable parameters. With shard_state
    (distributed.zero_stage: 1 on the native engine) each rank owns whole parameters and keeps only their state
    (trainer/optim/sharded.py). The low-rank family's (GaLore, APOLLO) grouping and target rule:
    trainer/optim/lowrank_groups.py."""
    if cfg.low_rank is not None:
        from trainer.optim.lowrank_groups import build_lowrank

        return build_lowrank(model, cfg, shard_state)
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "adamw":
        return _construct(torch.optim.AdamW, groups, shard_state, lr=cfg.lr, betas=betas, eps=cfg.eps, foreach=True)
    if cfg.name == "sgd":
        return _construct(torch.optim.SGD, groups, shard_state, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb  # imported late: it prints backend notices on load

        cls = bnb.optim.PagedAdamW8bit if cfg.name == "paged_adamw8bit" else bnb.optim.AdamW8bit
        device = next(p for g in groups for p in g["params"]).device
        if cfg.name == "paged_adamw8bit" and device.type != "cuda":
            log.warning("optimizer.name=paged_adamw8bit: paging needs CUDA unified memory; on %s the state is "
                        "not paged (same updates as adamw8bit)", device.type)
        return _construct(cls, groups, shard_state, lr=cfg.lr, betas=betas, eps=cfg.eps)
    raise ValueError(f"optimizer.name={cfg.name!r} has no builder in this version")  # checks.py rejects it first


def lr_factor(cfg: OptimizerConfig, max_steps: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr at optimizer step s (0-based)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        floor = cfg.min_lr_ratio
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, max_steps))


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the LR where *this* recipe's schedule is at `step`. A loaded optimizer state carries the LR of the run
    that saved it, and a resumed run may have changed optimizer.lr or train.max_steps."""
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]  # what get_last_lr() reports
