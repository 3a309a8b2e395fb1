"""Checkpoints that survive crashes: atomic commit, manifest with checksums, keep-last-N, exact resume.

Layout: OUTPUT_DIR/checkpoints/step-000123/ holds what the engine writes (weights as safetensors, optimizer,
LR schedule position, loss scaler; per-rank shards where state is per-rank), `rng-rank<R>.pt` for every rank
(Python, NumPy, torch CPU and CUDA generators), `trainer_state.json` (step, tokens, data position, world size,
data fingerprint), `config.yaml` (the resolved recipe), `hf/` (model config and tokenizer, for export), and
`manifest.json`, written last, listing every file with its size and SHA-256.

Commit protocol: rank 0 makes `.tmp-step-N`; every rank writes its files there; barrier; rank 0 fsyncs and
hashes every file, writes the manifest, renames the folder to `step-N`, fsyncs the parent, and only then
deletes checkpoints beyond keep_last. A folder without a valid manifest is not a checkpoint: `resume: auto`
never picks it, and the next run deletes leftover `.tmp-*` folders.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from safetensors import SafetensorError

from trainer.data.batches import DataPosition
from trainer.distributed import DistInfo, barrier, broadcast_object, gather_objects
from trainer.engine.base import Engine
from trainer.errors import EXIT_RECIPE, CheckpointError, os_error_message
from trainer.faults import Faults
from trainer.recipe import to_yaml
from trainer.safeio import fsync_dir, fsync_file, load_tensors, save_tensors, sha256, write_json
from trainer.schema import CheckpointConfig, Recipe, resume_rules

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """The loop's counters: everything besides the engine's state that resume must bring back."""

    step: int = 0
    tokens: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss or gradient norm (train.max_nonfinite_steps)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def read_manifest(path: Path, checksums: bool) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError when it is missing, damaged or incomplete."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a complete checkpoint: no valid {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')} is not {FORMAT_VERSION}")
    for name, meta in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}: file {name} is missing or has the wrong size; the checkpoint is damaged")
        if checksums and sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {name} does not match its checksum; the checkpoint is damaged")
    return manifest


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder, complete or not, oldest first."""
    root = checkpoints_root(output_dir)
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint with a valid manifest (sizes checked), oldest first."""
    found = []
    for step, p in checkpoint_folders(output_dir):
        try:
            read_manifest(p, checksums=False)
        except CheckpointError as e:
            log.warning("ignoring %s", e)
            continue
        found.append((step, p))
    return found


def step_to_resume(output_dir: Path, resume: str) -> int | None:
    """The step the checkpoint `checkpoint.resume` points at was saved at (its manifest's sizes checked, not its
    checksums), or None when a run would start from scratch: a cheap look before anything is built."""
    if resume == "never":
        return None
    path = output_dir if resume == "auto" else Path(resume).expanduser()
    if not (path / MANIFEST).is_file():
        done = complete_checkpoints(path)
        if not done:
            return None
        path = done[-1][1]
    try:
        return int(json.loads((path / STATE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError):
        return None  # choose() reports what is wrong with it


def move_aside(output_dir: Path) -> Path:
    """Start over without deleting anything: checkpoints/ and metrics.jsonl move to `previous-<time>/`."""
    aside = output_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    aside.mkdir()
    for name in ("checkpoints", "metrics.jsonl"):
        if (output_dir / name).exists():
            os.replace(output_dir / name, aside / name)
    return aside


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(x) for x in obj]
    return obj


def _value(recipe: dict[str, Any], key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def compare_recipes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(blocking differences, allowed differences), each as 'key: old -> new', by the schema's resume rules
    (trainer/schema.py): `must_match` keys block, `allowed` ones are logged, `ignored` ones are not compared."""
    blocking, allowed = [], []
    for key, rule in resume_rules().items():
        old, new = _value(saved, key), _value(current, key)
        if rule == "ignored" or _tuples_to_lists(old) == _tuples_to_lists(new):
            continue
        line = f"{key}: {old!r} -> {new!r}"
        (blocking if rule == "must_match" else allowed).append(line)
    return blocking, allowed


