"""Mixture-of-experts layers in an adapter run: the experts split into one linear layer per expert and projection, so
that bitsandbytes quantizes them (QLoRA) and peft can adapt them (adapter.target_experts).

Why: transformers 5 stores the experts of Qwen3-MoE, Mixtral and their kin as two fused 3-D parameters per layer
(`experts.gate_up_proj`, num_experts x 2*intermediate x hidden, and `experts.down_proj`, num_experts x hidden x
intermediate). bitsandbytes quantizes `nn.Linear` layers only, so under QLoRA these stayed in bf16: for
Qwen3-30B-A3B 95% of the weights, 54 GiB instead of 13.9 in 4 bits. `SplitExperts` holds the same weights as one
`nn.Linear` per expert (`experts.gate_up_proj.expert3`, `experts.down_proj.expert3`), which transformers' quantizer
turns into 4-bit layers like any other, each with its own quantization constants, dequantized only when its expert
is hit. Its forward is transformers' own eager loop over the experts the router picked, so the function is the same.
Every adapter run on a mixture of experts splits them (plain LoRA too: the split experts are what
adapter.target_experts adapts, and what keeps peft's own rewrite of all-linear for these families, which adapts the
fused experts and the router, out of the way); full fine-tuning keeps transformers' fused experts.

The router (`mlp.gate`) is not a linear layer and is never quantized: it stays in the precision's dtype.

Only the layout transformers' default experts implementation computes is split (gate and up fused in that order,
no bias, the default SiLU-style gate, no norm after the experts); `unsupported_experts` names any other 3-D expert
weights, which validation refuses for adapter runs rather than leave them silently unquantized.

Checkpoints on disk hold the experts fused (as transformers 5 saves them) or one tensor per expert (as the hub
ships Qwen3-MoE: `experts.3.gate_proj.weight`, and Mixtral: `block_sparse_moe.experts.3.w1.weight`); `sources`
says where each split weight comes from in either layout, for the module-by-module loader (adapters/streamed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.recipe.schema import AdapterConfig

EXPERT = "expert"  # the name of expert i's linear layer in a projection: expert0, expert1, ...
PROJECTIONS = ("gate_up_proj", "down_proj")


def is_moe(config: Any) -> bool:
    """A mixture-of-experts architecture, by its config (no model built)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(int(getattr(text, key, 0) or 0) > 1 for key in ("num_experts", "num_local_experts", "n_routed_experts"))


def splits_experts(adapter: AdapterConfig, config: Any) -> bool:
    """Whether a run splits its base's experts: every adapter run on a mixture-of-experts model (qlora quantizes them,
    adapter.target_experts adapts them, and with neither no peft rule reaches them); full fine-tuning keeps
    transformers' fused experts."""
    return adapter.type != "none" and is_moe(config)


def _is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: fused 3-D weights, the attributes @use_experts_implementation sets."""
    weights = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    return bool(weights) and hasattr(module, "num_experts")


def _splittable(module: nn.Module) -> str | None:
    """Why this fused experts module cannot be split (None when it can)."""
    from transformers.integrations.moe import _default_apply_gate

    names = {n for n, p in module.named_parameters(recurse=False)}
    if names != set(PROJECTIONS):
        return f"its expert weights are {', '.join(sorted(names))}, not gate_up_proj and down_proj"
    if getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        return "its experts have biases or no gate projection"
    if getattr(module, "has_post_expert_norm", False) or not getattr(module, "is_concatenated", True):
        return "its experts normalize their output or interleave gate and up"
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return "its experts use a gate function of their own"
    return None


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fused experts module in `model`."""
    return [(name, m) for name, m in model.named_modules() if _is_fused_experts(m)]


def unsupported_experts(model: nn.Module) -> list[str]:
    """'name: why' for each fused experts module `SplitExperts` cannot stand for."""
    out = []
    for name, module in fused_experts(model):
        why = _splittable(module)
        if why:
            out.append(f"{name} ({type(module).__name__}): {why}")
    return out


class SplitExperts(nn.Module):
    """The experts of one MoE layer, one `nn.Linear` (or 4-bit layer, or LoRA-wrapped layer) per expert and
    projection; computes what transformers' eager experts loop computes."""

    def __init__(self, fused: Any, device: torch.device | str | None = None) -> None:
        super().__init__()
        gate_up, down = fused.gate_up_proj, fused.down_proj
        self.num_experts = int(fused.num_experts)
        self.transposed = bool(getattr(fused, "is_transposed", False))  # weights stored as (in, out)
        self.fused_type = type(fused)  # to rebuild transformers' layout (merged exports)
        self.config = fused.config
        hidden, double = (gate_up.shape[1], gate_up.shape[2]) if self.transposed else (gate_up.shape[2],
                                                                                         gate_up.shape[1])
        device = device if device is not None else gate_up.device
        self.act_fn: nn.Module = fused.act_fn
        self.gate_up_proj = nn.ModuleDict({f"{EXPERT}{i}": nn.Linear(hidden, double, bias=False, device=device,
                                                                    dtype=gate_up.dtype)
                                           for i in range(self.num_experts)})
        self.down_proj = nn.ModuleDict({f"{EXPERT}{i}": nn.Linear(double // 2, hidden, bias=False, device=device,
                                                                 dtype=down.dtype)
                                        for i in range(self.num_experts)})

    def expert_weight(self, projection: str, fused: torch.Tensor, index: int) -> torch.Tensor:
        """Expert `index`'s (out, in) weight from a fused 3-D tensor in this layer's layout."""
        weight = fused[index]
        return weight.t() if self.transposed else weight

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit:
            e = int(index[0])
            if e == self.num_experts:  # transformers' index for a token sent to no expert here
                continue
            position, token = torch.where(mask[e])
            gate, up = self.gate_up_proj[f"{EXPERT}{e}"](hidden_states[token]).chunk(2, dim=-1)
            out = self.down_proj[f"{EXPERT}{e}"](self.act_fn(gate) * up)
            out = out * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent), child


