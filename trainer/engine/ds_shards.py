"""A saved DeepSpeed ZeRO checkpoint read parameter by parameter, whatever number of ranks wrote it.

Each rank of a ZeRO run saves its partition of the fp32 master weights and of the optimizer state as flat
tensors (`zero_pp_rank_R_mp_rank_00_optim_states.pt`), one per parameter group (ZeRO-3: per sub-group). Where
each parameter lies in them depends on the stage:
- ZeRO-1/2: the parameters of a group are flattened one after another and the flat tensor is cut into equal
  partitions, so a parameter is one run of elements split over one or more consecutive ranks. Each file records
  the fragment of every parameter it holds (`param_slice_mappings`: start in the flat tensor, length); a
  parameter's fragments in rank order are its flattened values.
- ZeRO-3: every parameter is cut into equal partitions of ceil(numel / ranks) elements (the last one padded),
  and a rank's flat tensor is its partition of each parameter of the sub-group in order; the order and shapes
  are in the model file (`param_shapes`).

`SavedZero` turns either into `Piece`s (which rank's file holds which elements of a parameter) and reads any
range of a parameter's fp32 weights or optimizer state from the memory-mapped files, so a reader holds at most
the range it asked for and reads from disk only what that range needs. Every file is checked and loaded with
ds_files.safe_load. Used to reshard on resume (ds_reshard.py) and to consolidate the weights for export.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from trainer.engine.ds_files import DS_DIR, TAG, check_files, safe_load
from trainer.errors import CheckpointError

# The keys of DeepSpeed's (0.19.8) checkpoint files that are read here (deepspeed/checkpoint/constants.py).
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
ZERO_STAGE = "zero_stage"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"  # ZeRO-1/2: the fp32 master partition
BASE_OPTIMIZER_STATE = "base_optimizer_state"  # ZeRO-1/2: the torch optimizer's state_dict over the partitions
PARAM_SLICE_MAPPINGS = "param_slice_mappings"
FP32_FLAT_GROUPS = "fp32_flat_groups"  # ZeRO-3: the fp32 master partition
PARAM_SHAPES = "param_shapes"
BUFFER_NAMES = "buffer_names"
FP32 = "fp32"  # the key this module uses for the master weights beside the optimizer's own keys

OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # bf16 runs: bf16_ prefix
MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-1/2, ZeRO-3


def _error(message: str) -> CheckpointError:
    """Every rank reads the same files, so every rank finds the same problem."""
    return CheckpointError(message, on_every_rank=True)


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of a flattened parameter, at `offset` in flat tensor `group` of `rank`."""

    rank: int
    group: int
    offset: int
    start: int
    numel: int


def zero3_partition(numel: int, world_size: int) -> int:
    """Elements of one rank's ZeRO-3 partition of a parameter (the last rank's is padded with zeros)."""
    return math.ceil(numel / world_size)


