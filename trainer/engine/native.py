"""The native engine: one process, or DDP under torchrun (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, ContextManager

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import adapters

from trainer.model import int8_weights
from trainer.distributed import DistInfo, all_reduce_sum
from trainer.engine.base import MODEL_FILE, Forward, StepResult, forward_of
from trainer.errors import CheckpointError
from trainer.optim import restore_schedule
from trainer.optim.per_layer import PerLayerUpdates
from trainer.optim.sharded import ShardedOptimizer, merge_shards, select_state
from trainer.model.precision import Precision
from trainer.safeio import fsync_file, load_tensors, save_tensors

STATE_FILE = "engine-state.pt"


def optimizer_shard_file(rank: int) -> str:
    """distributed.zero_stage 1: each rank writes the optimizer state of the parameters it owns."""
    return f"optimizer-rank{rank:05d}.pt"


class NativeEngine:
    """Plain PyTorch: autocast + GradScaler, DDP with no_sync on accumulation micro-steps, clip, step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, precision: Precision, dist: DistInfo,
                 grad_clip: float | None, per_layer: PerLayerUpdates | None = None) -> None:
        # build_engine moved the model before creating the optimizer: moving it again would swap the tensors of
        # INT8 weights (a tensor subclass), which drops the per-layer hooks already registered on them
        assert all(p.device == dist.device for p in model.parameters()), "move the model before the optimizer"
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.dist = dist
        self.grad_clip = grad_clip
        self.per_layer = per_layer  # updates run inside backward (optim/per_layer.py), which also syncs ranks
        # distributed.zero_stage 1: this rank's own optimizer over the parameters it owns
        self.shard = optimizer if isinstance(optimizer, ShardedOptimizer) else None
        self.wrapped: nn.Module = self.module
        if dist.is_distributed and per_layer is None:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            # gradient_as_bucket_view: the .grad tensors are views into DDP's reduction buckets, so the
            # gradients exist once (by default DDP keeps the buckets besides the .grad tensors: twice)
            self.wrapped = DDP(self.module, device_ids=ids, gradient_as_bucket_view=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> Forward:
        with self.precision.autocast():
            out = self.wrapped(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False)
        return forward_of(out)

    def accumulate(self, is_last: bool) -> ContextManager[Any]:
        if self.per_layer is not None:
            return self.per_layer.micro_step(is_last)
        if isinstance(self.wrapped, DDP) and not is_last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; our loss is already this rank's share of the global mean.
        self.precision.scale(loss * self.dist.world_size).backward()

    def step(self) -> StepResult:
        if self.per_layer is not None:
            return self._per_layer_step()
        self.precision.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        scale = self.precision.loss_scale
        # max_norm=inf measures the global norm without clipping, so grad_norm is logged either way.
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf")))
        lr = self.lr()
        if self.precision.scaler is None and not math.isfinite(norm):
            skipped = True  # never applied; the loop stops the run or counts the step (train.max_nonfinite_steps)
        else:
            skipped = self.precision.step(self.optimizer)
        self.scheduler.step()
        # under DDP the gradients are bucket views: zeroing them in place keeps them views (freeing them would
        # make the next accumulation micro-steps build fresh tensors beside the buckets)
        self.optimizer.zero_grad(set_to_none=not isinstance(self.wrapped, DDP))
        return StepResult(grad_norm=norm, skipped=skipped, loss_scale=scale, lr=lr,
                          next_loss_scale=self.precision.loss_scale)

    def _per_layer_step(self) -> StepResult:
        """Each parameter was updated inside backward (clipped by per_layer.py's rule); finish the last
        updates, then advance the LR schedule once. fp16 is refused with per-layer updates (rules.py)."""
        lr = self.lr()
        norm = self.per_layer.finish()  # type: ignore[union-attr]
        with warnings.catch_warnings():  # torch warns when optimizer.step() was never called: here it never is
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        return StepResult(grad_norm=norm, skipped=False, loss_scale=None, lr=lr)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @property
    def updates_in_backward(self) -> bool:
        return self.per_layer is not None

    def weights_finite(self) -> bool:
        bad = sum(int(not int8_weights.all_finite(p)) for p in self.module.parameters() if p.requires_grad)
        return all_reduce_sum(bad, self.dist.device) == 0

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _load_resharded_optimizer(self, directory: Path, state: dict[str, Any], saved_owners: list[int] | None
                                  ) -> None:
        """The optimizer state of a checkpoint written by another number of ranks (or with other sharding): each
        parameter's state (Adam moments, GaLore/APOLLO projectors, 8-bit states) is taken from the shard that held
        it, and this rank keeps what it owns now (everything, when not sharded). Only the shards holding such
        parameters are read."""
        groups = self.optimizer.param_groups
        sizes = [len(g["params"]) for g in groups]
        if self.shard is not None:
            keep = [owner == self.dist.rank for owner in self.shard.owners]
        else:
            keep = [True] * sum(sizes)
        if saved_owners is None:  # one full optimizer state, written by rank 0
            owners, shards = [0] * sum(sizes), {0: state["optimizer"]}
        else:
            owners = [int(r) for r in saved_owners]
            needed = sorted({r for r, k in zip(owners, keep) if k}) or [0]
            shards = {r: load_tensors(directory / optimizer_shard_file(r)) for r in needed}
        if len(owners) != len(keep):
            raise CheckpointError(f"{directory}: its optimizer state covers {len(owners)} parameters, this model has "
                                  f"{len(keep)}", on_every_rank=True)
        per_param, settings = merge_shards(shards, owners)
        target = self.shard.optim if self.shard is not None else self.optimizer
        target.load_state_dict(select_state(per_param, settings, sizes, keep))

    def save(self, directory: Path) -> None:
        """Rank 0 writes weights and optimizer state: under DDP every rank holds the same copy. An adapter run
        writes only the adapter (a peft directory): the frozen base is re-read from its source on resume.
        With sharded optimizer state every rank writes its own shard first."""
        if self.shard is not None:
            save_tensors(self.shard.optim.state_dict(), directory / optimizer_shard_file(self.dist.rank))
        if not self.dist.is_main:
            return
        if adapters.is_adapted(self.module):
            adapters.save_adapter(self.module, directory / adapters.ADAPTER_DIR)
        else:
            self._save_weights(directory)
        save_tensors({"optimizer": {} if self.shard is not None else self.optimizer.state_dict(),
                      "optimizer_owners": list(self.shard.owners) if self.shard is not None else None,
                      "schedule_step": self.scheduler.last_epoch, "precision": self.precision.state_dict(),
                      "per_layer": self.per_layer.state_dict() if self.per_layer else {}}, directory / STATE_FILE)

    def _save_weights(self, directory: Path) -> None:
        """The model's weights in MODEL_FILE (INT8 ones dequantized, for export and inference) and, with INT8
        weights, their exact values and scales beside it (for resume)."""
        int8 = int8_weights.int8_tensors(self.module)
        if not int8:
            save_model(self.module, str(directory / MODEL_FILE))
        else:
            save_file(int8_weights.plain_state_dict(self.module), str(directory / MODEL_FILE))
            save_file({k: v.contiguous() for k, v in int8.items()}, str(directory / int8_weights.INT8_FILE))
            fsync_file(directory / int8_weights.INT8_FILE)
        fsync_file(directory / MODEL_FILE)

    def _load_weights(self, directory: Path) -> None:
        """MODEL_FILE into the model; INT8 weights from their own file, bit for bit (loading a dequantized value
        into them would round it again)."""
        names = set(int8_weights.int8_names(self.module))
        if not names:
            load_model(self.module, str(directory / MODEL_FILE), device=str(self.dist.device))
            return
        plain = {k: v for k, v in load_file(str(directory / MODEL_FILE), device=str(self.dist.device)).items()
                 if k not in names}
        missing, unexpected = self.module.load_state_dict(plain, strict=False)
        lost = set(missing) - names - int8_weights.shared_names(self.module)
        if lost or unexpected:
            raise RuntimeError(f"{directory / MODEL_FILE}: missing {sorted(lost)[:3]}, unexpected {unexpected[:3]}")
        tensors = load_file(str(directory / int8_weights.INT8_FILE), device=str(self.dist.device))
        int8_weights.load_int8_tensors(self.module, tensors)

    def load(self, directory: Path, saved_world_size: int) -> None:
        if adapters.is_adapted(self.module):
            adapters.load_adapter(self.module, directory / adapters.ADAPTER_DIR)
        else:
            self._load_weights(directory)
        state = load_tensors(directory / STATE_FILE)
        saved_owners = state.get("optimizer_owners")
        sharded = self.shard is not None
        same_layout = saved_world_size == self.dist.world_size and (saved_owners is not None) == sharded
        if same_layout and self.shard is not None:
            self.shard.optim.load_state_dict(load_tensors(directory / optimizer_shard_file(self.dist.rank)))
        elif same_layout or (saved_owners is None and self.shard is None):
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self._load_resharded_optimizer(directory, state, saved_owners)
        if self.per_layer is not None:
            self.per_layer.load_state_dict(state.get("per_layer", {}))
        self.precision.load_state_dict(state["precision"])
        restore_schedule(self.scheduler, int(state["schedule_step"]))
