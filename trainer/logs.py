"""Where a run's messages go: the console (INFO on rank 0, warnings elsewhere) and, once the output directory is
known, `OUTPUT_DIR/train.log` (rank 0) or `OUTPUT_DIR/train-rank<R>.log` (other ranks: their warnings and errors).
The files also get what the console leaves out: the traceback behind an error shown as one line (`FILE_ONLY`).

The console may go away while a run goes on: `train ... | tee log` and a Ctrl-C in the terminal end `tee` too, and
a closed terminal or SSH session does the same. `keep_going_without_console` makes such writes harmless, so the
run still checkpoints and exits as asked, with everything in its log file."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("datasets", "transformers", "torch.distributed", "bitsandbytes", "urllib3", "filelock", "matplotlib",
         "httpx", "wandb")
# torchao (INT8 weights; transformers imports it whenever it is installed) reports kernels it cannot load on this
# machine and deprecated registrations at import: nothing a run uses or a user can act on
SILENT = ("torchao", "torch.utils._pytree")
# wandb's usage analytics export to the wandb server through opentelemetry, which logs each failed export as an
# error: a server that fails already got one warning (trainer/run/metrics.py), the run goes on
MUTED = ("opentelemetry",)
FILE_ONLY = {"file_only": True}  # `extra=` of a record meant for the log file, not the console


class SurvivingConsole:
    """sys.stdout or sys.stderr, except that a write or flush that fails (the reader of a pipe has gone: EPIPE; a
    hung-up terminal: EIO) does not raise: the stream's descriptor is pointed at /dev/null, so later writes, from
    Python or native code, and the interpreter's last flush at exit (exit status 120 otherwise) succeed too. The
    log file says once that the console went away."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self.stream = stream
        self.name = name
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except OSError as e:
                self._lose(e)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError as e:
                self._lose(e)

    def _lose(self, error: OSError) -> None:
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            self.stream.flush()  # what the failed write left in the buffer goes to /dev/null now
        except (OSError, ValueError):  # no descriptor (a notebook's stream): writes are dropped all the same
            pass
        logging.getLogger("trainer").warning("the console is gone (%s: %s): the run goes on; its messages go "
                                             "to the log file only", self.name, error.strerror or error,
                                             extra=FILE_ONLY)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


def keep_going_without_console() -> None:
    """Make sys.stdout and sys.stderr survive a closed console. Called first thing, so that every handler, progress
    bar and library that takes sys.stderr later takes the surviving one."""
    if not isinstance(sys.stdout, SurvivingConsole):
        sys.stdout = SurvivingConsole(sys.stdout, "stdout")
    if not isinstance(sys.stderr, SurvivingConsole):
        sys.stderr = SurvivingConsole(sys.stderr, "stderr")


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
    for muted in MUTED:
        logging.getLogger(muted).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=FutureWarning)
    _one_copy_of_hub_messages()
    logging.getLogger("DeepSpeed").addFilter(_no_cpu_accelerator_notice)


def _no_cpu_accelerator_notice(record: logging.LogRecord) -> bool:
    """DeepSpeed warns "Setting accelerator to CPU" whenever it is imported without a GPU, and transformers imports
    it on every model load (export, generate, chat printed it). The trainer names its device itself; the filter stays
    on the logger DeepSpeed creates at import (it sets a level and a handler, not filters)."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


def _one_copy_of_hub_messages() -> None:
    """huggingface_hub prints its warnings (each retry of a download that fails) through a console handler of its
    own and passes them on to ours as well: every line came twice. Its handler goes; ours prints each once, in our
    format, and puts it in the log file."""
    try:
        from huggingface_hub.utils import logging as hub_logging  # adds its handler at import: import it first
    except ImportError:
        return
    hub = hub_logging.get_logger()
    for handler in list(hub.handlers):
        if type(handler) is logging.StreamHandler:
            hub.removeHandler(handler)


def log_file(output_dir: Path, rank: int) -> Path:
    return output_dir / ("train.log" if rank == 0 else f"train-rank{rank}.log")


def add_run_log(output_dir: Path, rank: int) -> Path:
    """Append this rank's messages to its file in output_dir, at the console's level."""
    path = log_file(output_dir, rank)
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # no file until there is something to say
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return path
