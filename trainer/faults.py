"""Fault injection for tests (a testing aid, documented in the README; never set it in real runs).

TRAINER_FAULT holds comma-separated `kind@step` items, e.g. `inf_grad@3,crash@7`:
- `inf_grad@N`: after the backward of optimizer step N (1-based), one gradient element becomes inf
  (exercises fp16 overflow handling).
- `crash@N`: the process dies (os._exit(13)) right after optimizer step N, before anything is saved.
- `sigkill@N`: the process sends itself SIGKILL right after step N (no handler, no cleanup).
- `abort@N`: the process aborts (SIGABRT) right after step N, as a crash in native code does.
- `crash_in_save@N`: the process dies in the middle of writing the checkpoint of step N (after the weights,
  before the manifest).
Kinds are matched on every rank unless written `kind@N:rR` (rank R only). Under `torchrun --max-restarts`
a fault fires only in the first attempt (TORCHELASTIC_RESTART_COUNT=0), so the restarted run can finish.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from torch import nn

log = logging.getLogger(__name__)
ENV = "TRAINER_FAULT"
CRASH_EXIT_CODE = 13


def _items() -> list[tuple[str, int, int | None]]:
    out = []
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        kind, _, rest = item.partition("@")
        step, _, rank = rest.partition(":r")
        out.append((kind, int(step), int(rank) if rank else None))
    return out


def armed(kind: str, step: int, rank: int) -> bool:
    """True when the environment asks for fault `kind` at this (1-based) step on this rank."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    return any(k == kind and s == step and (r is None or r == rank) for k, s, r in _items())


def poison_grad(model: nn.Module) -> None:
    """Put an inf into the first gradient found (what an fp16 overflow looks like)."""
    for p in model.parameters():
        if p.grad is not None:
            with torch.no_grad():
                p.grad.view(-1)[0] = float("inf")
            return


def crash(step: int) -> None:
    log.error("TRAINER_FAULT: crashing at step %d", step)
    os._exit(CRASH_EXIT_CODE)


def abort(step: int) -> None:
    log.error("TRAINER_FAULT: SIGABRT after step %d", step)
    os.abort()


def sigkill(step: int) -> None:
    log.error("TRAINER_FAULT: SIGKILL after step %d", step)
    os.kill(os.getpid(), signal.SIGKILL)
