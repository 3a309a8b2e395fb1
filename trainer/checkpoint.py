"""Checkpoints that survive crashes: atomic commit, manifest with checksums, keep-last-N, exact resume, also on
another number of ranks.

Layout: OUTPUT_DIR/checkpoints/step-000123/ holds what the engine writes (weights as safetensors, optimizer,
LR schedule position, loss scaler; per-rank shards where state is per-rank), `rng-rank<R>.pt` for every rank
(Python, NumPy, torch CPU and CUDA generators), `trainer_state.json` (step, tokens, data position, world size,
accumulation, global batch, the data's identity: counts and each source's content hash; in an adapter run the
base model's identity), `config.yaml` (the resolved recipe), `hf/` (model config and tokenizer, for export),
and `manifest.json`, written last, listing every file with its size and SHA-256. Every file is made readable as
a plain open() makes it (0644 under umask 022).

Commit protocol: rank 0 makes `.tmp-step-N`; every rank writes its files there; every rank fsyncs and hashes the
files it wrote (by name: a file whose name carries `rank<R>` / `rank_<R>` is rank R's, the others rank 0's) and
the digests are gathered, so rank 0 never reads another rank's files; rank 0 writes the manifest, renames the
folder to `step-N`, fsyncs the parent, and only then deletes checkpoints beyond keep_last. A folder without a
valid manifest is not a checkpoint: `resume: auto` never picks it, and the next run deletes leftover `.tmp-*`
folders. On resume the checksums are verified by all ranks together, each rank the files its rank wrote.

Resume on another number of ranks: the global batch must stay (accumulation is recomputed), the data position is
a global sample cursor, engines reshard their state (Engine.load), and every rank's RNG is derived from the seed
and the step (the saved states belong to ranks that may not exist any more).
"""

from __future__ import annotations

import hashlib
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

from trainer.adapters.base_identity import Identity, describe, mismatch
from trainer.data.batches import DataPosition
from trainer.data.identity import data_changes
from trainer.distributed import DistInfo, barrier, broadcast_object, gather_objects
from trainer.engine.base import Engine
from trainer.errors import EXIT_RECIPE, CheckpointError, os_error_message
from trainer.faults import Faults
from trainer.nonfinite import NonFiniteCounts
from trainer.recipe import to_yaml
from trainer.safeio import current_umask, fsync_dir, fsync_file, load_tensors, save_tensors, sha256, write_json
from trainer.schema import CheckpointConfig, Recipe, resume_rules

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
BASE_KEY = "base_model"  # in trainer_state.json of an adapter run: its base's identity (adapters/base_identity.py)


@dataclass
class TrainState:
    """The loop's counters: everything besides the engine's state that resume must bring back."""

    step: int = 0
    tokens: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    nonfinite: NonFiniteCounts = field(default_factory=NonFiniteCounts)  # skipped steps (trainer/nonfinite.py)


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


RANK_IN_NAME = re.compile(r"rank_?(\d+)")


def writer_of(name: str, world_size: int) -> int:
    """The rank that writes a checkpoint file, by its name: ours (`rng-rank1.pt`, `optimizer-rank00001.pt`) and
    DeepSpeed's (`zero_pp_rank_1_mp_rank_00_optim_states.pt`: the first rank in the name is the data-parallel
    one) carry it; every other file is rank 0's."""
    found = RANK_IN_NAME.search(Path(name).name)
    rank = int(found.group(1)) if found else 0
    return rank if rank < world_size else 0


def verification_share(files: dict[str, dict[str, Any]], world_size: int, rank: int) -> list[str]:
    """The files `rank` checksums when a checkpoint is verified on `world_size` ranks: each file by the rank that
    wrote it when the number of ranks is the same (nobody reads another rank's files), else by its writer's rank
    modulo the new number of ranks."""
    return [name for name in sorted(files) if writer_of(name, 2**31) % world_size == rank]


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


@dataclass(frozen=True)
class ResumePoint:
    """A first look at the checkpoint a run would resume from: its counters and the recipe that wrote it."""

    path: Path
    state: dict[str, Any]
    config: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def peek_resume(output_dir: Path, resume: str) -> ResumePoint | None:
    """The checkpoint `checkpoint.resume` points at (its manifest's sizes checked, not its checksums), or None when
    a run would start from scratch: a cheap look before anything is built."""
    if resume == "never":
        return None
    path = output_dir if resume == "auto" else Path(resume).expanduser()
    if not (path / MANIFEST).is_file():
        done = complete_checkpoints(path)
        if not done:
            return None
        path = done[-1][1]
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None  # choose() reports what is wrong with it
    return ResumePoint(path, state, config)


