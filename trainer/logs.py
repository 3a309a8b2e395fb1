"""Where a run's messages go: the console (INFO on rank 0, warnings elsewhere) and, once the output directory is
known, `OUTPUT_DIR/train.log` (rank 0) or `OUTPUT_DIR/train-rank<R>.log` (other ranks: their warnings and errors).
The files also get what the console leaves out: the traceback behind an error shown as one line (`FILE_ONLY`)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("datasets", "transformers", "torch.distributed", "bitsandbytes", "urllib3", "filelock", "matplotlib",
         "httpx", "wandb")
# torchao (INT8 weights; transformers imports it whenever it is installed) reports kernels it cannot load on this
# machine and deprecated registrations at import: nothing a run uses or a user can act on
SILENT = ("torchao", "torch.utils._pytree")
FILE_ONLY = {"file_only": True}  # `extra=` of a record meant for the log file, not the console


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def setup_console(rank: int, world_size: int) -> None:
    """INFO on rank 0, warnings only elsewhere; quiet the libraries' chatter."""
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    logging.basicConfig(level=level, stream=sys.stderr, force=True, format=prefix + FORMAT, datefmt="%H:%M:%S")
    logging.getLogger().handlers[0].addFilter(_not_file_only)
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for silent in SILENT:
        logging.getLogger(silent).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def log_file(output_dir: Path, rank: int) -> Path:
    return output_dir / ("train.log" if rank == 0 else f"train-rank{rank}.log")


def add_run_log(output_dir: Path, rank: int) -> Path:
    """Append this rank's messages to its file in output_dir, at the console's level."""
    path = log_file(output_dir, rank)
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # no file until there is something to say
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return path