@dataclass
class Checkpointer:
    """Saves and restores one run's checkpoints from every rank."""

    cfg: CheckpointConfig
    recipe: Recipe
    output_dir: Path
    dist: DistInfo
    fingerprint: dict[str, Any]  # world size, accumulation, data summary: must match to resume
    write_assets: Callable[[Path], None] = lambda path: None  # rank 0: model config + tokenizer into hf/
    faults: Faults = field(default_factory=Faults)
    start_over: bool = False  # `train --force`: unusable or foreign checkpoints are moved aside, never deleted
    last_good: Path | None = None  # the newest checkpoint this run resumed from or saved

    def due(self, step: int, max_steps: int) -> bool:
        every = self.cfg.every_steps
        return bool(every and step % every == 0) or (step == max_steps and self.cfg.save_final)

    def save(self, engine: Engine, state: TrainState) -> Path:
        """Write, commit atomically, prune; returns the committed folder (same on every rank). A rank that fails
        to write (a full disk, a file-size limit) does not leave the others waiting: all ranks learn of it, the
        partial folder is removed, and every rank raises CheckpointError; earlier checkpoints are untouched."""
        started = time.perf_counter()
        root = checkpoints_root(self.output_dir)
        final, tmp = root / step_name(state.step), root / f".tmp-{step_name(state.step)}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if not engine.weights_finite():  # every rank: a collective inside, so all refuse together
            raise CheckpointError(f"refusing to save step {state.step}: the model's weights hold NaN or inf values "
                                  f"(the last good checkpoint, {self.last_good or 'none yet'}, is kept)",
                                  on_every_rank=True)
        self._agree(state.step, tmp, self._write_files, engine, tmp, state)
        size = self._agree(state.step, tmp, self._commit_on_main, tmp, final, state.step)
        if self.dist.is_main:
            log.info("checkpoint saved: %s (%.1f MB in %.2f s)", final, size / 1e6, time.perf_counter() - started)
            self._prune(root)
        barrier()
        self.last_good = final
        return final

    def _write_files(self, engine: Engine, tmp: Path, state: TrainState) -> None:
        """This rank's part of a checkpoint: the engine's state, its RNG, and (rank 0) the run files."""
        engine.save(tmp)
        save_tensors(_rng_state(), tmp / f"rng-rank{self.dist.rank}.pt")
        if self.dist.is_main:
            self._write_run_files(tmp, state)
        self.faults.during_save(state.step)

    def _agree(self, step: int, tmp: Path, write: Callable[..., Any], *args: Any) -> Any:
        """Run `write` on this rank, then learn whether every rank's write worked (one collective); on any failure
        remove the partial folder and raise the same CheckpointError everywhere."""
        failure, result = None, None
        try:
            result = write(*args)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as RuntimeError
            failure = f"rank {self.dist.rank}: {os_error_message(e) if isinstance(e, OSError) else e}"
        failures = [f for f in gather_objects(failure) if f]
        if failures:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.output_dir).free
            raise CheckpointError(
                f"could not write the checkpoint of step {step} ({'; '.join(map(str, failures))[:600]}); "
                f"{free / 1e9:.1f} GB free in {self.output_dir}. The partial checkpoint was removed; the last good "
                f"one, {self.last_good or 'none yet'}, is intact, and `resume: auto` continues from it once the "
                "problem is fixed", on_every_rank=True)
        return result

    def _write_run_files(self, tmp: Path, state: TrainState) -> None:
        write_json({"step": state.step, "tokens": state.tokens, "position": state.position.state_dict(),
                    "nonfinite_steps": state.nonfinite_steps, **self.fingerprint}, tmp / STATE)
        (tmp / "config.yaml").write_text(to_yaml(self.recipe), encoding="utf-8")
        (tmp / "hf").mkdir()
        self.write_assets(tmp / "hf")

    def _commit_on_main(self, tmp: Path, final: Path, step: int) -> int:
        """Rank 0: hash, fsync, write the manifest, rename into place; returns the bytes committed (0 elsewhere)."""
        if not self.dist.is_main:
            return 0
        files = {}
        mode = 0o666 & ~_umask()  # what a plain open() gives: some writers create files readable only by us
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            f.chmod(mode)
            fsync_file(f)
            files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": sha256(f)}
        for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}):
            fsync_dir(d)
        write_json({"format": FORMAT_VERSION, "step": step, "world_size": self.dist.world_size, "files": files},
                   tmp / MANIFEST)
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
        return sum(m["size"] for m in files.values())

    def _prune(self, root: Path) -> None:
        """Delete complete checkpoints beyond keep_last (only ever after a newer one is committed)."""
        complete = complete_checkpoints(self.output_dir)
        for _, path in complete[:-self.cfg.keep_last]:
            shutil.rmtree(path)
            log.info("removed old checkpoint %s (keep_last=%d)", path.name, self.cfg.keep_last)

    def clean_partial(self) -> None:
        """Rank 0: remove folders left by a save that never committed."""
        root = checkpoints_root(self.output_dir)
        for p in root.glob(".tmp-step-*") if root.is_dir() else []:
            log.warning("removing incomplete checkpoint %s (a save was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".old-step-*") if root.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)

    def choose(self) -> Path | None:
        """The checkpoint to resume from (decided on rank 0, the same on every rank)."""
        choice: Path | CheckpointError | None = None
        if self.dist.is_main:
            self.clean_partial()
            try:
                choice = self._choose_on_main()
            except CheckpointError as e:  # every rank must raise it, not wait in the broadcast below
                choice = e
        choice = broadcast_object(choice)  # type: ignore[assignment]
        if isinstance(choice, CheckpointError):  # the resume cannot go ahead as configured: a setup problem
            raise CheckpointError(str(choice), on_every_rank=True, exit_code=EXIT_RECIPE)
        return choice

    def _choose_on_main(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            self._refuse_to_mix()
            return None
        if resume != "auto":
            path = Path(resume).expanduser()
            if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
                done = complete_checkpoints(path)
                if not done:
                    raise CheckpointError(f"checkpoint.resume = {resume!r}: that run has no complete checkpoint")
                path = done[-1][1]
            read_manifest(path, checksums=True)
            return path
        damaged = []
        for _, path in reversed(checkpoint_folders(self.output_dir)):
            try:
                read_manifest(path, checksums=True)
            except CheckpointError as e:
                damaged.append(str(e))
                log.warning("%s; trying an older one", e)
                continue
            log.info("resume: auto picked %s, the newest complete checkpoint in %s", path.name, self.output_dir)
            return path
        if damaged:
            self._start_over_or_refuse(
                f"no checkpoint in {checkpoints_root(self.output_dir)} can be resumed; each one failed its check:\n"
                + "\n".join(f"  - {reason}" for reason in damaged)
                + "\nnothing was changed. Restore them from a backup, or start over: add --force (moves checkpoints/ "
                "and metrics.jsonl aside into output_dir/previous-<time>/, deletes nothing), or use a new output_dir")
        return None

    def _refuse_to_mix(self) -> None:
        """checkpoint.resume=never over an earlier run's checkpoints would interleave the two runs, and keep_last
        would delete the earlier run's checkpoints as the new one saves."""
        found = checkpoint_folders(self.output_dir)
        if found:
            self._start_over_or_refuse(
                f"checkpoint.resume=never, but {self.output_dir} holds {len(found)} checkpoint(s) of an earlier run "
                f"(newest: {found[-1][1].name}); starting over here would mix the runs and keep_last would delete "
                "them. Use a new output_dir, resume (checkpoint.resume=auto), or add --force to move them aside")

    def _start_over_or_refuse(self, why: str) -> None:
        if not self.start_over:
            raise CheckpointError(why)
        aside = move_aside(self.output_dir)
        log.warning("--force: starting over; the earlier checkpoints and metrics are in %s", aside)

    def restore(self, engine: Engine, path: Path) -> TrainState:
        """Check compatibility, then load engine state, counters and this rank's RNG."""
        started = time.perf_counter()
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        saved_cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        self._check_compatible(path, state, saved_cfg)
        engine.load(path, int(state["world_size"]))
        rng = path / f"rng-rank{self.dist.rank}.pt"
        _set_rng_state(load_tensors(rng))
        log.info("resumed from %s in %.2f s: step %d, %d tokens seen, data epoch %d", path,
                 time.perf_counter() - started, state["step"], state["tokens"], state["position"]["epoch"])
        self.last_good = path
        return TrainState(state["step"], state["tokens"], DataPosition.from_state_dict(state["position"]),
                          int(state.get("nonfinite_steps", 0)))

    def _check_compatible(self, path: Path, state: dict[str, Any], saved_cfg: dict[str, Any]) -> None:
        blocking, allowed = compare_recipes(saved_cfg, self.recipe.model_dump())
        for key, value in self.fingerprint.items():
            if _tuples_to_lists(state.get(key)) != _tuples_to_lists(value):
                blocking.append(f"{key}: {state.get(key)!r} -> {value!r}")
        if blocking:
            raise CheckpointError(
                f"cannot resume from {path}: the run differs from the one that saved it:\n"
                + "\n".join(f"  - {line}" for line in blocking)
                + "\nrestore those settings, start a new output_dir, or set checkpoint.resume=never",
                on_every_rank=True, exit_code=EXIT_RECIPE)
        for line in allowed:
            log.warning("resuming with a changed setting: %s", line)