def verified_resume(recipe: Recipe, output_dir: Path, dist: DistInfo, start_over: bool) -> ResumePoint | None:
    """The checkpoint a resume would continue from, with its checksums verified by all ranks together as at resume
    (Checkpointer.choose: under `auto` a damaged one is skipped for an older one; a damaged one named by path, or
    every one damaged, is refused, or with `start_over` moved aside), looked at as peek_resume does."""
    path = Checkpointer(recipe.checkpoint, recipe, output_dir, dist, {}, start_over=start_over).choose()
    point = peek_resume(output_dir, str(path)) if path is not None and dist.is_main else None
    return broadcast_object(point)  # type: ignore[return-value]


def other_base_refusal(path: Path, why: str) -> str:
    return (f"cannot resume from {path}: the base model is not the one the adapter was trained on:\n{why}\n"
            "restore that base where model.name_or_path points, or add --force to resume over this one anyway (the "
            "adapter then continues from weights learned for another base; logged as a warning)")


def base_refusal(point: ResumePoint, current: Identity) -> str | None:
    """Why an adapter checkpoint cannot resume over the base `current`, or None (the same base, or a checkpoint
    that recorded none: restore() warns about that one)."""
    recorded = point.state.get(BASE_KEY)
    why = mismatch(recorded, current) if recorded is not None else None
    return other_base_refusal(point.path, why) if why else None


