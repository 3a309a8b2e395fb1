"""Checkpoints: exact resume after SIGKILL, kill during save, elastic restart, SIGTERM, keep_last, export,
malicious files, incompatible resumes, and two torchrun "nodes" through launch/multinode.sh."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import (QUICKSTART, ROOT, assert_bitwise_equal, final_weights, free_port, losses, ok,
                           read_metrics, run_cli, tiny)
from trainer.checkpoint.layout import complete_checkpoints
from trainer.data.batches import TrainData
from trainer.data.identity import data_changes
from trainer.distributed import distributed_context
from trainer.errors import CheckpointError, UnsafeFileError
from trainer.use.export import export
from trainer.run.loop import run_loop, setup, train
from trainer.recipe.resolve import resolve
from trainer.safeio import load_tensors, sha256
from trainer.recipe.schema import DataConfig
from trainer.model.tokenizer import byte_tokenizer


def ckpt_args(out: Path, *extra: str, steps: int = 12) -> list[str]:
    return ["train", str(QUICKSTART), *tiny(out, "checkpoint.every_steps=4", "train.micro_batch_size=2", *extra,
                                             steps=steps)]


@pytest.fixture(scope="module")
def reference_2proc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process fp32 run of 12 steps, checkpoints every 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    ok(run_cli(ckpt_args(out), nproc=2))
    return out


VARIANTS = {
    "fp32": [],
    # fp16 loss scaling, accumulation 2, and 46 packed samples = 5 steps per epoch: the kill (after step 9)
    # and the checkpoint it resumes from (step 8, epoch 1 at cursor 24) are in the middle of the second epoch.
    "fp16-accum2-epochs": ["precision.dtype=fp16", "train.grad_accum_steps=2", "data.max_bytes=12000",
                           "data.seq_len=256"],
}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_sigkill_then_resume_is_bitwise_exact(tmp_path: Path, variant: str,
                                              reference_2proc: Path) -> None:
    extra = VARIANTS[variant]
    if extra:
        ref = tmp_path / "ref"
        ok(run_cli(ckpt_args(ref, *extra), nproc=2))
    else:
        ref = reference_2proc
    out = tmp_path / "run"
    killed = run_cli(ckpt_args(out, *extra), nproc=2, env={"TRAINER_FAULT": "sigkill@9"})
    assert killed.returncode != 0
    assert [s for s, _ in complete_checkpoints(out)] == [4, 8]
    state = json.loads((out / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["position"]["cursor"] > 0  # mid-epoch
    if extra:
        assert state["position"] == {"epoch": 1, "cursor": 24}
    resumed = ok(run_cli(ckpt_args(out, *extra), nproc=2))
    assert "resume: auto picked step-000008" in resumed.stderr
    assert losses(out, range(9, 13)) == losses(ref, range(9, 13))  # bitwise: == on floats
    assert losses(out, range(1, 9)) == losses(ref, range(1, 9))  # rows of the killed attempt kept up to step 8
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))  # and no duplicate rows
    assert_bitwise_equal(final_weights(out), final_weights(ref))


@pytest.mark.slow
def test_kill_during_save_falls_back_to_previous(tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "run"
    ok(run_cli(ckpt_args(ref)))
    crashed = run_cli(ckpt_args(out), env={"TRAINER_FAULT": "crash_in_save@8"})
    assert crashed.returncode == 13
    partial = out / "checkpoints" / ".tmp-step-000008"
    assert partial.is_dir() and (partial / "model.safetensors").exists()  # killed mid-write
    assert [s for s, _ in complete_checkpoints(out)] == [4]
    resumed = ok(run_cli(ckpt_args(out)))
    assert "resume: auto picked step-000004" in resumed.stderr
    assert "removing incomplete checkpoint" in resumed.stderr
    assert not partial.exists()
    assert losses(out, range(5, 13)) == losses(ref, range(5, 13))
    assert_bitwise_equal(final_weights(out), final_weights(ref))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_elastic_restart_after_crash(tmp_path: Path, reference_2proc: Path) -> None:
    """launch/local.sh (torchrun --max-restarts) brings a crashed job back; resume: auto finishes it."""
    out = tmp_path / "run"
    env = {**os.environ, "NPROC_PER_NODE": "2", "MAX_RESTARTS": "1", "PYTHON": sys.executable,
           "TRAINER_FAULT": "crash@7:r1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "launch/local.sh", *ckpt_args(out)[1:]], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=600)
    ok(proc)
    assert "TRAINER_FAULT: crashing at step 7" in proc.stderr
    assert "resume: auto picked step-000004" in proc.stderr
    assert losses(out, range(1, 13)) == losses(reference_2proc, range(1, 13))
    assert_bitwise_equal(final_weights(out), final_weights(reference_2proc))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "run"
    args = ckpt_args(out, "checkpoint.every_steps=0", steps=60)
    ok(run_cli(ckpt_args(ref, "checkpoint.every_steps=0", steps=60)))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "received SIGTERM" in stderr
    (step, _), = complete_checkpoints(out)
    assert 3 <= step < 60
    assert read_metrics(out)[-1]["step"] == step
    assert f"stopped at step {step}" in stdout
    resumed = ok(run_cli(args))
    first = next(r["loss"] for r in read_metrics(out) if r["step"] == step + 1 and r.get("split", "train") == "train")
    assert f"trained to step 60: resumed at step {step}; loss {first:.4f} (step {step + 1}) -> " in resumed.stdout
    assert losses(out, range(1, 61)) == losses(ref, range(1, 61))
    assert_bitwise_equal(final_weights(out), final_weights(ref))


@pytest.mark.slow
def test_keep_last_keeps_exactly_the_newest(tmp_path: Path) -> None:
    ok(run_cli(ckpt_args(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep_last=2", steps=12)))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-000010", "step-000012"]


def test_export_round_trip_reproduces_logits(tmp_path: Path) -> None:
    cfg = resolve(QUICKSTART, tiny(tmp_path / "run", steps=3))
    with distributed_context() as dist:
        run = setup(cfg, dist)
        run_loop(run)
        run.metrics.close()
        model = run.engine.module.eval()
        ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = model(input_ids=ids).logits
    for dtype, tol in (("fp32", 1e-5), ("bf16", 0.1)):
        out = export(tmp_path / "run", tmp_path / f"hf-{dtype}", dtype=dtype)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert loaded.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        with torch.no_grad():
            got = loaded(input_ids=ids).logits.float()
        assert (got - expected).abs().max().item() <= tol, dtype
    assert (tmp_path / "hf-fp32" / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained to its train.max_steps (2), in this process; copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with distributed_context() as dist:
        run = setup(resolve(QUICKSTART, tiny(out, steps=2)), dist)
        run_loop(run)
        run.metrics.close()
    return out


def test_every_file_of_an_export_is_readable_by_others_within_the_umask(finished_run: Path, tmp_path: Path) -> None:
    """Exports are read by other accounts (a serving one): every file 0666 and folder 0777 less the umask, like
    the other files (safetensors writes model.safetensors 0600)."""
    before = os.umask(0o027)
    try:
        for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
            os.umask(umask)
            out = export(finished_run, tmp_path / f"export-{umask:o}")
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
            assert "model.safetensors" in modes and "tokenizer.json" in modes
            assert modes == {p.name: dir_mode if p.is_dir() else file_mode for p in [out, *out.rglob("*")]}, modes
    finally:
        os.umask(before)


def test_a_damaged_finished_checkpoint_is_refused_not_taken_as_done(finished_run: Path, tmp_path: Path) -> None:
    """A run at train.max_steps is only "already done" once its checkpoint passes its checksums: an explicit
    checkpoint.resume=PATH to a damaged one, or `auto` over a run whose only checkpoint is damaged, is refused
    (exit 2, the reason given) as a resume is, instead of exiting 0 with nothing to do."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    (_, ckpt), = complete_checkpoints(run)
    weights = bytearray((ckpt / "model.safetensors").read_bytes())
    weights[-100] ^= 1
    (ckpt / "model.safetensors").write_bytes(bytes(weights))
    explicit = tiny(tmp_path / "second", f"checkpoint.resume={ckpt}", steps=2)
    for args, advice in ((explicit, "point checkpoint.resume at another checkpoint"), (tiny(run, steps=2), "--force")):
        with pytest.raises(CheckpointError) as refused:
            train(resolve(QUICKSTART, args))
        assert refused.value.exit_code == 2
        assert f"{ckpt}: file model.safetensors does not match its checksum" in str(refused.value)
        assert advice in str(refused.value)


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"optimizer": _Payload(marker)}, f)


