"""Which weights get a low-rank-state optimizer (GaLore or APOLLO), and that optimizer from the recipe's
`optimizer.galore` or `optimizer.apollo` section.

The target rule, the same for both: a target is the 2-D `weight` of a module that is
- with `target_modules: null` (the default): a linear layer (nn.Linear, or transformers' Conv1D) other than the
  output head (`get_output_embeddings()`) and not tied to the input embeddings: in a transformer these are
  exactly the attention and MLP projections (q/k/v/o, gate/up/down, c_attn/c_fc/c_proj, ...);
- with `target_modules: [patterns]`: any module whose dotted name equals a pattern, ends with `.pattern`, or
  matches it as a glob (`model.layers.*.mlp.*`);
and whose smaller side is larger than the rank (otherwise projecting saves nothing). Everything else
(embeddings, norms, biases, the LM head, too-small matrices) gets plain AdamW in the same optimizer. The
builder logs both lists with counts per module kind. precision.weights: int8 stores exactly these targets in
INT8 (trainer/model/int8_weights.py).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from trainer.model.causal_lm import CausalLM
from trainer.optim.apollo import ApolloAdamW
from trainer.optim.apollo import expected_state_bytes as apollo_state_bytes
from trainer.optim.galore import GaLoreAdamW
from trainer.optim.galore import expected_state_bytes as galore_state_bytes
from trainer.optim.lowrank import MIN_8BIT_SIZE, LowRankAdamW
from trainer.optim.sharded import ShardedOptimizer
from trainer.recipe.schema import OptimizerConfig

# APOLLO's paper settings by optimizer name: rank, scale_type, scale (alpha)
APOLLO_PRESETS = {"apollo_adamw": (256, "channel", 1.0), "apollo_mini": (1, "tensor", math.sqrt(128))}

log = logging.getLogger(__name__)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def select_targets(model: CausalLM, patterns: list[str] | None,
                   rank: int) -> tuple[dict[nn.Parameter, str], dict[nn.Parameter, str]]:
    """({target weight: name}, {too-small matched weight: name}) by the rule in the module docstring."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed_weight = getattr(embed, "weight", None)
    targets: dict[nn.Parameter, str] = {}
    small: dict[nn.Parameter, str] = {}
    used = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or not weight.requires_grad:
            continue
        if patterns is None:
            chosen = _is_linear(module) and module is not head and weight is not embed_weight
        else:
            hits = [p for p in patterns if _matches(name, p)]
            used.update(hits)
            chosen = bool(hits)
        if chosen:
            (targets if rank < min(weight.shape) else small)[weight] = f"{name}.weight"
    unused = [p for p in patterns or [] if p not in used]
    if unused:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ValueError(f"{', '.join(unused)} match{'es' if len(unused) == 1 else ''} no module with a 2-D weight; "
                         f"this model's linear layers are named {', '.join(linear)} (give names, dotted suffixes or "
                         "globs, or null for the default)")
    return targets, small


def _kinds(names: list[str]) -> str:
    """'q_proj 4, k_proj 4, ...': counts per module kind (the name's last part before .weight)."""
    counts = Counter(n.removesuffix(".weight").rsplit(".", 1)[-1] for n in names)
    return ", ".join(f"{kind} {count}" for kind, count in counts.items())


def member(cfg: OptimizerConfig) -> str:
    """GaLore or APOLLO: the member of the family optimizer.name picks (for messages)."""
    return "APOLLO" if cfg.name.startswith("apollo") else "GaLore"


def rank_of(cfg: OptimizerConfig) -> int:
    """The rank the recipe asks for (APOLLO's null: its paper setting by optimizer name)."""
    if cfg.name.startswith("apollo"):
        return cfg.apollo.rank if cfg.apollo.rank is not None else APOLLO_PRESETS[cfg.name][0]
    return cfg.galore.rank


def targets_of(model: CausalLM, cfg: OptimizerConfig) -> tuple[dict[nn.Parameter, str], dict[nn.Parameter, str]]:
    """select_targets with the recipe's rank and patterns."""
    return select_targets(model, cfg.low_rank.target_modules, rank_of(cfg))  # type: ignore[union-attr]


