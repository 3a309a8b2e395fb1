"""Optimizer-state bytes from shapes, by the optimizers' own accounting: torch's AdamW and SGD, bitsandbytes' 8-bit
AdamW (adapters/footprint.py), and the low-rank family's targets and state (optim/lowrank_groups.py), also split
over ranks the way the native engine's sharded optimizer splits it (optim/sharded.py). Which tensors are INT8
weights and which linear layers LoRA adapts come from the same rooms' rules."""

from __future__ import annotations

from typing import Any

from trainer.adapters.footprint import optimizer_state_bytes
from trainer.adapters.targets import find_targets
from trainer.optim import param_groups
from trainer.optim.lowrank_groups import lowrank_defaults, lowrank_param_groups, rank_of, state_cost, targets_of
from trainer.optim.sharded import numel_cost, partition
from trainer.plan.items import Shapes
from trainer.recipe.resolved import ResolvedRun


def optimizer_bytes(name: str, numels: list[int], momentum: float) -> int:
    """State bytes of a plain (not low-rank) optimizer over tensors of these sizes: SGD keeps one momentum buffer;
    AdamW and bitsandbytes' 8-bit AdamW follow the adapter package's accounting (fp32 moments and a step per
    tensor; 8-bit moments with blockwise absmax and code tables, fp32 under 4096 elements)."""
    if name == "sgd":
        return 4 * sum(numels) if momentum else 0
    return optimizer_state_bytes(name, numels)


def plain_state(run: ResolvedRun, numels: list[int]) -> int:
    """State of a plain optimizer; torch's AdamW and SGD keep it in the parameters' dtype (bf16 without master
    weights)."""
    o, p = run.recipe.optimizer, run.recipe.precision
    state = optimizer_bytes(o.name, numels, o.momentum)
    if p.dtype != "fp32" and not p.master_weights and o.name in ("adamw", "sgd"):
        state //= 2
    return state


def low_rank_state(run: ResolvedRun, sh: Shapes) -> tuple[int, int, int]:
    """(state bytes, target matrices, other tensors) by the family's own target rule and state accounting
    (trainer/optim/lowrank_groups.py state_cost): GaLore's fp32 projectors and projected moments (8-bit: 1 B each
    plus an fp32 absmax per block), APOLLO's seed, limiter norm and projected moments (the projection itself is
    regenerated, never stored), AdamW moments for every other tensor, a float64 step each."""
    o = run.recipe.optimizer
    targets, _ = targets_of(sh.meta, o)
    defaults = lowrank_defaults(o)
    total = 0
    for p in sh.meta.parameters():
        total += state_cost(p, {**defaults, "rank": rank_of(o) if p in targets else None})
    return total, len(targets), sum(1 for _ in sh.meta.parameters()) - len(targets)


def sharded_state_loads(run: ResolvedRun, sh: Shapes) -> list[int]:
    """Optimizer-state bytes of each rank under native zero_stage 1, by the sharded optimizer's own partition
    (trainer/optim/sharded.py: whole parameters, the low-rank family balanced by state bytes, the others by size),
    built from the same parameter groups in the same order on the meta model."""
    world = run.world_size
    o = run.recipe.optimizer
    if o.low_rank is not None:
        groups, _ = lowrank_param_groups(sh.meta, o, announce=False)
        defaults = lowrank_defaults(o)
        flat: list[tuple[Any, dict[str, Any]]] = [(p, {**defaults, **g}) for g in groups for p in g["params"]]
        costs = [state_cost(p, g) for p, g in flat]
        owners = partition(costs, world)
        return [sum(c for c, r in zip(costs, owners) if r == rank) for rank in range(world)]
    flat = [(p, g) for g in param_groups(sh.meta, o.weight_decay) for p in g["params"]]
    owners = partition([numel_cost(p, g) for p, g in flat], world)
    return [plain_state(run, [p.numel() for (p, _), r in zip(flat, owners) if r == rank]) for rank in range(world)]


def int8_targets(run: ResolvedRun, sh: Shapes) -> set[str]:
    """Names of the weights stored in INT8 (precision.weights: int8): the low-rank optimizer's targets."""
    if run.recipe.precision.weights != "int8":
        return set()
    targets, _ = targets_of(sh.meta, run.recipe.optimizer)
    return set(targets.values())


def lora_targets(run: ResolvedRun, sh: Shapes) -> list[Any]:
    """The linear layers LoRA adapts, by the adapter package's own rule."""
    return find_targets(sh.meta, run.recipe.adapter.target_modules, run.recipe.adapter.target_experts)
