"""Resuming a DeepSpeed ZeRO-1/2/3 run on another number of ranks, in-process: nothing to run beforehand, nothing
written to disk.

Each rank fills its new partitions straight from the saved shards: for every parameter the optimizer holds, the
elements this rank now owns (ZeRO-1/2: its fragment of the flat group, from the parameter's `_hp_mapping`;
ZeRO-3: its equal share of every parameter) are read from whichever old ranks' files hold them (ds_shards.py,
memory-mapped through the safe loader), for the fp32 master weights and each element-wise optimizer state
(Adam's two moments). The result is exactly the state dict this rank would have saved had the run always had
this many ranks, and DeepSpeed's own same-world-size loader (`optimizer.load_state_dict`) takes it from there:
the loss scaler, the optimizer's step count and hyperparameters, the fp32 -> bf16/fp16 weights (ZeRO-1/2 then
all-gathers them, ZeRO-3 re-gathers its persistent parameters).

Why not DeepSpeed's universal checkpoints (ds_to_universal + `load_universal`): the converter writes a second
copy of the whole optimizer state (the fp32 weights and both moments of every parameter, then merged again) to
disk, one process converts everything while the others wait, it forks worker pools, and both it and the
universal loader read every file with `torch.load(weights_only=False)` in a dozen places (pickled code would
run); loading it also needs `checkpoint.load_universal` in the config the engine was built with. Here each rank
reads only about its own share of the shards (1/N of the bytes, plus the fragments at partition boundaries),
holds at most one parameter's slice beside its own partitions, and every read is a restricted one.

The engine's own counters (global steps and samples, skipped steps) and our client state (schedule position,
skip counter) come from the saved model file; the LR of the restored optimizer is then set by our schedule.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from trainer.engine.ds_shards import FP32, Piece, SavedZero
from trainer.errors import CheckpointError

log = logging.getLogger(__name__)

Targets = list[tuple[str, Piece]]  # (parameter name, where this rank keeps which of its elements)


def _zero12_targets(optimizer: Any, rank: int) -> tuple[Targets, set[str]]:
    """ZeRO-1/2: the fragment of each parameter inside this rank's flat partition (none for most), and the names of
    every parameter the optimizer holds."""
    targets, names = [], set()
    for group in optimizer.bit16_groups:
        for param in group:
            name = optimizer.param_names[param]
            names.add(name)
            fragment = param._hp_mapping
            if fragment is None:  # held by other ranks only
                continue
            at, of = fragment.hp_fragment_address, fragment.lp_fragment_address
            assert at.numel == of.numel
            targets.append((name, Piece(rank, fragment.param_group_index, at.start, of.start, of.numel)))
    return targets, names


def _zero3_targets(optimizer: Any, rank: int) -> tuple[Targets, set[str]]:
    """ZeRO-3: this rank's equal share of every parameter (the last rank's share padded, the padding left at 0)."""
    targets, names = [], set()
    for sub_group in optimizer.fp16_groups:
        for param in sub_group:
            name = optimizer.param_names[param]
            names.add(name)
            group, offset, size = optimizer.grad_position[optimizer.get_param_id(param)]
            start = optimizer._get_param_partition_rank(param) * size
            numel = min(size, param.ds_numel - start)
            if numel > 0:
                targets.append((name, Piece(rank, group, offset, start, numel)))
    return targets, names


def _master_partitions(optimizer: Any, stage: int) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per group (ZeRO-3: per sub-group), filled in place."""
    return list(optimizer.fp32_partitioned_groups_flat if stage == 3 else optimizer.single_partition_of_fp32_groups)


def _group_of(optimizer: Any, stage: int) -> list[int]:
    """The torch param group of each flat tensor (ZeRO-1/2: one flat tensor per group; ZeRO-3: per sub-group)."""
    flats = len(_master_partitions(optimizer, stage))
    if stage != 3:
        return list(range(flats))
    return [int(optimizer.sub_group_to_group_id[sub]) for sub in range(flats)]


def _optimizer_state_dict(optimizer: Any, stage: int, saved: SavedZero, moments: dict[str, list[torch.Tensor]],
                          scalars: dict[str, Any]) -> dict[str, Any]:
    """The base optimizer's state_dict over this rank's partitions, numbered as DeepSpeed numbers them when it
    saves (the flat tensors of group 0, then of group 1, ...): the resharded moments, the saved scalar state (the
    step count) and the saved hyperparameters of each group."""
    group_of = _group_of(optimizer, stage)
    saved_groups = saved.optimizer_state()["param_groups"]
    if len(saved_groups) != len(optimizer.optimizer.param_groups):
        raise CheckpointError(f"{saved.folder}: the optimizer had {len(saved_groups)} parameter groups, now "
                              f"{len(optimizer.optimizer.param_groups)}; it cannot be resumed", on_every_rank=True)
    order = sorted(range(len(group_of)), key=lambda flat: (group_of[flat], flat))  # state index -> flat tensor
    state = {index: {**{k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()},
                     **{key: tensors[flat] for key, tensors in moments.items()}}
             for index, flat in enumerate(order)}
    param_groups = [{**{k: v for k, v in saved_group.items() if k != "params"},
                     "params": [index for index, flat in enumerate(order) if group_of[flat] == group]}
                    for group, saved_group in enumerate(saved_groups)]
    return {"state": state, "param_groups": param_groups}


