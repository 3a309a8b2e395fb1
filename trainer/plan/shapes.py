"""The model's shapes for the plan: the model built on the meta device from the resolved architecture (shapes, no
storage, so an 8B or 70B model costs nothing), and the questions the formulas ask of them."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from trainer.plan.items import Param, Shapes
from trainer.recipe.resolved import ResolvedRun


def shapes(run: ResolvedRun) -> Shapes:
    """Parameter shapes from the model built on the meta device (no memory, no weights)."""
    config = run.architecture
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=run.recipe.model.trust_remote_code)
    params = [Param(n, tuple(p.shape)) for n, p in model.named_parameters()]
    linear = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    return Shapes(config.model_type, params, hidden, intermediate, layers, heads, kv_heads * head_dim,
                  text.vocab_size, linear, model)


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