def split_experts(model: nn.Module, *, copy_weights: bool = True) -> int:
    """Replace every fused experts module of `model` by a `SplitExperts` holding the same weights (on the meta
    device nothing is copied; `copy_weights=False` leaves them to a loader). Returns how many were split."""
    count = 0
    for name, fused in fused_experts(model):
        split = SplitExperts(fused)
        if copy_weights and fused.gate_up_proj.device.type != "meta":
            with torch.no_grad():
                for projection in PROJECTIONS:
                    whole = getattr(fused, projection)
                    for i, layer in enumerate(getattr(split, projection).values()):
                        layer.weight.copy_(split.expert_weight(projection, whole, i))
        parent, child = _parent(model, name)
        setattr(parent, child, split)
        count += 1
    return count


def fuse_experts(model: nn.Module) -> None:
    """Put transformers' fused experts back in place of every `SplitExperts` holding plain linear layers (a merged
    export is an ordinary transformers model)."""
    for name, split in [(n, m) for n, m in model.named_modules() if isinstance(m, SplitExperts)]:
        with torch.device("meta"):
            fused = split.fused_type(split.config)
        for projection in PROJECTIONS:
            weights = [layer.weight.detach() for layer in getattr(split, projection).values()]
            stacked = torch.stack([w.t() if split.transposed else w for w in weights])
            setattr(fused, projection, nn.Parameter(stacked, requires_grad=False))
        parent, child = _parent(model, name)
        setattr(parent, child, fused)


# ------------------------------------------------------------------------------------ where weights come from

@dataclass(frozen=True)
class ExpertSource:
    """Where one split expert weight is in a checkpoint: `pieces` tensor names concatenated along the output rows,
    or one fused tensor (`fused`) of which it is row `index` (transposed when the layer stores (in, out))."""

    fused: str
    index: int
    transposed: bool
    pieces: tuple[tuple[str, ...], ...]  # per-expert layouts, tried in order: ((gate, up), ...) or ((down,), ...)


# The per-expert names of the hub checkpoints transformers 5 converts to fused experts when it loads them
# (transformers' conversion_mapping.py: qwen2_moe, which Qwen3-MoE uses, and mixtral).
_PER_EXPERT = {
    "gate_up_proj": (("{experts}.{i}.gate_proj.weight", "{experts}.{i}.up_proj.weight"),
                     ("{mixtral}.{i}.w1.weight", "{mixtral}.{i}.w3.weight")),
    "down_proj": (("{experts}.{i}.down_proj.weight",), ("{mixtral}.{i}.w2.weight",)),
}


def mixtral_name(name: str) -> str:
    """Mixtral's hub checkpoints keep the MoE block under its old name, `block_sparse_moe` (router included)."""
    return name.replace(".mlp.", ".block_sparse_moe.", 1)


def sources(model: nn.Module) -> dict[str, ExpertSource]:
    """{parameter name in `model`: its source} for every split expert weight."""
    out = {}
    for name, split in model.named_modules():
        if not isinstance(split, SplitExperts):
            continue
        for projection in PROJECTIONS:
            layouts = tuple(tuple(p.format(experts=name, mixtral=mixtral_name(name), i="{i}") for p in layout)
                            for layout in _PER_EXPERT[projection])
            for i in range(split.num_experts):
                pieces = tuple(tuple(p.format(i=i) for p in layout) for layout in layouts)
                out[f"{name}.{projection}.{EXPERT}{i}.weight"] = ExpertSource(f"{name}.{projection}", i,
                                                                               split.transposed, pieces)
    return out


def read_expert(source: ExpertSource, reader: Any) -> torch.Tensor:
    """One expert weight (out, in) from a checkpoint `reader` (`in`, `read(name)`, `read_row(name, i)`): its row
    of the fused tensor, or its per-expert pieces concatenated (gate above up)."""
    if source.fused in reader:
        weight = reader.read_row(source.fused, source.index)
        return weight.t().contiguous() if source.transposed else weight
    for layout in source.pieces:
        if all(piece in reader for piece in layout):
            return torch.cat([reader.read(piece) for piece in layout], dim=0)
    raise KeyError(source.fused)


def describe_experts(model: nn.Module) -> str:
    """For the adapter's log line: how many layers of how many experts, stored how ('' for a dense model)."""
    splits = [m for m in model.modules() if isinstance(m, SplitExperts)]
    if not splits:
        return ""
    layers = [layer for s in splits for p in PROJECTIONS for layer in getattr(s, p).values()]
    stored = {type(getattr(layer, "base_layer", layer).weight).__name__ for layer in layers}
    kind = "4-bit" if stored == {"Params4bit"} else ", ".join(sorted(stored))
    return f"{len(splits)} MoE layers x {splits[0].num_experts} experts split into {len(layers)} {kind} linear layers"