# What DeepSpeed's optimizer files hold besides the partitions, the same on every rank; taken from rank 0's.
GLOBAL_KEYS = {1: ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "ds_version"),
               2: ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "ds_version"),
               3: ("loss_scaler", "dynamic_loss_scale", "overflow")}
SUPPORTED = {1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


def load_resharded(ds: Any, checkpoint: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Every rank: load the DeepSpeed checkpoint inside `checkpoint`, written by any number of ranks, into the live
    engine `ds` (a deepspeed.DeepSpeedEngine, freshly built); returns the saved engine's client state. A collective
    (ZeRO-1/2 all-gather the weights afterwards, ZeRO-3 its persistent parameters)."""
    started = time.perf_counter()
    saved = SavedZero(checkpoint)
    optimizer, stage = ds.optimizer, int(ds.zero_optimization_stage())
    if saved.stage != stage:
        raise CheckpointError(f"{checkpoint} was saved at ZeRO stage {saved.stage}, this run is at stage {stage}",
                              on_every_rank=True)
    if type(optimizer).__name__ != SUPPORTED[stage] or getattr(optimizer, "swap_optimizer", False):
        raise CheckpointError(f"{checkpoint} was written by {saved.world_size} ranks and this DeepSpeed optimizer "
                              f"({type(optimizer).__name__}) cannot be resharded; resume on {saved.world_size} ranks",
                              on_every_rank=True)
    targets, names = (_zero3_targets if stage == 3 else _zero12_targets)(optimizer, rank)
    if names != set(saved.shapes):
        missing, extra = sorted(set(saved.shapes) - names), sorted(names - set(saved.shapes))
        raise CheckpointError(f"{checkpoint}: its optimizer holds other parameters than this model's (only saved: "
                              f"{missing[:3]}, only here: {extra[:3]})", on_every_rank=True)
    keys, scalars = saved.state_keys()
    masters = _master_partitions(optimizer, stage)
    moments = {key: [torch.zeros_like(m) for m in masters] for key in keys}
    with torch.no_grad():  # the master partitions are the optimizer's leaf tensors
        for name, piece in targets:  # one parameter's slice at a time
            stop = piece.start + piece.numel
            for key, flats in ((FP32, masters), *moments.items()):
                flats[piece.group].narrow(0, piece.offset, piece.numel).copy_(saved.read(name, key, piece.start, stop))
    shard0 = saved.shards[0]
    state = {k: shard0[k] for k in GLOBAL_KEYS[stage]}
    optimizer_state = _optimizer_state_dict(optimizer, stage, saved, moments, scalars)
    if stage == 3:
        state.update(optimizer_state_dict=optimizer_state, fp32_flat_groups=masters)
        optimizer.checkpoint_event_prologue()  # as DeepSpeedEngine.load_checkpoint does around it
        optimizer.load_state_dict([state] * world_size, load_optimizer_states=True, load_from_fp32_weights=True)
        optimizer.checkpoint_event_epilogue()
    else:
        # the fp32 partitions were filled in place: DeepSpeed copies them onto themselves
        state.update(base_optimizer_state=optimizer_state, single_partition_of_fp32_groups=masters,
                     param_alignment_paddings=optimizer.round_robin_bit16_padding)
        optimizer.load_state_dict([state] * world_size, load_optimizer_states=True, load_from_fp32_weights=True)
        optimizer.update_lp_params()  # the bf16/fp16 (or fp32) weights from the master partitions, all-gathered
    _restore_engine_counters(ds, saved)
    log.info("resharded DeepSpeed ZeRO-%d state from %d ranks to %d in %.2f s: this rank read %.1f MB of the "
             "shards", stage, saved.world_size, world_size, time.perf_counter() - started, saved.bytes_read / 1e6)
    return saved.model


def _restore_engine_counters(ds: Any, saved: SavedZero) -> None:
    """What DeepSpeedEngine.load_checkpoint restores besides the optimizer: its step and sample counters, and the
    module's persistent buffers (whole in the model file)."""
    model = saved.model
    ds.global_steps = int(model["global_steps"])
    ds.global_samples = int(model.get("global_samples", ds.global_steps * ds.train_batch_size()))
    ds.skipped_steps = int(model["skipped_steps"])
    ds.loaded_checkpoint_dp_world_size = saved.world_size
    buffers = dict(ds.module.named_buffers())
    with torch.no_grad():
        for name, value in saved.buffers().items():
            buffers[name].copy_(value)
