"""Faults and bad input: a run is never lost, never trains on garbage and never answers with a traceback. Each test
reproduces a fault a careful user met (diverging loss, damaged checkpoints, an export onto the run, two jobs on one
folder, Ctrl-C, SIGTERM to the launcher, a full disk, a stale build lock, a missing wandb key) through the real CLI
on the tiny quickstart model."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import resource
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import QUICKSTART, ROOT, read_metrics, run_cli, tiny
from trainer.__main__ import main
from trainer.checkpoint.layout import complete_checkpoints
from trainer.engine import op_builds
from trainer.errors import ConfigError
from trainer.recipe.resolve import resolve
from trainer.run_lock import LOCK_FILE, OutputDirBusy, RunLock


def checkpoint_steps(out: Path) -> list[int]:
    return [step for step, _ in complete_checkpoints(out)]


def all_finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


def as_in_a_terminal() -> None:
    """SIGINT at its default, as a terminal's foreground job has it. A suite started in the background of a
    non-interactive shell (`pytest ... &`, nohup) inherits SIGINT ignored, and bash can never trap a signal ignored
    when it started: launch/local.sh would not see the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], env: dict[str, str] | None = None, command: list[str] | None = None) -> subprocess.Popen:
    """A training process in the background (its own process group, so signals reach only it)."""
    cmd = command or [sys.executable, "-m", "trainer", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True,
                            preexec_fn=as_in_a_terminal)


def wait_for_rows(out: Path, rows: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until metrics.jsonl has `rows` complete rows (the run is in its loop)."""
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if metrics.is_file() and metrics.read_text().count("\n") >= rows:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {rows} metrics rows after {timeout} s")


# ------------------------------------------------------------------------------------------ diverging loss

@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_diverging_loss_stops_before_the_update_and_keeps_the_good_checkpoints(tmp_path: Path, dtype: str) -> None:
    """lr=1000: the loss or gradient norm turns NaN/inf. The run stops with exit 1 at that step, before its update,
    names the last good checkpoint, and no checkpoint (nor keep_last's pruning) ever holds non-finite weights."""
    args = tiny(tmp_path, f"precision.dtype={dtype}", "optimizer.lr=1000", "checkpoint.every_steps=2",
                "checkpoint.keep_last=1", steps=20)
    proc = run_cli(["train", str(QUICKSTART), *args])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "training diverged" in proc.stderr
    steps = checkpoint_steps(tmp_path)
    assert steps, "the run saved checkpoints before diverging"
    newest = complete_checkpoints(tmp_path)[-1][1]
    assert f"The last good checkpoint is {newest}" in proc.stderr
    assert all_finite(newest)
    stopped = int(proc.stderr.split("error: step ")[1].split(":")[0])
    assert stopped > steps[-1] and stopped < 20
    assert all(r["step"] < stopped for r in read_metrics(tmp_path))  # the diverged step was never logged


@pytest.mark.slow
def test_max_nonfinite_steps_skips_instead(tmp_path: Path) -> None:
    args = tiny(tmp_path, "optimizer.lr=1000", "checkpoint.every_steps=4", "train.max_nonfinite_steps=100", steps=12)
    proc = run_cli(["train", str(QUICKSTART), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not finite; step skipped" in proc.stderr
    assert checkpoint_steps(tmp_path)[-1] == 12
    assert all(all_finite(path) for _, path in complete_checkpoints(tmp_path))
    state = json.loads((complete_checkpoints(tmp_path)[-1][1] / "trainer_state.json").read_text())
    assert state["nonfinite"]["skipped"] > 0


def test_max_nonfinite_steps_needs_a_step_that_can_be_skipped() -> None:
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps = 2.*per-layer updates change each weight"):
        resolve(QUICKSTART, ["train.max_nonfinite_steps=2", "optimizer.name=galore_adamw", "optimizer.galore.rank=8",
                             "optimizer.galore.per_layer=true", "precision.dtype=bf16"])


# ------------------------------------------------------------------------------------------------- resume

def damage(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.mark.slow
def test_every_checkpoint_damaged_refuses_then_force_moves_them_aside(tmp_path: Path) -> None:
    args = tiny(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep_last=2", steps=4)
    assert run_cli(["train", str(QUICKSTART), *args]).returncode == 0
    ckpts = [p for _, p in complete_checkpoints(tmp_path)]
    for ckpt in ckpts:
        damage(ckpt)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".log"}
    refused = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "checkpoint.every_steps=2", steps=8)])
    assert refused.returncode == 2, refused.stderr[-3000:]
    for ckpt in ckpts:
        assert f"{ckpt}: file model.safetensors does not match its checksum" in refused.stderr
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert {p: p.read_bytes() for p in before} == before, "a refused start changed the run's files"
    forced = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "checkpoint.every_steps=2", steps=8), "--force"])
    assert forced.returncode == 0, forced.stderr[-3000:]
    (aside,) = tmp_path.glob("previous-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [p.name for p in ckpts]
    assert (aside / "metrics.jsonl").is_file() and read_metrics(tmp_path)[0]["step"] == 1


def test_resume_never_over_an_earlier_runs_checkpoints_refuses(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "checkpoint.resume=never", steps=2)])
    assert proc.returncode == 2 and "checkpoint.resume=never" in proc.stderr and "--force" in proc.stderr
    assert (tmp_path / "checkpoints" / "step-000004").is_dir()


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path: Path) -> None:
    from trainer.distributed import distributed_context
    from trainer.errors import CheckpointError
    from trainer.run.loop import run_loop, setup

    with distributed_context() as dist:
        t = setup(resolve(QUICKSTART, tiny(tmp_path, steps=2)), dist)
        run_loop(t, until_step=1)
        with torch.no_grad():
            next(t.engine.module.parameters()).view(-1)[0] = float("nan")
        with pytest.raises(CheckpointError, match="refusing to save step 1: the model's weights hold NaN"):
            t.checkpointer.save(t.engine, t.state)
        t.metrics.close()
    assert not list((tmp_path / "checkpoints").glob("step-*"))


