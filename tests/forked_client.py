"""Test helper: stands in for `python -m MODULE ARGS` (one process, or one rank that torchrun starts) and has the
process run as a child forked from the tests' pre-imported server (tests/forked_cli.py). Imports only the
standard library, so it starts in a few tens of milliseconds.

    python -m tests.forked_client MODULE [ARGS...]     (the server's socket in TRAINER_FORK_SERVER)

It passes its standard input, output and error to the child (the child writes where this process would), its
environment and working directory; forwards every signal it gets to the child (SIGTERM from torchrun's agent, a
Ctrl-C); and ends as the child ended: the same exit code, or killed by the same signal. If it is killed itself
(SIGKILL from a timeout), the server kills the child.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main(module: str, argv: list[str]) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.environ["TRAINER_FORK_SERVER"])
    request = {"module": module, "argv": argv, "env": dict(os.environ), "cwd": os.getcwd(),
               "unbuffered": sys.stdout.write_through}  # python -u, or PYTHONUNBUFFERED
    socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    answers = conn.makefile("r")
    pid = json.loads(answers.readline())["pid"]

    def forward(number: int, frame: object) -> None:
        try:
            os.kill(pid, number)
        except ProcessLookupError:  # it has just ended: its status is on the way
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    status = json.loads(answers.readline())["status"]
    if status < 0:  # killed by a signal: end the same way, as torchrun and the tests would see the real process
        if -status not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled anyway
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
