"""Fault injection for tests (a testing aid, documented in the README; never set it in real runs).

TRAINER_FAULT holds comma-separated `kind@step` items, e.g. `inf_grad@3,crash@7`:
- `inf_grad@N`: after the backward of optimizer step N (1-based), one gradient element becomes inf
  (exercises fp16 overflow handling).
- `crash@N`: the process dies (os._exit(13)) right after optimizer step N, before anything is saved.
- `sigkill@N`: the process sends itself SIGKILL right after step N (no handler, no cleanup).
- `abort@N`: the process aborts (SIGABRT) right after step N, as a crash in native code does.
- `error@N`: a Python exception (RuntimeError) right after step N, as an unexpected bug on one rank would raise
  while the other ranks go on into the next step's collectives.
- `crash_in_save@N`: the process dies in the middle of writing the checkpoint of step N (after the weights,
  before the manifest).
- `crash_in_prepare@N`: the process dies while building a token store, after its Nth chunk of rows.
Kinds are matched on every rank unless written `kind@N:rR` (rank R only). Under `torchrun --max-restarts`
a fault fires only in the first attempt, so the restarted run can finish.

The variable is read once, at start (`Faults.parse`); the loop calls `after_backward` and `after_step`, the
checkpointer `during_save`.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
ENV = "TRAINER_FAULT"
CRASH_EXIT_CODE = 13
KINDS = ("inf_grad", "crash", "sigkill", "abort", "error", "crash_in_save", "crash_in_prepare")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None  # None: every rank


@dataclass(frozen=True)
class Faults:
    """The faults armed for this process (empty in real runs)."""

    armed: tuple[Fault, ...] = ()
    rank: int = 0

    @classmethod
    def parse(cls, text: str, rank: int, restart_count: int) -> Faults:
        """Faults from a TRAINER_FAULT value, for this rank; none after an elastic restart."""
        if restart_count > 0 or not text.strip():
            return cls((), rank)
        items = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            kind, _, rest = item.partition("@")
            step, _, only = rest.partition(":r")
            if kind not in KINDS or not step.isdigit() or (only and not only.isdigit()):
                raise ValueError(f"{ENV}: cannot read {item!r}; write kind@step or kind@step:rRANK with kind one of "
                                 f"{', '.join(KINDS)}")
            items.append(Fault(kind, int(step), int(only) if only else None))
        return cls(tuple(items), rank)

    @classmethod
    def from_environment(cls, rank: int, restart_count: int) -> Faults:
        return cls.parse(os.environ.get(ENV, ""), rank, restart_count)

    def _fires(self, kind: str, step: int) -> bool:
        return any(f.kind == kind and f.step == step and f.rank in (None, self.rank) for f in self.armed)

    def after_backward(self, step: int, model: nn.Module) -> None:
        """Before optimizer step `step`: an inf in a gradient (what an fp16 overflow looks like)."""
        if self._fires("inf_grad", step):
            for p in model.parameters():
                if p.grad is not None:
                    with torch.no_grad():
                        p.grad.view(-1)[0] = float("inf")
                    return

    def after_step(self, step: int) -> None:
        """After optimizer step `step`: die the way the fault says."""
        if self._fires("crash", step):
            log.error("TRAINER_FAULT: crashing at step %d", step)
            os._exit(CRASH_EXIT_CODE)
        if self._fires("sigkill", step):
            log.error("TRAINER_FAULT: SIGKILL after step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fires("abort", step):
            log.error("TRAINER_FAULT: SIGABRT after step %d", step)
            os.abort()
        if self._fires("error", step):
            raise RuntimeError(f"TRAINER_FAULT: an exception after step {step}")

    def during_prepare(self, chunks_done: int) -> None:
        """While a token store is built, after `chunks_done` chunks of rows."""
        if self._fires("crash_in_prepare", chunks_done):
            log.error("TRAINER_FAULT: crashing while building a token store, after chunk %d", chunks_done)
            os._exit(CRASH_EXIT_CODE)

    def during_save(self, step: int) -> None:
        """In the middle of writing the checkpoint of `step`."""
        if self._fires("crash_in_save", step):
            log.error("TRAINER_FAULT: crashing while saving step %d", step)
            os._exit(CRASH_EXIT_CODE)
