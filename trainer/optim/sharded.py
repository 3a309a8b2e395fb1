"""Optimizer state sharded across ranks by whole parameters (`distributed.zero_stage: 1` on the native engine).

Every rank keeps all weights and, under DDP, the all-reduced gradients; each parameter has one owner rank,
which alone holds its optimizer state and computes its update; after the step every parameter is broadcast
from its owner. Owning whole parameters is what lets GaLore shard at all: the projector needs the matrix,
which DeepSpeed's flattened partitions never show it.

Owners are chosen to balance the *state bytes* of each rank (largest first, each to the rank holding the
fewest bytes so far), not element counts as torch's ZeroRedundancyOptimizer does: under GaLore a projected
matrix keeps a small fraction of the state an embedding of the same size keeps, so balancing elements can
leave one rank with most of the state. The partition depends only on shapes and settings; a checkpoint records
it (the owner of every parameter), so a run resumed on another number of ranks, or without sharding, can gather
each parameter's state from the shard that held it (`merge_shards`) and keep what it now owns (`select_state`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

Cost = Callable[[Tensor, dict[str, Any]], int]


def numel_cost(p: Tensor, group: dict[str, Any]) -> int:
    """The balancing cost of plain optimizers (AdamW, SGD, 8-bit AdamW): their state is about proportional
    to the parameter's size."""
    return p.numel()


def partition(costs: list[int], world_size: int) -> list[int]:
    """Owner rank of each item: largest cost first, each to the least-loaded rank (lowest on ties)."""
    loads = [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


class ShardedOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer_class`: `param_groups` list every parameter (for the LR schedule, gradient unscaling
    and zero_grad); `optim` is this rank's optimizer over the parameters it owns; `state_dict()` of `optim`
    is this rank's shard."""

    def __init__(self, params: list[dict[str, Any]], optimizer_class: type[torch.optim.Optimizer], cost: Cost,
                 **defaults: Any) -> None:
        super().__init__(params, defaults)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        flat = [(p, g) for g in self.param_groups for p in g["params"]]
        self.owners = partition([cost(p, g) for p, g in flat], self.world_size)
        self.owner = {p: r for (p, _), r in zip(flat, self.owners)}
        local = [{**{k: v for k, v in g.items() if k != "params"},
                  "params": [p for p in g["params"] if self.owner[p] == self.rank]} for g in self.param_groups]
        self.optim = optimizer_class(local, **defaults)

    def rank_costs(self, cost: Cost) -> list[int]:
        """Planned state bytes of each rank."""
        loads = [0] * self.world_size
        for g in self.param_groups:
            for p in g["params"]:
                loads[self.owner[p]] += cost(p, g)
        return loads

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for mine, local in zip(self.param_groups, self.optim.param_groups):
            local.update({k: v for k, v in mine.items() if k != "params"})  # LR from the schedule, etc.
        loss = self.optim.step(closure)
        works = [dist.broadcast(p.data, src=self.owner[p], async_op=True)
                 for g in self.param_groups for p in g["params"]]
        for work in works:
            work.wait()
        return loss


def merge_shards(shards: dict[int, dict[str, Any]], owners: list[int]) -> tuple[list[dict[str, Any] | None],
                                                                                 list[dict[str, Any]]]:
    """(state of every parameter in the global order, or None where it has none yet; the groups' settings) from
    per-rank optimizer state dicts. `owners[i]` is the rank whose shard held parameter i; torch numbers a shard's
    parameters in the order they appear in its groups, which is the global order restricted to that rank.
    `shards` may leave out ranks whose parameters the caller does not need (their entries stay None)."""
    per_param: list[dict[str, Any] | None] = [None] * len(owners)
    seen = [0] * (max(owners, default=-1) + 1)
    for i, rank in enumerate(owners):
        local, seen[rank] = seen[rank], seen[rank] + 1
        if rank in shards:
            per_param[i] = shards[rank]["state"].get(local)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in next(iter(shards.values()))["param_groups"]]
    return per_param, settings


def select_state(per_param: list[dict[str, Any] | None], settings: list[dict[str, Any]], group_sizes: list[int],
                 keep: list[bool]) -> dict[str, Any]:
    """A torch optimizer state dict over the parameters marked in `keep` (global order, groups of `group_sizes`):
    what one rank's optimizer loads after a change in the number of ranks."""
    assert sum(group_sizes) == len(per_param) == len(keep), "the checkpoint's parameters are not this model's"
    state: dict[int, dict[str, Any]] = {}
    groups, index, local = [], 0, 0
    for size, own in zip(group_sizes, settings):
        ids = []
        for _ in range(size):
            if keep[index]:
                ids.append(local)
                if per_param[index] is not None:
                    state[local] = per_param[index]  # type: ignore[assignment]
                local += 1
            index += 1
        groups.append({**own, "params": ids})
    return {"state": state, "param_groups": groups}
