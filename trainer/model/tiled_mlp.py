"""Tiled MLP (model.tiled_mlp): each layer's MLP computed in tiles along the sequence, each tile recomputed in
backward, so its intermediate activations (gate, up, their product: 3 x intermediate_size per token, about 3.5x
the hidden size each in Llama) exist for one tile at a time instead of the whole sequence.

An MLP works token by token, so a tile's output is exactly the untiled output's rows. Each tile runs under
non-reentrant activation checkpointing: the forward keeps only the tile's input (a view of the layer's input, no
copy), and backward recomputes one tile, takes its gradient and lets it go before the next. It is one autograd
graph: each weight's gradient is accumulated once per backward (the tiles' contributions are summed before
autograd hands it over), which is what DeepSpeed's ZeRO-2/3 gradient hooks expect. With gradient checkpointing
the layer's own recompute runs the tiles again the same way.

The MLP keeps its parameters and names: its instance's forward is wrapped, nothing is replaced, so checkpoints
and export see the same model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

SPARSE_MARKERS = ("moe", "sparse", "experts")  # mixture-of-experts blocks route tokens: left untiled


def _tiled_forward(forward: Callable[[Tensor], Tensor], tiles: int, hidden_states: Tensor, *args: Any,
                   **kwargs: Any) -> Tensor:
    """The MLP's forward over `tiles` slices of the sequence (dim -2; the last slices one token shorter when the
    length does not divide)."""
    if tiles == 1 or hidden_states.size(-2) < 2 or not torch.is_grad_enabled():
        return forward(hidden_states, *args, **kwargs)
    pieces = torch.tensor_split(hidden_states, min(tiles, hidden_states.size(-2)), dim=-2)
    outs = [checkpoint(forward, piece, *args, use_reentrant=False, **kwargs) for piece in pieces]
    return torch.cat(outs, dim=-2)


def dense_mlps(model: nn.Module) -> list[nn.Module]:
    """The dense MLP of every decoder layer (modules named `mlp` that are not mixture-of-experts blocks)."""
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__.lower()
        if name.split(".")[-1] == "mlp" and not any(marker in kind for marker in SPARSE_MARKERS):
            found.append(module)
    return found


def tile_mlps(model: nn.Module, tiles: int) -> int:
    """Compute every dense MLP of the model in `tiles` tiles; returns how many MLPs were tiled."""
    mlps = dense_mlps(model)
    for mlp in mlps:
        mlp.forward = functools.partial(_tiled_forward, mlp.forward, tiles)
    return len(mlps)