# ---------------------------------------------------------------------------------------------------- export

@pytest.mark.slow
def test_export_never_writes_onto_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert run_cli(["train", str(QUICKSTART), *tiny(run, steps=2)]).returncode == 0
    files = sorted(p for p in run.rglob("*") if p.is_file())
    for out in (run, run / "exported", tmp_path):
        assert main(["export", str(run), "--out", str(out), "--force"]) == 1
        assert "writing there could destroy its checkpoints" in capsys.readouterr().err
    assert sorted(p for p in run.rglob("*") if p.is_file()) == files and checkpoint_steps(run) == [2]
    elsewhere = tmp_path / "not-an-export"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(elsewhere), "--force"]) == 1
    assert "is not an earlier export" in capsys.readouterr().err and (elsewhere / "notes.txt").exists()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert main(["export", str(run), "--out", str(afile)]) == 1 and "is a file" in capsys.readouterr().err
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    assert main(["export", str(run), "--out", str(export), "--force"]) == 0  # an earlier export is replaced


# ----------------------------------------------------------------------------------------- one job per folder

@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path: Path) -> None:
    first = start(["train", str(QUICKSTART), *tiny(tmp_path, "checkpoint.every_steps=5", steps=4000)])
    try:
        wait_for_rows(tmp_path, 2, first)
        second = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "checkpoint.every_steps=5", steps=400)])
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"is in use by process {first.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, len(steps) + 1)), "metrics.jsonl mixed two runs"
    assert checkpoint_steps(tmp_path)[-1] == steps[-1]  # the SIGTERM checkpoint of the first run
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "job": "", "started": time.time()}))
    with RunLock(tmp_path, job=""):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "has exited" in caplog.text and not (tmp_path / LOCK_FILE).exists()
    alive = {"host": socket.gethostname(), "pid": os.getppid(), "job": "", "started": time.time()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(alive))
    with pytest.raises(OutputDirBusy, match=f"in use by process {os.getppid()}"):
        RunLock(tmp_path, job="").acquire()
    # an elastic restart of the same torchrun job (rank 0 now on another host): not a second job
    (tmp_path / LOCK_FILE).write_text(json.dumps({**alive, "host": "elsewhere", "job": "job-7", "attempt": 0}))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with RunLock(tmp_path, job="job-7"):
        pass
    assert "an earlier attempt of this torchrun job" in caplog.text
    # another rank of the same attempt holds it (two ranks building one token store): it waits
    (tmp_path / LOCK_FILE).write_text(json.dumps({**alive, "host": "elsewhere", "job": "job-7", "attempt": 1}))
    with pytest.raises(OutputDirBusy):
        RunLock(tmp_path, job="job-7").acquire()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_exception_on_one_rank_ends_the_job_instead_of_hanging(tmp_path: Path) -> None:
    """Rank 1 raises after step 3 while rank 0 goes on into step 4's collectives. The failing rank waits for its
    peers a tenth of distributed.timeout_s (8 s here), leaves with os._exit, and torchrun stops rank 0: the job
    ends well before the collectives' own timeout (80 s here, 30 minutes by default), which is how long it took
    before; the checkpoint of step 2 is kept. Measured: about 15 s quiet."""
    started = time.monotonic()
    proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "checkpoint.every_steps=2", "distributed.timeout_s=80",
                                                     steps=6)], nproc=2, env={"TRAINER_FAULT": "error@3:r1"},
                   timeout=400)
    took = time.monotonic() - started
    assert proc.returncode != 0 and "an exception after step 3" in proc.stderr, proc.stderr[-3000:]
    assert took < 70, f"the job took {took:.0f} s to end"  # a hang lasts the 80 s timeout and more
    assert checkpoint_steps(tmp_path) == [2]


