"""One run's checkpoints, on every rank: when to save, saving (checkpoint/commit.py), choosing the one to resume
(checkpoint/choose.py) and restoring it after the resume policy agreed (checkpoint/compat.py): the engine's state
(resharded when the number of ranks changed), the loop's counters and this rank's random generators (derived from
the seed and the step when the ranks that saved them are not these: checkpoint/rng.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainer.checkpoint.choose import choose_checkpoint
from trainer.checkpoint.commit import AtomicSave
from trainer.checkpoint.compat import ResumeAllowances, check_compatible, log_layout_change
from trainer.checkpoint.layout import RECIPE
from trainer.checkpoint.rng import derived_seed, rng_state, seed_rng, set_rng_state
from trainer.checkpoint.state import RunFingerprint, TrainState, read_saved, write_state
from trainer.distributed import DistInfo
from trainer.engine.base import Engine
from trainer.errors import CheckpointError
from trainer.faults import Faults
from trainer.recipe.read import to_yaml
from trainer.safeio import load_tensors, save_tensors
from trainer.recipe.schema import Recipe

log = logging.getLogger(__name__)


@dataclass
class Checkpointer:
    """Saves and restores one run's checkpoints from every rank."""

    recipe: Recipe
    output_dir: Path
    dist: DistInfo
    fingerprint: RunFingerprint  # recorded at save, compared on resume
    write_assets: Callable[[Path], None] = lambda path: None  # rank 0: model config + tokenizer into hf/
    faults: Faults = field(default_factory=Faults)
    start_over: bool = False  # `train --force`: unusable or foreign checkpoints are moved aside, never deleted
    allowances: ResumeAllowances = ResumeAllowances()
    last_good: Path | None = None  # the newest checkpoint this run resumed from or saved

    def due(self, step: int, max_steps: int) -> bool:
        cfg = self.recipe.checkpoint
        return bool(cfg.every_steps and step % cfg.every_steps == 0) or (step == max_steps and cfg.save_final)

    def save(self, engine: Engine, state: TrainState) -> Path:
        """Write, commit atomically, prune (checkpoint/commit.py); returns the committed folder. Weights holding
        NaN or inf are never saved (every rank checks its share together)."""
        if not engine.weights_finite():
            raise CheckpointError(f"refusing to save step {state.step}: the model's weights hold NaN or inf values "
                                  f"(the last good checkpoint, {self.last_good or 'none yet'}, is kept)",
                                  on_every_rank=True)
        commit = AtomicSave(self.output_dir, self.dist, self.recipe.checkpoint.keep_last)
        self.last_good = commit.save(state.step, lambda tmp: self._write_files(engine, tmp, state), self.last_good)
        return self.last_good

    def _write_files(self, engine: Engine, tmp: Path, state: TrainState) -> None:
        """This rank's part of a checkpoint: the engine's state, its RNG, and (rank 0) the run files."""
        engine.save(tmp)
        save_tensors(rng_state(), tmp / f"rng-rank{self.dist.rank}.pt")
        if self.dist.is_main:
            write_state(tmp, state, self.fingerprint)
            (tmp / RECIPE).write_text(to_yaml(self.recipe), encoding="utf-8")
            (tmp / "hf").mkdir()
            self.write_assets(tmp / "hf")
        self.faults.during_save(state.step)

    def choose(self) -> Path | None:
        """The checkpoint to resume from, the same on every rank (a collective; checkpoint/choose.py)."""
        return choose_checkpoint(self.recipe.checkpoint.resume, self.output_dir, self.dist, self.start_over)

    def restore(self, engine: Engine, path: Path) -> TrainState:
        """Check compatibility, then load engine state (resharded when the number of ranks changed), counters and
        this rank's RNG (derived from the seed and the step when the ranks that saved it are not these)."""
        started = time.perf_counter()
        saved = read_saved(path)
        check_compatible(saved, self.recipe, self.fingerprint, self.allowances)
        engine.load(path, saved.world_size)
        if saved.world_size == self.dist.world_size:
            set_rng_state(load_tensors(path / f"rng-rank{self.dist.rank}.pt"))
        else:
            seed_rng(derived_seed(self.recipe.train.seed, saved.step, self.dist.rank))
        state = saved.train_state()
        log.info("resumed from %s in %.2f s: step %d, %d tokens seen, data epoch %d", path,
                 time.perf_counter() - started, state.step, state.tokens, state.position.epoch)
        log_layout_change(saved, self.fingerprint)
        self.last_good = path
        return state
