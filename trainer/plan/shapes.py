"""The model's shapes for the plan: the model built on the meta device from the resolved architecture (shapes, no
storage, so an 8B or 70B model costs nothing), and the questions the formulas ask of them."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from trainer.adapters.experts import SplitExperts, split_experts, splits_experts
from trainer.plan.items import Experts, Param, Shapes
from trainer.recipe.resolved import ResolvedRun


def shapes(run: ResolvedRun) -> Shapes:
    """Parameter shapes from the model built on the meta device (no memory, no weights)."""
    config = run.architecture
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=run.recipe.model.trust_remote_code)
    if splits_experts(run.recipe.adapter, config):  # as the adapter run builds it: one linear layer per expert
        split_experts(model)
    params = [Param(n, tuple(p.shape)) for n, p in model.named_parameters()]
    linear = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    qk_norm = any(name.endswith(("attn.q_norm", "attention.q_norm")) for name, _ in model.named_modules())
    return Shapes(config.model_type, params, hidden, intermediate, layers, heads, kv_heads * head_dim,
                  text.vocab_size, linear, model, experts_of(model, text), qk_norm)


def experts_of(model: torch.nn.Module, text: Any) -> Experts | None:
    """The experts of a mixture-of-experts model on the meta device (fused as transformers builds them, or split
    as an adapter run holds them), with their routers: the `gate` beside each experts module."""
    blocks = [(name, m) for name, m in model.named_modules() if _is_experts(m)]
    if not blocks:
        return None
    parameters = sum(p.numel() for _, m in blocks for p in m.parameters())
    routers = 0
    for name, _ in blocks:
        parent = model.get_submodule(name.rpartition(".")[0])
        router = getattr(parent, "gate", None)
        routers += sum(p.numel() for p in router.parameters()) if isinstance(router, torch.nn.Module) else 0
    count = int(blocks[0][1].num_experts)
    per_expert = parameters // (len(blocks) * count)
    intermediate = per_expert // (3 * text.hidden_size)  # gate, up and down: 3 x hidden x intermediate
    return Experts(len(blocks), count, int(getattr(text, "num_experts_per_tok", 1)), intermediate, parameters, routers)


def _is_experts(module: torch.nn.Module) -> bool:
    return isinstance(module, SplitExperts) or (hasattr(module, "num_experts") and any(
        p.dim() == 3 for p in module.parameters(recurse=False)))


def module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def layer_of(name: str) -> str:
    """The decoder layer a parameter belongs to ('model.layers.3'), or the parameter itself outside the layers."""
    parts = name.split(".")
    if "layers" in parts:
        at = parts.index("layers")
        return ".".join(parts[:at + 2])
    return name


def largest_layer(sizes: list[tuple[str, int]]) -> int:
    """The largest sum of `sizes` over the parameters of one decoder layer."""
    per: dict[str, int] = {}
    for name, size in sizes:
        per[layer_of(name)] = per.get(layer_of(name), 0) + size
    return max(per.values())


def tied_elements(sh: Shapes) -> int:
    """Elements of the input embedding when the LM head shares it (0 when untied)."""
    head, embed = sh.meta.get_output_embeddings(), sh.meta.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return 0
    return embed.weight.numel()