# --------------------------------------------------------------------------------------- signals and launchers

@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tmp_path: Path) -> None:
    proc = start(["train", str(QUICKSTART), *tiny(tmp_path, steps=400)])
    wait_for_rows(tmp_path, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Ctrl-C" in err
    saved = checkpoint_steps(tmp_path)
    assert len(saved) == 1 and saved[0] == read_metrics(tmp_path)[-1]["step"]
    assert f"stopped at step {saved[0]}" in out
    again = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, steps=saved[0] + 2)])
    assert again.returncode == 0 and f"resumed from {tmp_path}/checkpoints/step-" in again.stderr


class PipeReader:
    """The reading end of a pipe a run writes its console to, read in a thread until `close` (as `| tee log` reads
    until the same Ctrl-C ends it)."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stop.is_set():
            if select.select([self.read_end], [], [], 0.1)[0] and not os.read(self.read_end, 1 << 16):
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        os.close(self.read_end)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python -m trainer",
                                      pytest.param("launch/local.sh", marks=pytest.mark.multiprocess)])
def test_ctrl_c_with_the_console_piped_into_a_reader_that_died(tmp_path: Path, launcher: str) -> None:
    """`train ... 2>&1 | tee log`, then Ctrl-C in the terminal: the same SIGINT ends `tee`, so every later console
    write (log lines, the progress bar, the final summary, the interpreter's last flush) meets a closed pipe. The
    run still finishes its step, saves, exits 0, and train.log has everything (a BrokenPipeError exited 1; the
    launch script, killed by SIGPIPE on its own message, never passed the signal on)."""
    pipe = PipeReader()
    args = [str(QUICKSTART), *tiny(tmp_path, "logging.progress_bar=true", steps=400)]
    command = [sys.executable, "-m", "trainer", "train", *args] if launcher.startswith("python") else \
        ["bash", "launch/local.sh", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2", "MAX_RESTARTS": "0", "PYTHON": sys.executable}
    proc = subprocess.Popen(command, cwd=ROOT, stdout=pipe.write_end, stderr=pipe.write_end, env=env,
                            start_new_session=True, preexec_fn=as_in_a_terminal)
    os.close(pipe.write_end)
    try:
        wait_for_rows(tmp_path, 3, proc, timeout=300)
    finally:
        pipe.close()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground process group
    assert proc.wait(timeout=300) == 0
    saved = checkpoint_steps(tmp_path)
    assert len(saved) == 1 and saved[0] == read_metrics(tmp_path)[-1]["step"]
    log = (tmp_path / "train.log").read_text()
    for line in ("received Ctrl-C", f"checkpoint saved: {tmp_path}/checkpoints/step-", f"preempted after {saved[0]} "
                 "steps", "the console is gone"):
        assert line in log
    assert "Traceback" not in log and "Logging error" not in log


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path: Path) -> None:
    # a step of about a second: both signals land inside it even on a loaded machine (at micro-batch 8, a step of
    # a few hundred ms once ended between them, and the run saved and exited 0 before the second arrived)
    slow_steps = ["model.config.hidden_size=256", "model.config.num_hidden_layers=6", "data.seq_len=256",
                  "train.micro_batch_size=32"]
    proc = start(["train", str(QUICKSTART), *tiny(tmp_path, *slow_steps, steps=400)])
    wait_for_rows(tmp_path, 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted again: exiting now" in err and "Traceback" not in err


def launch_local(out: Path, *extra: str, nproc: int = 2, restarts: int = 0) -> subprocess.Popen:
    """launch/local.sh on the tiny quickstart, in a session of its own (its process group is the one a terminal
    would signal)."""
    env = {"NPROC_PER_NODE": str(nproc), "MAX_RESTARTS": str(restarts), "PYTHON": sys.executable}
    return start([], env=env, command=["bash", "launch/local.sh", str(QUICKSTART), *tiny(out, *extra, steps=400)])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["SIGTERM to the script", "Ctrl-C at the terminal"])
def test_a_signal_to_the_launch_script_checkpoints_and_exits_0(tmp_path: Path, how: str) -> None:
    """launch/local.sh passes SIGTERM or Ctrl-C to the training processes, once, not to torchrun's agent (which
    would exit 1). A terminal's Ctrl-C goes to the whole foreground process group: the agent got it too (exit 1
    with a SignalException) and the ranks got it three times (the third stopped them at once, without a
    checkpoint); the agent now runs in a process group of its own."""
    proc = launch_local(tmp_path)
    wait_for_rows(tmp_path, 2, proc, timeout=300)
    if how == "SIGTERM to the script":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "launch: " in err and "received: asking every training process" in err
    assert "SignalException" not in err and "interrupted again" not in err
    assert checkpoint_steps(tmp_path)[-1] == read_metrics(tmp_path)[-1]["step"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_second_ctrl_c_to_the_launch_script_stops_at_once_without_a_restart(tmp_path: Path) -> None:
    """The second Ctrl-C ends the ranks at once (exit 130) and torchrun's agent first, so that it does not bring
    them back (MAX_RESTARTS=3 here)."""
    slow_steps = ["model.config.hidden_size=256", "model.config.num_hidden_layers=6", "data.seq_len=256",
                  "train.micro_batch_size=32"]  # steps of about a second: both Ctrl-Cs land in one (see above)
    proc = launch_local(tmp_path, *slow_steps, nproc=1, restarts=3)
    wait_for_rows(tmp_path, 1, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "launch: Ctrl-C again: stopping now" in err and "interrupted again: exiting now" in err
    rows = len(read_metrics(tmp_path))
    time.sleep(5)  # a restarted rank would resume and log again
    assert len(read_metrics(tmp_path)) == rows and checkpoint_steps(tmp_path) == []
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_plain_torchrun_under_sigterm_saves_but_exits_1(tmp_path: Path) -> None:
    """What the README says plain torchrun returns: its agent stops the workers (they still checkpoint), then exits
    1 with a SignalException traceback. The launch scripts are the way to exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "trainer",
               "train", str(QUICKSTART), *tiny(tmp_path, steps=400)]
    proc = start([], command=command)
    wait_for_rows(tmp_path, 2, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "SignalException" in err, err[-3000:]
    assert checkpoint_steps(tmp_path)[-1] == read_metrics(tmp_path)[-1]["step"]


# --------------------------------------------------------------------------------------------- the machine

def limit_file_size(limit: int) -> None:  # in the child: writes past `limit` bytes fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_a_clean_error_and_resume_continues(tmp_path: Path) -> None:
    """A file-size limit makes the checkpoint's weights file fail to write, as a full disk does: the run stops
    with one message, the partial folder is gone, the previous checkpoint is intact, and resume continues."""
    assert run_cli(["train", str(QUICKSTART), *tiny(tmp_path, steps=2)]).returncode == 0
    weights = (tmp_path / "checkpoints" / "step-000002" / "model.safetensors").stat().st_size
    cmd = [sys.executable, "-m", "trainer", "train", str(QUICKSTART), *tiny(tmp_path, steps=4)]
    full = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: limit_file_size(weights // 2))
    assert full.returncode == 1, full.stderr[-3000:]
    assert "could not write the checkpoint of step 4" in full.stderr and "Traceback" not in full.stderr
    assert "step-000002, is intact" in full.stderr
    assert checkpoint_steps(tmp_path) == [2] and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert "traceback of:" in (tmp_path / "train.log").read_text()  # the details are in the log file
    resumed = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, steps=4)])
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr and checkpoint_steps(tmp_path) == [2, 4]


