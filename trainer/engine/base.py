"""The seam between the loop and the machinery that runs a step (DDP, DeepSpeed ZeRO, per-layer GaLore).

Contract for the loop:
- `forward(input_ids, attention_mask, position_ids)` returns a `Forward`: the logits, under the engine's autocast,
  and a mixture-of-experts model's load-balancing loss when its config computes one. Packed samples come with
  position ids and no attention mask: attention then stays inside each run of increasing positions. Under
  sequence parallelism every rank of a group is handed the same whole rows and returns the logits of its own
  columns of them (`Forward.columns`).
- `accumulate(is_last)` wraps each micro-step; engines skip gradient sync until the last one.
- `backward(loss)` takes this rank's share of the global loss (its token-loss sum divided by the number of
  loss tokens in the whole global batch); the engine makes the summed gradient come out right whatever its
  backend averages (DDP and ZeRO average over ranks, so they multiply by the world size).
- `step()` does the optimizer step at the accumulation boundary: unscale (fp16), clip, step (or skip on
  overflow; outside fp16 a NaN/inf gradient norm is never applied either), advance the LR schedule once, zero
  the gradients, and reports what happened (its verdict, which trainer/engine/nonfinite.py acts on).
- `updates_in_backward` is true when weights change during backward (per-layer updates): the loop then checks
  the loss before backward, since no step can be skipped afterwards.
- `weights_finite()` is a collective (every rank calls it): whether every trainable weight is finite, checked
  before a checkpoint is written.
- `save(directory)` is called on every rank inside a checkpoint's temporary folder; each rank writes the
  state it owns (weights, optimizer, LR schedule position, loss scaler), in files that load with
  `weights_only=True` or safetensors. `load(directory, saved_world_size)` restores it on every rank, also when the
  checkpoint was written by another number of ranks: the engine then reshards what was sharded (optimizer state,
  ZeRO partitions) for this world size. The checkpoint module adds the manifest, RNG states and counters, and
  commits the folder atomically.
- `module` is the plain model (for export and inspection).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Protocol

import torch
from torch import nn

MODEL_FILE = "model.safetensors"  # a full model's weights in a checkpoint, whatever the engine (export reads it)


@dataclass(frozen=True)
class Forward:
    """One forward's outputs: the logits, and the load-balancing loss of a mixture-of-experts model whose config
    sets output_router_logits (transformers' aux_loss, not yet weighted by router_aux_loss_coef), else None."""

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    columns: slice | None = None  # sequence parallelism: the positions of the rows these logits are (else all)


def forward_of(output: Any) -> Forward:
    """A transformers causal-LM output as a `Forward`."""
    aux = getattr(output, "aux_loss", None)
    return Forward(output.logits, aux if isinstance(aux, torch.Tensor) else None)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""

    grad_norm: float | None  # the global norm before clipping (None where the engine does not measure it)
    skipped: bool  # the update was not applied (an fp16 overflow, or a non-finite gradient)
    loss_scale: float | None  # fp16: the scale this step's loss was multiplied by
    lr: float
    next_loss_scale: float | None = None  # fp16: the scale after this step (halved by an overflow)


class Engine(Protocol):
    module: nn.Module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> Forward: ...

    def accumulate(self, is_last: bool) -> ContextManager[Any]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> StepResult: ...

    @property
    def updates_in_backward(self) -> bool: ...

    def weights_finite(self) -> bool: ...

    def train(self, mode: bool = True) -> None: ...

    def lr(self) -> float: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path, saved_world_size: int) -> None: ...
