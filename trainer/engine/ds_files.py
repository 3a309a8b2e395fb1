"""Reading DeepSpeed's checkpoint files without running code from them.

DeepSpeed pickles a few of its own objects into its files (the loss scaler, the ZeRO stage, fragment
addresses) and reads them back with `weights_only=False`, which would run any code a crafted file names.
Every read of a DeepSpeed file in this project goes through `safe_load` (torch's restricted unpickler, with
those few classes allowed), after `check_files` has refused any file naming something else: the engine's
resume (DeepSpeed's own reader is replaced by `safe_load`), resharding on another number of ranks
(ds_reshard.py) and the consolidation of the weights for export (ds_shards.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UnsafeFileError

DS_DIR = "deepspeed"  # DeepSpeed's checkpoint, inside our checkpoint folder
TAG = "state"  # DeepSpeed's checkpoint tag: one per folder, since each of our checkpoints is its own folder

# What DeepSpeed 0.19.8's checkpoint files hold besides tensors and plain containers, found with
# torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 1-3 x fp32/bf16/fp16, with and without offload:
# the loss scaler (numbers), the ZeRO stage (an int enum) and fragment addresses (a dataclass of two ints).
# Allowlisting a class lets the restricted unpickler rebuild an instance from plain fields, or an enum member
# from its value; it never calls a function named by the file.
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_classes() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    classes = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    assert [f"{c.__module__}.{c.__qualname__}" for c in classes] == list(SAFE_GLOBALS)
    return classes


def check_files(folder: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose files name anything beyond plain data and SAFE_GLOBALS, reading
    only each file's pickle (no tensor data, nothing executed)."""
    files = sorted(folder.rglob("*.pt"))
    for f in files:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # not a torch zip file: nothing we would load
            raise UnsafeFileError(f"cannot read {f}: not a valid torch file ({str(e).splitlines()[0]})") from None
        refused = sorted(set(unsafe) - set(SAFE_GLOBALS))
        if refused:
            raise UnsafeFileError(
                f"refusing to load {f}: it names {', '.join(refused)}, which is not plain data (pickled code "
                "would run on load). If you did not create this file, delete it.")


def safe_load(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """DeepSpeed's checkpoint reader, restricted: torch.load with weights_only=True (tensors, plain containers
    and SAFE_GLOBALS only), where DeepSpeed's own TorchCheckpointEngine uses weights_only=False. With `mmap` the
    tensors stay in the file (memory-mapped) until read: slicing one reads only that part."""
    try:
        with torch.serialization.safe_globals(_safe_classes()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"refusing to load {path}: it contains objects other than tensors and plain data "
                              f"(pickled code would run on load). Detail: {str(e).splitlines()[0]}") from None
