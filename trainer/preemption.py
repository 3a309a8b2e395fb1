"""Preemption: SIGTERM (what torchrun, Kubernetes and most schedulers send) and SIGUSR1 (what Slurm's
`--signal` sends) ask the run to finish its current step, save a checkpoint and exit 0. The loop makes every
rank agree on the request before acting (ranks may receive the signal at different steps)."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by the signal handler; read by the loop once per step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("received %s: finishing this step, then saving a checkpoint and exiting",
                        signal.Signals(signum).name)
        self.requested = True

    def __enter__(self) -> PreemptionFlag:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