def test_malicious_pickle_is_refused_unit(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _plant(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        load_tensors(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_checkpoint_file_is_refused(tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "pwned"
    ok(run_cli(ckpt_args(out, steps=4)))
    ckpt = out / "checkpoints" / "step-000004"
    _plant(ckpt / "engine-state.pt", marker)
    manifest = json.loads((ckpt / "manifest.json").read_text())  # the attacker fixes the manifest too
    manifest["files"]["engine-state.pt"] = {"size": (ckpt / "engine-state.pt").stat().st_size,
                                            "sha256": sha256(ckpt / "engine-state.pt")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli(ckpt_args(out, steps=8))
    assert proc.returncode == 1
    assert "refusing to load" in proc.stderr and "engine-state.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_incompatible_and_logs_allowed_changes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(run_cli(ckpt_args(out, steps=4)))
    refused = run_cli(ckpt_args(out, "data.seq_len=32", "model.config.num_hidden_layers=3", steps=8))
    assert refused.returncode == 2  # the resume cannot go ahead as configured: a setup problem, like a recipe one
    assert "cannot resume" in refused.stderr
    assert "data.seq_len: 64 -> 32" in refused.stderr and "model.config" in refused.stderr
    assert "checkpoint.resume=never" in refused.stderr
    allowed = ok(run_cli(ckpt_args(out, "optimizer.lr=1e-3", steps=6)))
    assert "resuming with a changed setting: optimizer.lr: 0.003 -> 0.001" in allowed.stderr
    assert "resuming with a changed setting: train.max_steps: 4 -> 6" in allowed.stderr
    assert read_metrics(out)[-1]["step"] == 6
    assert read_metrics(out)[-1]["lr"] < 1e-3 + 1e-12  # the new LR took effect


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_a_global_batch_that_cannot_be_kept_is_refused_before_building(tmp_path: Path) -> None:
    """1 rank x micro-batch 2 x accumulation 1 = global batch 2; on 2 ranks the smallest global batch is 4: the
    resume is refused before the data or the model is built, with the numbers and the ranks that would work."""
    out = tmp_path / "run"
    ok(run_cli(ckpt_args(out, steps=4)))
    proc = run_cli(ckpt_args(out, steps=8), nproc=2)
    assert proc.returncode != 0  # torchrun itself exits 1 when a rank fails; each rank's own code is in its report
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert "global batch of 2 sequences (micro-batch 2 x accumulation 1 x 1 ranks)" in proc.stderr
    assert "2 cannot be kept on 2 ranks" in proc.stderr and "It can be kept on 1 ranks" in proc.stderr
    assert "trainer.model.build" not in proc.stderr and "trainer.data" not in proc.stderr  # nothing was built


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_two_nodes_through_launch_script_match_single_node(tmp_path: Path, reference_2proc: Path) -> None:
    """Two torchrun 'nodes' (nnodes=2, one process each) on loopback with c10d rendezvous."""
    out, port = tmp_path / "run", free_port()
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"127.0.0.1:{port}",
           "RDZV_ID": f"test-{port}", "PYTHON": sys.executable, "MAX_RESTARTS": "0", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(["bash", "launch/multinode.sh", *ckpt_args(out)[1:]], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [n.communicate(timeout=600) for n in nodes]
    for n, (_, err) in zip(nodes, results):
        assert n.returncode == 0, err[-3000:]
    for a, b in zip(losses(out, range(1, 13)), losses(reference_2proc, range(1, 13))):
        assert abs(a - b) <= 1e-5


@pytest.mark.slow
def test_resume_from_explicit_path_into_a_new_run(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    ok(run_cli(ckpt_args(first, steps=4)))
    proc = ok(run_cli(ckpt_args(second, f"checkpoint.resume={first / 'checkpoints' / 'step-000004'}", steps=6)))
    assert "resumed from" in proc.stderr
    assert [r["step"] for r in read_metrics(second)] == [5, 6]
    ok(run_cli(ckpt_args(tmp_path / "third", f"checkpoint.resume={first}", steps=5)))  # a run dir: its newest
    assert [r["step"] for r in read_metrics(tmp_path / "third")] == [5]


# ------------------------------------------------------------------------------------------- data identity

def corpus(path: Path, paragraphs: int = 300) -> Path:
    path.write_text("".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog\n\n"
                            for i in range(paragraphs)), encoding="utf-8")
    return path


def same_size_edit(path: Path) -> None:
    """Characters replaced in place: the same size, another modification time, other text."""
    time.sleep(0.01)
    path.write_text(path.read_text(encoding="utf-8").replace("fox", "cat"), encoding="utf-8")


def identity(cache: Path, *sources: Path) -> dict:
    cfg = DataConfig(source=str(sources[0]), seq_len=32, cache_dir=str(cache)) if len(sources) == 1 else \
        DataConfig(sources=[{"source": str(s)} for s in sources], seq_len=32, cache_dir=str(cache))
    return TrainData(cfg, byte_tokenizer(), seed=0, rank=0, world_size=1, micro_batch_size=2,
                     grad_accum_steps=1).identity


def test_the_data_identity_is_the_content_of_each_source(tmp_path: Path) -> None:
    """A checkpoint recorded only {train_samples, tokens}: a same-size edit kept both. It now records each
    source's content hash (computed as the store is written); a touched file (same bytes) is the same data."""
    a, b, cache = corpus(tmp_path / "a.txt"), corpus(tmp_path / "b.txt", 200), tmp_path / "cache"
    first = identity(cache, a)
    os.utime(a, ns=(time.time_ns(), a.stat().st_mtime_ns + 10**9))
    touched = identity(cache, a)
    assert touched["sources"][0]["store"] != first["sources"][0]["store"]  # rebuilt (the fingerprint moved) ...
    assert data_changes(first, touched) == []  # ... with the same content
    same_size_edit(a)
    edited = identity(cache, a)
    assert (edited["train_samples"], edited["tokens"]) == (first["train_samples"], first["tokens"])
    old, new = first["sources"][0], edited["sources"][0]
    assert data_changes(first, edited) == [
        f"data source {str(a)!r}: its content changed (content {old['content'][:16]} in store {old['store']} -> "
        f"content {new['content'][:16]} in store {new['store']})"]
    legacy = {"train_samples": first["train_samples"], "tokens": first["tokens"]}  # before content identities
    assert data_changes(legacy, edited) is None  # cannot tell: resumed with a warning
    assert data_changes({**legacy, "tokens": 5}, edited) == [f"data tokens: 5 -> {edited['tokens']}"]
    mixture = identity(cache, a, b)
    same_size_edit(b)
    changes = data_changes(mixture, identity(cache, a, b))
    assert len(changes) == 1 and changes[0].startswith(f"data source {str(b)!r}: its content changed")


def rewrite_state(checkpoint: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Edit a checkpoint's trainer_state.json as an older version would have written it, keeping its manifest
    valid (size and SHA-256)."""
    state_file = checkpoint / "trainer_state.json"
    state_file.write_text(json.dumps(edit(json.loads(state_file.read_text()))))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"] = {"size": state_file.stat().st_size, "sha256": sha256(state_file)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resuming_on_edited_data_is_refused_unless_allowed(tmp_path: Path) -> None:
    """The issue's case: 2 steps on a .txt, characters replaced (same size), rerun: it resumed from step 2 on other
    text. Now: refused (exit 2) naming the source; a touched file resumes; checkpoint.allow_data_change=true resumes
    with a warning giving both identities; a checkpoint without a content identity resumes with a warning."""
    text, out = corpus(tmp_path / "corpus.txt"), tmp_path / "run"
    source = [f"data.source={text}", f"data.cache_dir={tmp_path / 'cache'}"]
    ok(run_cli(ckpt_args(out, *source, steps=2)))
    os.utime(text, ns=(time.time_ns(), text.stat().st_mtime_ns + 10**9))
    touched = ok(run_cli(ckpt_args(out, *source, steps=3)))
    assert "building the token store" in touched.stderr and "resumed from" in touched.stderr
    same_size_edit(text)
    refused = run_cli(ckpt_args(out, *source, steps=4))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "cannot resume" in refused.stderr and f"data source {str(text)!r}: its content changed" in refused.stderr
    assert "checkpoint.allow_data_change=true" in refused.stderr and "Traceback" not in refused.stderr
    allowed = ok(run_cli(ckpt_args(out, *source, "checkpoint.allow_data_change=true", steps=4)))
    assert "resuming on changed data (checkpoint.allow_data_change: true): data source" in allowed.stderr
    assert " -> content " in allowed.stderr and read_metrics(out)[-1]["step"] == 4

    def without_identity(state: dict) -> dict:
        state["data"] = {k: state["data"][k] for k in ("train_samples", "tokens")}
        return state

    rewrite_state(complete_checkpoints(out)[-1][1], without_identity)
    legacy = ok(run_cli(ckpt_args(out, *source, steps=5)))
    assert "records no content identity of its data" in legacy.stderr and read_metrics(out)[-1]["step"] == 5