def recorded_base(ckpt: Path) -> Identity | None:
    """The base identity an adapter checkpoint recorded (None: a checkpoint written before they were)."""
    try:
        return json.loads((ckpt / STATE).read_text(encoding="utf-8")).get(BASE_KEY)
    except (OSError, ValueError, AttributeError):
        return None


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


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of `rank` when a run resumes at `step` on another number of ranks than saved it: the saved
    per-rank generator states belong to ranks that no longer exist, so every rank starts from a seed of its own,
    the same for any retry of that resume."""
    digest = hashlib.sha256(f"trainer.resume:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def saved_global_batch(state: dict[str, Any], saved_cfg: dict[str, Any]) -> int:
    """The global batch a checkpoint was trained with (older checkpoints did not record it)."""
    if "global_batch_size" in state:
        return int(state["global_batch_size"])
    return int(saved_cfg["train"]["micro_batch_size"]) * int(state["grad_accum_steps"]) * int(state["world_size"])


def batch_change_problem(state: dict[str, Any], saved_cfg: dict[str, Any], micro_batch_size: int, world_size: int,
                         global_batch_size: int, explicit: bool) -> str | None:
    """Why resuming with this batch setup is refused, or None. The global batch is what must stay; the world size
    and the accumulation may change. A global batch changed by an explicit command-line override is the user's
    choice (the caller warns); otherwise the numbers, and the overrides that keep it, are the answer."""
    saved = saved_global_batch(state, saved_cfg)
    if saved == global_batch_size or explicit:
        return None
    old_world, old_accum = int(state["world_size"]), int(state["grad_accum_steps"])
    head = (f"the checkpoint was trained with a global batch of {saved} sequences (micro-batch "
            f"{saved_cfg['train']['micro_batch_size']} x accumulation {old_accum} x {old_world} ranks); on "
            f"{world_size} ranks this recipe gives {global_batch_size}")
    per_step = micro_batch_size * world_size
    if saved % per_step == 0:
        return (f"{head}. To keep {saved}, set train.global_batch_size={saved} (accumulation "
                f"{saved // per_step}), in the recipe or on the command line")
    fitting = [w for w in range(1, saved // micro_batch_size + 1) if saved % (micro_batch_size * w) == 0]
    return (f"{head}. {saved} cannot be kept on {world_size} ranks: it is not a multiple of micro-batch "
            f"{micro_batch_size} x {world_size} ranks = {per_step}. It can be kept on "
            f"{', '.join(map(str, fitting[:12]))} ranks (train.global_batch_size={saved}); or change the global batch "
            f"on purpose with an explicit train.global_batch_size=N (a multiple of {per_step}) on the command line")


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
    fingerprint: dict[str, Any]  # global batch, data summary: must match to resume
    write_assets: Callable[[Path], None] = lambda path: None  # rank 0: model config + tokenizer into hf/
    faults: Faults = field(default_factory=Faults)
    start_over: bool = False  # `train --force`: unusable or foreign checkpoints are moved aside, never deleted
    last_good: Path | None = None  # the newest checkpoint this run resumed from or saved
    layout: dict[str, int] = field(default_factory=dict)  # world size, accumulation: recorded, may change on resume
    explicit_batch: bool = False  # the command line set the batch (a changed global batch is then allowed)
    base_model: Identity | None = None  # an adapter run's base (adapters/base_identity.py): recorded, checked on resume
    other_base_ok: bool = False  # `train --force`: resume an adapter over another base than it was trained on (warned)

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
        digests = self._agree(state.step, tmp, self._hash_own_files, tmp)
        size = self._agree(state.step, tmp, self._commit_on_main, tmp, final, state.step, digests)[0]
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
        remove the partial folder and raise the same CheckpointError everywhere. Returns every rank's result, in
        rank order."""
        failure, result = None, None
        try:
            result = write(*args)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as RuntimeError
            failure = f"rank {self.dist.rank}: {os_error_message(e) if isinstance(e, OSError) else e}"
        outcomes = gather_objects((failure, result))
        failures = [f for f, _ in outcomes if f]  # type: ignore[misc]
        if failures:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.output_dir).free
            raise CheckpointError(
                f"could not write the checkpoint of step {step} ({'; '.join(map(str, failures))[:600]}); "
                f"{free / 1e9:.1f} GB free in {self.output_dir}. The partial checkpoint was removed; the last good "
                f"one, {self.last_good or 'none yet'}, is intact, and `resume: auto` continues from it once the "
                "problem is fixed", on_every_rank=True)
        return [r for _, r in outcomes]  # type: ignore[misc]

    def _write_run_files(self, tmp: Path, state: TrainState) -> None:
        base = {BASE_KEY: self.base_model} if self.base_model is not None else {}
        write_json({"step": state.step, "tokens": state.tokens, "position": state.position.state_dict(),
                    "nonfinite": state.nonfinite.state_dict(), **self.layout, **self.fingerprint, **base}, tmp / STATE)
        (tmp / "config.yaml").write_text(to_yaml(self.recipe), encoding="utf-8")
        (tmp / "hf").mkdir()
        self.write_assets(tmp / "hf")

    def _hash_own_files(self, tmp: Path) -> dict[str, dict[str, Any]]:
        """This rank's files (by name, `writer_of`): readable as a plain open() makes them (some writers create
        files readable only by us), fsynced, sized and hashed, while they are still in this rank's page cache."""
        mode = 0o666 & ~current_umask()
        out = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            name = f.relative_to(tmp).as_posix()
            if name == MANIFEST or writer_of(name, self.dist.world_size) != self.dist.rank:
                continue
            f.chmod(mode)
            fsync_file(f)
            out[name] = {"size": f.stat().st_size, "sha256": sha256(f)}
        return out

    def _commit_on_main(self, tmp: Path, final: Path, step: int, digests: list[dict[str, dict[str, Any]]]) -> int:
        """Rank 0: the manifest from every rank's digests, then rename into place; returns the bytes committed (0
        elsewhere). Every file in the folder must have been hashed by some rank."""
        if not self.dist.is_main:
            return 0
        files = {name: meta for per_rank in digests for name, meta in per_rank.items()}
        present = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
        if present != set(files):
            raise RuntimeError(f"checkpoint files and digests disagree: unhashed {sorted(present - set(files))[:3]}, "
                               f"missing {sorted(set(files) - present)[:3]}")
        for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}):
            fsync_dir(d)
        write_json({"format": FORMAT_VERSION, "step": step, "world_size": self.dist.world_size,
                    "files": dict(sorted(files.items()))}, tmp / MANIFEST)
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
        """The checkpoint to resume from, the same on every rank: rank 0 lists the candidates (newest first, their
        manifests and sizes checked), then all ranks verify the checksums of each in turn, every rank a share of
        the files, until one passes."""
        found: tuple[list[Path], list[str]] | CheckpointError = ([], [])
        if self.dist.is_main:
            self.clean_partial()
            try:
                found = self._candidates_on_main()
            except CheckpointError as e:  # every rank must raise it, not wait in the broadcast below
                found = e
        found = broadcast_object(found)  # type: ignore[assignment]
        if isinstance(found, CheckpointError):  # the resume cannot go ahead as configured: a setup problem
            raise CheckpointError(str(found), on_every_rank=True, exit_code=EXIT_RECIPE)
        candidates, damaged = found
        for path in candidates:
            problems = self._verify_together(path)
            if not problems:
                if self.dist.is_main and self.cfg.resume == "auto":
                    log.info("resume: auto picked %s, the newest complete checkpoint in %s", path.name,
                             self.output_dir)
                return path
            damaged.append(problems[0])
            if self.dist.is_main and self.cfg.resume == "auto":
                log.warning("%s; trying an older one", problems[0])
        if damaged:
            self._after_all_damaged(damaged)
        return None

    def _candidates_on_main(self) -> tuple[list[Path], list[str]]:
        """(checkpoints whose manifest and sizes are fine, newest first; why the others are not)."""
        resume = self.cfg.resume
        if resume == "never":
            self._refuse_to_mix()
            return [], []
        if resume != "auto":
            path = Path(resume).expanduser()
            if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
                done = complete_checkpoints(path)
                if not done:
                    raise CheckpointError(f"checkpoint.resume = {resume!r}: that run has no complete checkpoint")
                path = done[-1][1]
            read_manifest(path, checksums=False)
            return [path], []
        candidates, damaged = [], []
        for _, path in reversed(checkpoint_folders(self.output_dir)):
            try:
                read_manifest(path, checksums=False)
            except CheckpointError as e:
                log.warning("%s; trying an older one", e)
                damaged.append(str(e))
                continue
            candidates.append(path)
        return candidates, damaged

    def _verify_together(self, path: Path) -> list[str]:
        """Every rank checksums its share of the checkpoint's files (a collective); the problems found by any."""
        problems = []
        try:
            manifest = read_manifest(path, checksums=False)
            for name in verification_share(manifest["files"], self.dist.world_size, self.dist.rank):
                if sha256(path / name) != manifest["files"][name]["sha256"]:
                    problems.append(f"{path}: file {name} does not match its checksum; the checkpoint is damaged")
        except CheckpointError as e:
            problems.append(str(e))
        return [p for per_rank in gather_objects(problems) for p in per_rank]  # type: ignore[attr-defined]

    def _after_all_damaged(self, damaged: list[str]) -> None:
        """No checkpoint can be resumed: refuse on every rank, or (train --force) move them aside on rank 0."""
        if self.cfg.resume != "auto":
            raise CheckpointError(f"checkpoint.resume = {self.cfg.resume!r} cannot be resumed: {damaged[0]}. Nothing "
                                  "was changed; restore it from a backup, or point checkpoint.resume at another "
                                  "checkpoint", on_every_rank=True, exit_code=EXIT_RECIPE)
        why = (f"no checkpoint in {checkpoints_root(self.output_dir)} can be resumed; each one failed its check:\n"
               + "\n".join(f"  - {reason}" for reason in damaged)
               + "\nnothing was changed. Restore them from a backup, or start over: add --force (moves checkpoints/ "
               "and metrics.jsonl aside into output_dir/previous-<time>/, deletes nothing), or use a new output_dir")
        if not self.start_over:
            raise CheckpointError(why, on_every_rank=True, exit_code=EXIT_RECIPE)
        if self.dist.is_main:
            aside = move_aside(self.output_dir)
            log.warning("--force: starting over; the earlier checkpoints and metrics are in %s", aside)
        barrier()

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
        """Check compatibility, then load engine state (resharded when the number of ranks changed), counters and
        this rank's RNG (derived from the seed and the step when the ranks that saved it are not these)."""
        started = time.perf_counter()
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        saved_cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        self._check_compatible(path, state, saved_cfg)
        saved_world = int(state["world_size"])
        engine.load(path, saved_world)
        if saved_world == self.dist.world_size:
            _set_rng_state(load_tensors(path / f"rng-rank{self.dist.rank}.pt"))
        else:
            _seed_rng(derived_seed(self.recipe.train.seed, int(state["step"]), self.dist.rank))
        log.info("resumed from %s in %.2f s: step %d, %d tokens seen, data epoch %d", path,
                 time.perf_counter() - started, state["step"], state["tokens"], state["position"]["epoch"])
        self._log_layout_change(state, saved_cfg)
        self.last_good = path
        counts = state.get("nonfinite", {"skipped": state.get("nonfinite_steps", 0)})  # the older name
        return TrainState(state["step"], state["tokens"], DataPosition.from_state_dict(state["position"]),
                          NonFiniteCounts.from_state_dict(counts))

    def _log_layout_change(self, state: dict[str, Any], saved_cfg: dict[str, Any]) -> None:
        saved_world, saved_accum = int(state["world_size"]), int(state["grad_accum_steps"])
        world, accum = self.layout.get("world_size", saved_world), self.layout.get("grad_accum_steps", saved_accum)
        if (saved_world, saved_accum) == (world, accum):
            return
        old, new = saved_global_batch(state, saved_cfg), self.fingerprint.get("global_batch_size")
        batch = f"global batch {old} unchanged" if old == new else f"global batch {old} -> {new} (your override)"
        log.warning("resumed from step %d written by %d ranks, now %d ranks, accumulation %d -> %d, %s%s",
                    state["step"], saved_world, world, saved_accum, accum, batch,
                    "; dropout and other random streams are derived from the seed and the step, so they differ "
                    "from an uninterrupted run" if saved_world != world else "")

    def _check_compatible(self, path: Path, state: dict[str, Any], saved_cfg: dict[str, Any]) -> None:
        blocking, allowed = compare_recipes(saved_cfg, self.recipe.model_dump())
        data_changed: list[str] = []
        for key, value in self.fingerprint.items():
            if key == "data":
                data_changed = self._data_changes(path, state.get("data"), value)
                blocking += data_changed
                continue
            old = saved_global_batch(state, saved_cfg) if key == "global_batch_size" else state.get(key)
            if _tuples_to_lists(old) == _tuples_to_lists(value):
                continue
            if key == "global_batch_size" and self.explicit_batch:
                allowed.append(f"train.global_batch_size: {old} -> {value} (set on the command line)")
                continue
            blocking.append(f"{key}: {old!r} -> {value!r}")
        if blocking:
            raise CheckpointError(
                f"cannot resume from {path}: the run differs from the one that saved it:\n"
                + "\n".join(f"  - {line}" for line in blocking)
                + "\nrestore those settings" + (" and the data" if data_changed else "")
                + ", start a new output_dir, or set checkpoint.resume=never"
                + ("; or, to continue this run on the changed data, set checkpoint.allow_data_change=true"
                   if data_changed else ""),
                on_every_rank=True, exit_code=EXIT_RECIPE)
        for line in allowed:
            log.warning("resuming with a changed setting: %s", line)
        self._check_base(path, state)

    def _check_base(self, path: Path, state: dict[str, Any]) -> None:
        """An adapter resumes over the base it was trained on, or is refused (`train --force`: resumes, warned)."""
        if self.base_model is None:
            return
        if BASE_KEY not in state:
            log.warning("%s records no identity of its base model (written before they were recorded): cannot check "
                        "that the base found now, %s, is the one the adapter was trained on", path,
                        describe(self.base_model))
            return
        why = mismatch(state[BASE_KEY], self.base_model)
        if why is None:
            return
        if not self.other_base_ok:
            raise CheckpointError(other_base_refusal(path, why), on_every_rank=True, exit_code=EXIT_RECIPE)
        log.warning("--force: resuming the adapter of %s over another base model than it was trained on:\n%s", path,
                    why)

    def _data_changes(self, path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
        """How the data's content differs from the checkpoint's (trainer/data/identity.py), where that blocks the
        resume; logged instead when checkpoint.allow_data_change is set. A checkpoint from before content identities
        resumes with a warning."""
        changes = data_changes(saved, current)
        if changes is None:
            log.warning("%s records no content identity of its data (written by an older version): resuming "
                        "without checking that the data is the same", path)
            return []
        if changes and self.cfg.allow_data_change:
            for line in changes:
                log.warning("resuming on changed data (checkpoint.allow_data_change: true): %s", line)
            return []
        return changes
