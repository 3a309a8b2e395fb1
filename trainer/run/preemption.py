"""Stopping cleanly: SIGTERM (what torchrun, Kubernetes and most schedulers send), SIGUSR1 (what Slurm's `--signal`
sends) and SIGINT (Ctrl-C) ask the run to finish its current step, save a checkpoint and exit 0. The loop makes
every rank agree on the request before acting (ranks may receive the signal at different steps). A second Ctrl-C
exits at once, with one line and no traceback: the work since the last checkpoint is then lost."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from trainer.errors import EXIT_INTERRUPTED

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    """Set by the signal handler; read by the loop once per step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.requested:
            sys.stderr.write("\ninterrupted again: exiting now without a checkpoint (the work since the last one is "
                             "lost)\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        if not self.requested:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.warning("received %s: finishing this step, then saving a checkpoint and exiting%s", name,
                        " (Ctrl-C again to quit at once)" if signum == signal.SIGINT else "")
        self.requested = True

    def __enter__(self) -> PreemptionFlag:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