def test_too_little_disk_for_one_checkpoint_stops_before_building(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.distributed import DistInfo
    from trainer.plan import disk, preflight

    run = resolve(QUICKSTART, tiny(tmp_path))
    usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage(10**12, 10**12, 1000))
    with pytest.raises(preflight.DiskTooSmall, match="has 0.00 GB free, but one checkpoint of this run takes about"):
        preflight.check_disk(run, DistInfo(0, 0, 1, torch.device("cpu")))


def test_a_model_with_custom_code_needs_trust_remote_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {
        "AutoConfig": "configuration_mystery.MysteryConfig"}}))
    assert main(["validate", str(QUICKSTART), "model.config=null", f"model.name_or_path={tmp_path}",
                 "model.tokenizer=byte"]) == 2
    err = capsys.readouterr().err
    assert "model.trust_remote_code = false" in err and "Set model.trust_remote_code=true if you trust" in err


# ------------------------------------------------------------------------------- the hub, OS errors' advice

def test_a_hub_model_not_downloaded_while_offline_says_how_to_download_it(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 (the tests' setting) and a hub id that is not in the cache: the recipe check and a run that
    loads the model name it and the download command, not transformers' "check your connection" with our "check
    the path and the disk" appended."""
    check = run_cli(["validate", str(QUICKSTART), "model.config=null", "model.tokenizer=byte",
                     "model.name_or_path=some-org/some-model"])
    assert check.returncode == 2 and "hf download some-org/some-model" in check.stderr, check.stderr[-3000:]
    adapter = tmp_path / "adapter"  # an --adapter-only export over a base on the hub
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some-org/some-model"}))
    chat = run_cli(["generate", str(adapter), "--prompt", "hi"])
    assert chat.returncode == 1, chat.stderr[-3000:]
    assert "'some-org/some-model' is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1" in chat.stderr
    assert "hf download some-org/some-model" in chat.stderr
    assert "the disk" not in chat.stderr and "Traceback" not in chat.stderr


def test_a_hub_that_cannot_be_reached_is_named_and_its_retries_shown_once(capfd: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No network (the hub at a closed local port): huggingface_hub's client raises its own ConnectError (no
    OSError: a traceback) after retries it logged through its own handler and ours (each line twice)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import http_backoff

    from trainer.errors import HubError, fetching_from_hub
    from trainer.logs import setup_console

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    setup_console(rank=0, world_size=1)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/some-org/some-model/resolve/main/config.json"
    with pytest.raises(HubError) as raised, fetching_from_hub("some-org/some-model"):
        http_backoff("HEAD", url, max_retries=1, base_wait_time=0.01)
    assert "the hub cannot be reached: download it first" in str(raised.value)
    assert "hf download some-org/some-model" in str(raised.value)
    assert capfd.readouterr().err.count("Retrying in") == 1


@pytest.mark.parametrize(("code", "advice"), [(errno.EPIPE, "the program at the other end of a pipe has exited"),
                                              (errno.ECONNREFUSED, "nothing is listening at that address"),
                                              (errno.EMFILE, "ulimit -n"), (errno.ENOSPC, "the disk is full")])
def test_each_os_error_gets_its_own_advice(code: int, advice: str) -> None:
    from trainer.errors import os_error_message

    message = os_error_message(OSError(code, os.strerror(code)))
    assert advice in message and (code == errno.ENOSPC or "disk" not in message)


@pytest.mark.slow
def test_wandb_without_a_key_logs_offline_or_fails_when_online_is_required(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc, no wandb settings: no API key anywhere
    base = ["train", str(QUICKSTART), *tiny(tmp_path / "run", "logging.wandb.project=p", "logging.wandb.mode=online",
                                            steps=2)]
    cmd = [sys.executable, "-m", "trainer"]
    offline = subprocess.run([*cmd, *base], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert offline.stderr.count("no wandb API key is configured") == 1
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    strict = subprocess.run([*cmd, *base, "logging.wandb.require_online=true", f"output_dir={tmp_path / 'strict'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert strict.returncode == 1 and "require_online is set" in strict.stderr and "Traceback" not in strict.stderr
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()  # refused before any training


class WandbServer:
    """A local stand-in for a wandb server that is down: it accepts connections and never answers ("silent"), or
    answers every request with HTTP 500 ("500")."""

    def __init__(self, behaviour: str) -> None:
        if behaviour == "silent":
            self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), SilentHandler)
        else:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer500)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SilentHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(120)
        with contextlib.suppress(OSError):
            while self.request.recv(1 << 16):  # read whatever comes, answer nothing, until the client gives up
                pass


class Answer500(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_HEAD = do_POST

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("behaviour", ["silent", "500"])
def test_a_wandb_server_that_does_not_answer_means_offline_logging(tmp_path: Path, behaviour: str) -> None:
    """wandb logged in (a key), its server never answering or failing: the run logs offline after one warning, in a
    bounded time (it was a ServerResponseError traceback after 68 s: the failed online attempt kept the run id in
    use, so the offline fallback failed too). Measured: 25 s ("500"), 48 s ("silent"): wandb's own look-ups take
    15 s before it gives up, and with the silent server its SDK analytics (OpenTelemetry, flushed at exit) wait
    10 s twice more for an answer, after the training has ended (in wandb 0.31 only offline mode turns them off)."""
    server = WandbServer(behaviour)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_BASE_URL=server.url, WANDB_API_KEY="x" * 40, OMP_NUM_THREADS="1")
    base = ["train", str(QUICKSTART), *tiny(tmp_path / "run", "logging.wandb.project=p", "logging.wandb.mode=online",
                                            "logging.wandb.init_timeout_s=3", steps=2)]
    try:
        offline = subprocess.run([sys.executable, "-m", "trainer", *base], cwd=ROOT, capture_output=True, text=True,
                                 timeout=240, env=env)
        assert offline.returncode == 0, offline.stderr[-3000:]
        assert offline.stderr.count("wandb could not start online") == 1, offline.stderr[-3000:]
        assert "Traceback" not in offline.stderr and "opentelemetry" not in offline.stderr
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*")) and read_metrics(tmp_path / "run")
    finally:
        server.close()


# ------------------------------------------------------------------------------------------ DeepSpeed op builds

def test_a_stale_build_lock_is_removed_and_live_ones_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stale = tmp_path / "cpu_adam" / "lock"
    stale.parent.mkdir()
    stale.write_text("")
    live = tmp_path / "shm_comm" / "lock"
    live.parent.mkdir()
    live.write_text("")
    before_this_process = psutil.Process().create_time() - 1
    for lock in (stale, live):
        os.utime(lock, (before_this_process, before_this_process))
    just_made = tmp_path / "fused_adam" / "lock"  # a rank of this launch holds it while ninja is not running
    just_made.parent.mkdir()
    just_made.write_text("")
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=live.parent)
    try:
        time.sleep(0.3)
        assert op_builds.clear_stale_locks(tmp_path) == [stale]
        assert just_made.exists()
    finally:
        builder.kill()
        builder.wait()
    assert not stale.exists() and live.exists()
    assert "removing a stale build lock of DeepSpeed's cpu_adam op" in caplog.text


def test_waiting_for_a_build_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "lock").write_text("")
    with caplog.at_level("INFO"), op_builds.BuildWatch(tmp_path, every_s=0.1):
        time.sleep(0.5)
    assert "DeepSpeed's cpu_adam op is being compiled" in caplog.text
