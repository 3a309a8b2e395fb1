"""Test helper: start the trainer's processes (a single `python -m trainer ...`, and the ranks torchrun starts) as
children forked from a server that has already imported the trainer and its libraries (torch, transformers,
DeepSpeed), so that each skips the imports that otherwise take most of a short run (3-5 s of a 4-7 s call on 2
cores; the suite makes a few hundred such processes).

A forked child is a real process: its own pid, signal handlers and exit status, the standard streams of the
process it stands in for (tests/forked_client.py passes them), that process's environment and working directory;
it runs `python -m MODULE` as the interpreter does (runpy), then the exit handlers. torchrun's agent is forked
the same way (it skips importing torch: about 2 s a launch on 2 cores) and keeps the server's address, so that the
ranks it starts are forked too. What differs from a fresh
interpreter is only what happens at import: libraries were imported under the server's environment, and their
import-time notices went to the server's log. So a call forks only when its environment differs from the one the
server's imports ran under in variables read at run time only (none of IMPORT_TIME_ENV) and the test does not ask
for a fresh process; TRAINER_FORKED_CLI=0 turns forking off for a whole session. The session's summary counts the
forked calls and names the variables that made the others fresh.

The server (one per test session, started on first use) listens on a Unix socket. Per connection: a JSON request
{"module", "argv", "env", "cwd"} with the client's file descriptors 0-2; it forks, answers {"pid"}, and when the
child ends, {"status"} (exit code, or minus the signal). A client that goes away first (killed by a timeout or by
torchrun) has its child killed.
"""

from __future__ import annotations

import atexit
from collections import Counter
import faulthandler
import json
import os
import runpy
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVER_ENV = "TRAINER_FORK_SERVER"
# Variables read at import or at interpreter start (by Python, torch, transformers, huggingface_hub, DeepSpeed,
# bitsandbytes, tokenizers, the C libraries): a call that changes one gets a fresh interpreter. Any other variable
# (TRAINER_*, WANDB_*, torchrun's RANK/MASTER_*/TORCHELASTIC_*, pytest's, what libraries set while running) is read
# when the run needs it, so a forked child with the call's environment behaves as a fresh process.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "CUDA", "DS_", "DEEPSPEED", "BNB_",
                   "BITSANDBYTES", "PYTHON", "TOKENIZERS", "XDG_", "HOME", "PATH", "LD_", "MKL", "KMP_", "TMPDIR",
                   "MALLOC_", "TZ", "LANG", "LC_")
