"""Which modules LoRA adapts, found without loading any weight.

The architecture is built on the meta device from its config (shapes only, no memory, well under a second),
so validation can say "q_projj matches nothing; the linear layers are q_proj, k_proj, ..." before a
multi-gigabyte model is read. Matching uses peft's own rule (`check_target_module_exists`: a module matches a
name when its dotted path equals it or ends with '.' + it), so what we report is what peft will adapt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.adapters.experts import EXPERT, SplitExperts, split_experts, splits_experts
from trainer.model.causal_lm import CausalLM
from trainer.recipe.schema import AdapterConfig

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Target:
    """One module LoRA will wrap: its dotted name, kind and the shape that sizes the adapter."""

    name: str
    kind: str  # "linear" | "embedding" | the class name of a module LoRA cannot wrap
    in_features: int
    out_features: int


def meta_model(config: Any, adapter: AdapterConfig | None = None) -> CausalLM:
    """The causal LM of a transformers config, with parameters on the meta device (no storage); for an adapter run
    that splits a mixture-of-experts base's experts (adapters/experts.py), split as the run will build it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if adapter is not None and splits_experts(adapter, config):
        split_experts(model)
    return model


def _describe(module: nn.Module) -> tuple[str, int, int]:
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim
    return type(module).__name__, 0, 0


def linear_names(model: CausalLM) -> list[str]:
    """Short names of the linear layers LoRA could adapt (the output head excluded), e.g. ['q_proj', ...]."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def peft_targets(model: CausalLM, target_modules: list[str] | str, target_experts: bool) -> list[str] | str:
    """The target_modules peft gets for the recipe's adapter on `model`. On a model with split experts
    (adapters/experts.py) always a list of names: the experts' layers only with adapter.target_experts, and never
    'all-linear', which peft (0.21, under transformers 5) rewrites for Mixtral and Qwen-MoE into LoRA on the router
    and on the fused expert weights."""
    split = [m for m in model.modules() if isinstance(m, SplitExperts)]
    if not split:
        return target_modules
    expert_names = [f"{EXPERT}{i}" for i in range(max(m.num_experts for m in split))]
    names = linear_names(model) if target_modules == ALL_LINEAR else list(target_modules)
    names = [n for n in names if n not in expert_names]
    return names + expert_names if target_experts else names


def find_targets(model: CausalLM, target_modules: list[str] | str, target_experts: bool = False) -> list[Target]:
    """The modules peft adapts for `target_modules` (a list of names, or 'all-linear'), in model order."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    wanted = peft_targets(model, target_modules, target_experts)
    names = linear_names(model) if wanted == ALL_LINEAR else list(wanted)
    probe = LoraConfig(target_modules=names)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, module in model.named_modules():
        if not name or (target_modules == ALL_LINEAR and module is head):
            continue
        if check_target_module_exists(probe, name):
            out.append(Target(name, *_describe(module)))
    return out


def lora_param_count(targets: list[Target], rank: int, use_dora: bool = False) -> int:
    """Trainable parameters of LoRA: r*(in+out) per adapted module (A is r x in, B is out x r); DoRA adds a
    magnitude vector of `out` per linear module."""
    total = 0
    for t in targets:
        total += rank * (t.in_features + t.out_features)
        if use_dora and t.kind == "linear":
            total += t.out_features
    return total


def target_problems(adapter: AdapterConfig, config: Any) -> list[str]:
    """Why `adapter.target_modules` cannot work on this architecture (empty when it can)."""
    model = meta_model(config, adapter)
    wanted = adapter.target_modules
    if wanted == ALL_LINEAR:
        return []
    targets = find_targets(model, wanted)
    available = ", ".join(linear_names(model))
    problems = []
    for name in wanted:
        matched = [t for t in targets if t.name == name or t.name.endswith("." + name)]
        unsupported = sorted({t.kind for t in matched} - {"linear", "embedding"})
        if not matched:
            problems.append(f"'{name}' matches no module of this {config.model_type} model; its linear layers "
                            f"are: {available}")
        elif unsupported:
            problems.append(f"'{name}' matches {len(matched)} module(s) of type {', '.join(unsupported)}, which "
                            f"LoRA cannot adapt (e.g. {matched[0].name}); name linear layers: {available}")
    return problems