class SavedZero:
    """The DeepSpeed checkpoint inside one of our checkpoint folders, opened without reading its tensors."""

    def __init__(self, checkpoint: Path) -> None:
        self.folder = checkpoint / DS_DIR / TAG
        if not self.folder.is_dir():
            raise _error(f"{checkpoint}: no DeepSpeed checkpoint in {DS_DIR}/{TAG}/ (was it saved by the "
                         "native engine? distributed.engine must match the run that saved it)")
        check_files(self.folder)
        optim_files = sorted((int(m.group(1)), f) for f in self.folder.iterdir() if (m := OPTIM_FILE.match(f.name)))
        if [rank for rank, _ in optim_files] != list(range(len(optim_files))) or not optim_files:
            raise _error(f"{self.folder}: the optimizer shards are not those of ranks 0..N-1 "
                         f"({[f.name for _, f in optim_files][:4]})")
        model = next((self.folder / n for n in MODEL_FILES if (self.folder / n).is_file()), None)
        if model is None:
            raise _error(f"{self.folder}: DeepSpeed's model file ({' or '.join(MODEL_FILES)}) is missing")
        self.model: dict[str, Any] = safe_load(model, "cpu", mmap=True)  # ZeRO-1/2: the weights stay on disk
        self.shards: list[dict[str, Any]] = [safe_load(f, "cpu", mmap=True)[OPTIMIZER_STATE_DICT]
                                             for _, f in optim_files]
        self.world_size = len(self.shards)
        self.stage = int(self.shards[0][ZERO_STAGE])
        self.shapes: dict[str, torch.Size] = {n: s for group in self.model[PARAM_SHAPES] for n, s in group.items()}
        self.pieces = self._zero3_pieces() if self.stage == 3 else self._zero12_pieces()
        self.bytes_read = 0  # by `read`, for the log

    def _zero12_pieces(self) -> dict[str, list[Piece]]:
        if not isinstance(self.shards[0][BASE_OPTIMIZER_STATE], dict):
            raise _error(f"{self.folder} was saved with zero_optimization.elastic_checkpoint, whose layout "
                         "is not read here; resume it on the number of ranks that saved it")
        pieces: dict[str, list[Piece]] = {}
        for rank, shard in enumerate(self.shards):  # in rank order: each parameter's fragments in order
            for group, mapping in enumerate(shard[PARAM_SLICE_MAPPINGS]):
                for name, address in mapping.items():
                    held = pieces.setdefault(name, [])
                    start = sum(p.numel for p in held)
                    held.append(Piece(rank, group, address.start, start, address.numel))
        self._check_complete({name: sum(p.numel for p in ps) for name, ps in pieces.items()})
        return pieces

    def _zero3_pieces(self) -> dict[str, list[Piece]]:
        pieces: dict[str, list[Piece]] = {}
        for group, shapes in enumerate(self.model[PARAM_SHAPES]):
            offset = 0
            for name, shape in shapes.items():
                numel, size = shape.numel(), zero3_partition(shape.numel(), self.world_size)
                pieces[name] = [Piece(rank, group, offset, rank * size, min(size, numel - rank * size))
                                for rank in range(self.world_size) if rank * size < numel]
                offset += size
            held = self.shards[0][FP32_FLAT_GROUPS][group].numel()
            if offset != held:
                raise _error(f"{self.folder}: the ZeRO-3 partitions of sub-group {group} hold {held} "
                             f"elements, its parameters need {offset}; the checkpoint is not one this "
                             "version can read")
        self._check_complete({name: sum(p.numel for p in ps) for name, ps in pieces.items()})
        return pieces

    def _check_complete(self, found: dict[str, int]) -> None:
        short = [name for name in found.keys() | self.shapes.keys()
                 if name not in self.shapes or found.get(name) != self.shapes[name].numel()]
        if short:
            raise _error(f"{self.folder}: the shards do not hold all of {short[:3]}; the checkpoint is "
                         "damaged or not one this version can read")

    def flat(self, rank: int, group: int, key: str) -> torch.Tensor:
        """Rank `rank`'s flat tensor of `group`: the fp32 master weights (FP32) or an optimizer state key."""
        shard = self.shards[rank]
        if key == FP32:
            return shard[FP32_FLAT_GROUPS if self.stage == 3 else SINGLE_PARTITION_OF_FP32_GROUPS][group]
        optimizer = shard[OPTIMIZER_STATE_DICT if self.stage == 3 else BASE_OPTIMIZER_STATE]
        return optimizer["state"][group][key]

    def optimizer_state(self) -> dict[str, Any]:
        """Rank 0's torch optimizer state_dict (its state per flat tensor, its param_groups)."""
        return self.shards[0][OPTIMIZER_STATE_DICT if self.stage == 3 else BASE_OPTIMIZER_STATE]

    def state_keys(self) -> tuple[list[str], dict[str, Any]]:
        """(the optimizer state keys held element by element, like Adam's moments; the others, like the step
        count, with their value). The others must agree over every group and rank, since they are kept, not
        resharded; state of any other shape (8-bit optimizers' block-wise scales) cannot be resharded."""
        elementwise: set[str] = set()
        scalars: dict[str, Any] = {}
        for rank in range(self.world_size):
            state = self.shards[rank][OPTIMIZER_STATE_DICT if self.stage == 3 else BASE_OPTIMIZER_STATE]["state"]
            for group, values in state.items():
                held = self.flat(rank, group, FP32).numel()
                for key, value in values.items():
                    if torch.is_tensor(value) and value.dim() == 1 and value.is_floating_point() \
                            and value.numel() >= held:
                        elementwise.add(key)
                    elif torch.is_tensor(value) and value.numel() > 1:
                        raise _error(
                            f"{self.folder}: the optimizer state {key!r} ({tuple(value.shape)}, {value.dtype}) is "
                            "not held element by element, so it cannot be resharded for another number of ranks "
                            "(8-bit optimizers quantize it in blocks of the flat partition); resume on "
                            f"{self.world_size} ranks, or use optimizer.name: adamw")
                    elif key in scalars and not _same(scalars[key], value):
                        raise _error(f"{self.folder}: the optimizer's {key!r} differs between groups or "
                                     f"ranks ({scalars[key]} vs {value}); it cannot be resharded")
                    else:
                        scalars[key] = value
        return sorted(elementwise), scalars

    def read(self, name: str, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of parameter `name`'s flattened fp32 weights (FP32) or optimizer state `key`,
        copied out of the shards that hold them (only those pages of the files are read)."""
        out: torch.Tensor | None = None
        covered = 0
        for piece in self.pieces[name]:
            low, high = max(start, piece.start), min(stop, piece.start + piece.numel)
            if low >= high:
                continue
            flat = self.flat(piece.rank, piece.group, key)
            if out is None:
                out = torch.empty(stop - start, dtype=flat.dtype)
            out[low - start:high - start] = flat[piece.offset + low - piece.start:piece.offset + high - piece.start]
            covered += high - low
            self.bytes_read += (high - low) * flat.element_size()
        assert out is not None and covered == stop - start, f"{name}[{start}:{stop}] is not covered by the shards"
        return out

    def full(self, name: str, key: str = FP32) -> torch.Tensor:
        """A parameter's whole fp32 weights (or optimizer state), in its shape."""
        shape = self.shapes[name]
        return self.read(name, key, 0, shape.numel()).view(shape)

    def buffers(self) -> dict[str, torch.Tensor]:
        """The module's persistent buffers, whole in the model file at every stage."""
        module = self.model.get("module") or {}
        return {name: module[name] for name in self.model.get(BUFFER_NAMES) or [] if name in module}


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.equal(torch.as_tensor(a).float(), torch.as_tensor(b).float())
    return bool(a == b)


def has_zero_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / DS_DIR / TAG).is_dir()


def consolidated_weights(checkpoint: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole fp32 tensor) of every trainable parameter and persistent buffer of a DeepSpeed checkpoint,
    one at a time, from the fp32 master partitions of every rank: what `model.safetensors` would hold. Tied
    weights appear once, under the name DeepSpeed recorded (the module's first)."""
    saved = SavedZero(checkpoint)
    for name in saved.shapes:
        yield name, saved.full(name)
    yield from saved.buffers().items()