RUN_TIME_EXCEPTIONS = ("PYTHONFAULTHANDLER", "PYTHONUNBUFFERED", "TORCHELASTIC_", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
# Forked like the trainer, and keeping the server's address: the processes they start are clients themselves.
LAUNCHERS = ("torch.distributed.run",)
# Also what the commands import when they need it: transformers' model code of the architectures most tests train
# (a model class, its config and what they pull in: torch's compiler, sympy; about 2 s a process), the plan's
# report (torchao through transformers' quantizers), chat and the loss plot. Not peft: trainer/adapters/lora.py
# skips work while nothing has imported it. Not bitsandbytes: its import-time notices are part of what a run
# prints. Not datasets: pyarrow starts a thread at import (jemalloc), and the trainer imports it only for the
# formats that need it.
WARM_MODULES = ("trainer.__main__", "trainer.run.loop", "trainer.use.export", "trainer.engine.deepspeed",
                "deepspeed", "tests.deepspeed_probe", "torch.distributed.run",
                "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
                "trainer.plan.suggest", "trainer.use.chat", "matplotlib.pyplot")


class Server:
    """The pre-imported parent of the forked processes, run as a subprocess of the test session."""

    def __init__(self, root: Path = ROOT, env: dict[str, str] | None = None) -> None:
        """A server importing the trainer of the checkout at `root` (this one unless told), in `env` (this
        process's environment unless told)."""
        self.env = dict(os.environ) if env is None else env
        self.folder = tempfile.TemporaryDirectory(prefix="forked_cli-")
        self.socket = str(Path(self.folder.name, "server.sock"))
        self.log = open(Path(self.folder.name, "server.log"), "w")  # noqa: SIM115  the server's own stderr
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forked_cli", self.socket], cwd=root, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        self.ready = False
        self._imported_env: dict[str, str] | None = None

    def wait_ready(self) -> None:
        """Until the server accepts (its imports done: 5-10 s on 2 cores, more under load)."""
        deadline = time.monotonic() + 600
        while not self.ready:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the forked-CLI server did not start:\n{self.log_tail()}")
            self.ready = Path(self.socket).exists()
            time.sleep(0 if self.ready else 0.05)

    def imported_env(self) -> dict[str, str]:
        """The server's environment after its imports (written before it accepts)."""
        if self._imported_env is None:
            self._imported_env = json.loads(Path(self.socket + ".env.json").read_text())
        return self._imported_env

    def log_tail(self) -> str:
        return Path(self.folder.name, "server.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()
        self.folder.cleanup()


_server: Server | None = None
calls: Counter[str] = Counter()  # "forked", or "fresh: " and the variables that asked for it; the session's summary


def start_server() -> Server:
    """The session's server, started now if it is not (it imports in the background)."""
    global _server
    if _server is None:
        _server = Server()
        atexit.register(_server.stop)
    return _server


def server() -> Server:
    """The session's server, ready to fork."""
    started = start_server()
    started.wait_ready()
    return started


def enabled() -> bool:
    return os.environ.get("TRAINER_FORKED_CLI", "1") != "0" and hasattr(os, "fork")


def can_fork(env: dict[str, str]) -> bool:
    """Whether a process with this environment behaves the same forked from the server as started fresh."""
    if not enabled():
        return False
    changes = import_time_changes(env)
    calls["fresh: " + ", ".join(sorted(changes)) if changes else "forked"] += 1
    return not changes


def import_time_changes(env: dict[str, str]) -> set[str]:
    """The variables read at import or interpreter start in which `env` differs from the environment the server's
    imports ran under. What those imports set themselves (torch sets PYTORCH_NVML_BASED_CUDA_CHECK, for one) counts
    only where `env` gives it another value: a fresh process's imports would set it the same way."""
    started = server()
    imported = started.imported_env()
    set_by_imports = set(imported) - set(started.env)
    changed = {k for k in set(env) | set(imported)
               if env.get(k) != imported.get(k) and not (k in set_by_imports and k not in env)}
    return {k for k in changed if k.startswith(IMPORT_TIME_ENV) and not k.startswith(RUN_TIME_EXCEPTIONS)}


def client_command() -> list[str]:
    """What stands in for `python -m` (MODULE and its arguments follow): the client of a started server."""
    return [sys.executable, "-m", "tests.forked_client"]


def client_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, SERVER_ENV: server().socket}


def torchrun_command(python_m: list[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N -m`, MODULE and its arguments to follow,
    where `python_m` stands for `python -m`: the interpreter's, or client_command(), and then torchrun's agent and
    every rank it starts are forked. --standalone picks a free port itself: no race between tests."""
    return [*python_m, "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *python_m[1:]]


PYTHON_SHIM = """#!/usr/bin/env bash
# `python -m trainer ...`, and `python -m torch.distributed.run ... -m MODULE ...` (torchrun's agent and its ranks),
# as clients of the server at $TRAINER_FORK_SERVER (tests/forked_cli.py); any other use is the interpreter itself.
real={python}
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = trainer ]; then
  exec "$real" -m tests.forked_client "${{@:2}}"
fi
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = torch.distributed.run ]; then
  launcher=()
  previous=""
  module_named=0
  for arg in "${{@:3}}"; do
    if [ "$module_named" = 0 ] && [ "$previous" = -m ]; then  # torchrun's -m MODULE: each rank a client too
      launcher+=(tests.forked_client)
      module_named=1
    fi
    launcher+=("$arg")
    previous=$arg
  done
  exec "$real" -m tests.forked_client torch.distributed.run "${{launcher[@]}}"
fi
exec "$real" "$@"
"""
TORCHRUN_SHIM = """#!/usr/bin/env bash
exec "$(dirname "$0")/python" -m torch.distributed.run "$@"
"""


def write_shims(folder: Path) -> Path:
    """`python` and `torchrun` for commands written for a shell (the README's), to put first on PATH: they start
    the trainer, and torchrun with its ranks, as clients of the server in TRAINER_FORK_SERVER."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("python", PYTHON_SHIM.format(python=shlex.quote(sys.executable))), ("torchrun", TORCHRUN_SHIM)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


# ------------------------------------------------------------------------------------------ the server side

def child(request: dict[str, Any], streams: list[int]) -> None:
    """In the forked child: become `python -m MODULE ARGV` with the client's streams, directory and environment."""
    for fd, target in zip(streams, (0, 1, 2)):
        os.dup2(fd, target)
    for fd in streams:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["module"] not in LAUNCHERS:
        os.environ.pop(SERVER_ENV, None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    if os.environ.get("PYTHONFAULTHANDLER"):  # what the interpreter does at start with it
        faulthandler.enable()
    if request.get("unbuffered"):  # python -u (torchrun starts its workers so)
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    module = request["module"]
    sys.argv = [module, *request["argv"]]
    for name in (module, module + ".__main__"):  # run afresh as __main__, as `python -m` does (runpy warns else)
        sys.modules.pop(name, None)
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  uncaught: printed, exit 1, as the interpreter does
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class Serving:
    """The server's loop: accept requests, fork, report each child's end to its client."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path + ".tmp")
        self.listener.listen(64)
        os.rename(path + ".tmp", path)  # the path appears once it accepts
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.children: dict[int, socket.socket] = {}  # pid -> its client's connection
        self.clients: dict[socket.socket, int] = {}

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select(timeout=0.02):
                if key.fileobj is self.listener:
                    self.start(self.listener.accept()[0])
                else:
                    self.client_went_away(key.fileobj)  # type: ignore[arg-type]
            self.reap()

    def start(self, conn: socket.socket) -> None:
        data, streams, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while not data.endswith(b"\n"):
            data += conn.recv(1 << 20)
        request = json.loads(data)
        pid = os.fork()
        if pid == 0:
            try:
                self.listener.close()
                for other in self.clients:
                    other.close()
                conn.close()
                child(request, streams)
            finally:
                os._exit(70)
        for fd in streams:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        self.children[pid] = conn
        self.clients[conn] = pid
        self.selector.register(conn, selectors.EVENT_READ)

    def client_went_away(self, conn: socket.socket) -> None:
        """A client sends nothing after its request: readable means closed. Its child must not outlive it."""
        pid = self.clients.get(conn)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.selector.unregister(conn)

    def reap(self) -> None:
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            conn = self.children.pop(pid)
            self.clients.pop(conn, None)
            try:
                conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            except OSError:  # the client is gone
                pass
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()


def serve(path: str) -> None:
    """Import the trainer and its libraries once, then serve until terminated."""
    for name in WARM_MODULES:
        __import__(name)
    Path(path + ".env.json").write_text(json.dumps(dict(os.environ)))
    Serving(path).run()


if __name__ == "__main__":
    serve(sys.argv[1])