def lowrank_param_groups(model: CausalLM, cfg: OptimizerConfig, announce: bool = True) -> tuple[
        list[dict[str, Any]], dict[torch.Tensor, str]]:
    """Parameter groups (targets; other matrices; no-decay) and the names of every trainable one; `announce`
    logs the two lists (the memory plan builds the groups quietly)."""
    rank, who = rank_of(cfg), member(cfg)
    targets, small = targets_of(model, cfg)
    if not targets:
        side = max((min(p.shape) for p in small), default=0)
        raise ValueError(f"no target matrix has both sides larger than rank {rank} (the largest smaller side is "
                         f"{side}), so {who} would project nothing")
    names: dict[torch.Tensor, str] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.setdefault(p, name)
    rest = [p for p in names if p not in targets]
    groups = [{"params": list(targets), "weight_decay": cfg.weight_decay, "rank": rank},
              {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    total = sum(p.numel() for p in names)
    share = sum(p.numel() for p in targets) / max(total, 1)
    if not announce:
        return [grp for grp in groups if grp["params"]], names
    log.info("%s rank %d on %d matrices (%s; %.1f%% of trainable parameters); plain AdamW on %d tensors "
             "(%s)", who, rank, len(targets), _kinds(list(targets.values())), 100 * share, len(rest),
             _kinds([names[p] for p in rest]))
    if small:
        log.warning("%s: %d matched matrices have a side <= %s.rank=%d and get plain AdamW (%s)", who, len(small),
                    cfg.low_rank_key, rank, _kinds(list(small.values())))
    return [grp for grp in groups if grp["params"]], names


def state_cost(p: torch.Tensor, group: dict[str, Any]) -> int:
    """Bytes of state the family's optimizer will hold for p (what sharding balances across ranks); a group
    with a scale_type is APOLLO's."""
    if "scale_type" in group:
        return apollo_state_bytes(tuple(p.shape), group["rank"], group["norm_growth_limit"] is not None,
                                  group["bits"], group["min_8bit_size"])
    return galore_state_bytes(tuple(p.shape), group["rank"], group["proj_type"], group["bits"],
                              group["min_8bit_size"])


def optimizer_class(cfg: OptimizerConfig) -> type[LowRankAdamW]:
    return ApolloAdamW if cfg.name.startswith("apollo") else GaLoreAdamW


def lowrank_defaults(cfg: OptimizerConfig) -> dict[str, Any]:
    """The optimizer's keyword arguments (the defaults of every parameter group) from the recipe."""
    common = dict(lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, rank=None, min_8bit_size=MIN_8BIT_SIZE)
    if cfg.name.startswith("apollo"):
        a = cfg.apollo
        _, scale_type, scale = APOLLO_PRESETS[cfg.name]
        return dict(common, update_gap=a.update_gap, scale=a.scale if a.scale is not None else scale,
                    scale_type=a.scale_type or scale_type, norm_growth_limit=a.norm_growth_limit, bits=32)
    g = cfg.galore
    return dict(common, update_gap=g.update_gap, scale=g.scale, proj_type=g.proj_type, svd=g.svd,
                bits=8 if cfg.name == "galore_adamw8bit" else 32)


def build_lowrank(model: CausalLM, cfg: OptimizerConfig, shard_state: bool) -> torch.optim.Optimizer:
    """GaLoreAdamW or ApolloAdamW over the model; with shard_state, each rank owns whole parameters and keeps
    only their state, balanced by state bytes (trainer/optim/sharded.py)."""
    groups, names = lowrank_param_groups(model, cfg)
    kwargs, cls = lowrank_defaults(cfg), optimizer_class(cfg)
    if not shard_state:
        opt = cls(groups, **kwargs)
        opt.param_names = names
        return opt
    sharded = ShardedOptimizer(groups, cls, state_cost, **kwargs)
    own = sharded.optim
    assert isinstance(own, LowRankAdamW)
    own.param_names = names
    log.info("%s state sharded over %d ranks by whole parameters: planned bytes per rank %s", member(cfg),
             sharded.world_size, sharded.rank_costs(state_cost))
    return sharded
