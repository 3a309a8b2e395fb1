"""The only reader of RANK / LOCAL_RANK / WORLD_SIZE: process-group init, teardown, and small collectives.

Teardown always runs `barrier()` then `destroy_process_group()`, on error paths too: a gloo process that exits
without them aborts at exit in about half the runs (SIGABRT).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")
SETTLE_S = 0.2  # GIL-free pause before destroying a process group (teardown)
ERROR_TEARDOWN_WAIT_S = 60.0  # at most this (and a tenth of the collective timeout) a failing rank waits for peers
_abandoned = False  # a failing rank left its process group with a barrier unanswered (teardown)


def process_group_abandoned() -> bool:
    """Whether this process left a process group its peers never released: it must end with os._exit, since the
    interpreter's normal exit would join gloo's threads, which wait for those peers forever."""
    return _abandoned


def exit_process(code: int) -> NoReturn:
    """End this process with `code`: normally, or with os._exit after flushing when it abandoned its process group
    (see process_group_abandoned); torchrun then stops the other ranks."""
    if _abandoned:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def let_rank0_report_first(code: int, grace_s: float) -> None:
    """Under torchrun the agent stops every other worker (SIGTERM) as soon as one exits. When all ranks fail with
    the same error, the others wait up to `grace_s` for rank 0 to print it and exit, and leave with the same code
    when stopped."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(code))
    time.sleep(grace_s)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun); for validation before init."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def job_id() -> str:
    """torchrun's id of this job, the same on every node and across elastic restarts ('' outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def elastic_error_file() -> str | None:
    """Where torchrun wants a failing worker to describe its error (TORCHELASTIC_ERROR_FILE), if it does."""
    return os.environ.get("TORCHELASTIC_ERROR_FILE") or None


def restart_count() -> int:
    """How many times torchrun has restarted this job (TORCHELASTIC_RESTART_COUNT; 0 for the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextlib.contextmanager
def distributed_context(backend: str = "auto", timeout_s: int = 1800) -> Iterator[DistInfo]:
    """Init the process group when launched by torchrun (even with one process); always tear it down."""
    world_size = env_world_size()
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(local_rank)
    started = False
    launched = world_size > 1 or ("MASTER_ADDR" in os.environ and "RANK" in os.environ)
    if launched and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"device_id": device} if chosen == "nccl" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(chosen, timeout=timeout, store=_attempt_store(rank, world_size, timeout),
                                rank=rank, world_size=world_size, **kwargs)
        started = True
        log.info("process group up: backend %s, world size %d", chosen, world_size)
    try:
        yield DistInfo(rank, local_rank, world_size, device)
    except BaseException:
        if started:  # the peers may be inside another collective: wait for them a bounded time, then leave
            teardown(wait_s=min(ERROR_TEARDOWN_WAIT_S, timeout_s / 10))
        raise
    if started:
        teardown()


def ensure_process_group(backend: str = "auto") -> None:
    """A process group for code that needs one even in a plain `python -m trainer` run (DeepSpeed): under torchrun
    distributed_context made it; otherwise a one-rank group on an in-memory store (DeepSpeed's own init would try
    MPI discovery and fail), torn down at exit."""
    if dist.is_initialized():
        return
    chosen = backend if backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # what torchrun would set; DeepSpeed reads them itself
        os.environ.setdefault(name, "1" if name == "WORLD_SIZE" else "0")
    atexit.register(teardown)
    log.info("one process without torchrun: a one-rank %s process group", chosen)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, namespaced by torchrun's restart count.

    After `torchrun --max-restarts` brings a job back, the agent's store still holds the previous attempt's
    keys; a rank that reads a peer's address before the peer republishes it connects to a dead process
    ("Connection refused", seen in about half of the restarts here). A prefix per attempt avoids the race.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_hosts_store and rank == 0, timeout=timeout,
                          multi_tenant=not agent_hosts_store)
    return dist.PrefixStore(f"trainer/attempt-{restart_count()}", store)


def teardown(wait_s: float | None = None) -> None:
    """barrier + destroy; never raises (we may already be unwinding an error). With `wait_s`, the barrier gives up
    after that long: a rank that failed alone must not wait for peers stuck in another collective until the
    process group's timeout; it exits, and torchrun stops the others."""
    if not dist.is_initialized():
        return
    try:
        if wait_s is None:
            dist.barrier()
        else:
            dist.barrier(async_op=True).wait(datetime.timedelta(seconds=wait_s))
    except Exception as e:  # a peer died or never came
        log.debug("barrier at teardown failed: %s", e)
        if wait_s is not None:  # destroying the group would wait for the unanswered barrier
            global _abandoned
            _abandoned = True
            return
    _let_collective_threads_settle()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _let_collective_threads_settle() -> None:
    """Give gloo's worker threads the GIL for a moment. A finished barrier is destroyed on a worker thread, and
    with it the earlier collectives it waited for; freeing their tensors (created in Python) needs the GIL. If the
    process group is destroyed first, its destructor (run later, e.g. when DDP's reducer is freed, holding the
    GIL) joins that worker, which waits for the GIL forever: a hang seen at the end of 2-rank runs."""
    gc.collect()
    time.sleep(SETTLE_S)


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """Sum a number over ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum several numbers over ranks in one collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj: T) -> list[T]:
    """Every rank's small picklable object, on every rank (in-memory only, never from a file)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Send a small picklable object from src to every rank (in-memory only, never from a file)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
