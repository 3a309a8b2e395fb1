"""`trainer_state.json`: the loop's counters (TrainState) and the fingerprint of the run that wrote a checkpoint
(RunFingerprint: global batch, layout, the data's content identity, an adapter run's base), written at save and
read back, typed, at resume (SavedRun, with the recipe the checkpoint was saved under)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.adapters.base_identity import Identity
from trainer.checkpoint.layout import RECIPE, STATE
from trainer.data.batches import DataPosition
from trainer.engine.nonfinite import NonFiniteCounts
from trainer.safeio import write_json

BASE_KEY = "base_model"  # in an adapter run's trainer_state.json: its base's identity (adapters/base_identity.py)


@dataclass
class TrainState:
    """The loop's counters: everything besides the engine's state that resume must bring back."""

    step: int = 0
    tokens: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    nonfinite: NonFiniteCounts = field(default_factory=NonFiniteCounts)  # skipped steps (trainer/engine/nonfinite.py)


@dataclass(frozen=True)
class RunFingerprint:
    """What a checkpoint records of the run that wrote it, beyond its recipe; a resume compares it with the run
    resuming (checkpoint/compat.py)."""

    global_batch_size: int  # must stay, unless changed on purpose on the command line
    world_size: int  # may change on resume (the engines reshard)
    grad_accum_steps: int  # follows from the global batch and the world size
    data: dict[str, Any]  # the data's identity: counts and each source's content hash (data/identity.py)
    base_model: Identity | None = None  # an adapter run's base (adapters/base_identity.py)

    def as_json(self) -> dict[str, Any]:
        out = {"global_batch_size": self.global_batch_size, "world_size": self.world_size,
               "grad_accum_steps": self.grad_accum_steps, "data": self.data}
        return out | ({BASE_KEY: self.base_model} if self.base_model is not None else {})


def write_state(path: Path, state: TrainState, fingerprint: RunFingerprint) -> None:
    write_json({"step": state.step, "tokens": state.tokens, "position": state.position.state_dict(),
                "nonfinite": state.nonfinite.state_dict(), **fingerprint.as_json()}, path / STATE)


@dataclass(frozen=True)
class SavedRun:
    """A checkpoint's counters and fingerprint (its trainer_state.json) and the recipe it was saved under (its
    config.yaml, as a plain mapping: keys of other versions stay comparable)."""

    path: Path
    state: dict[str, Any]
    recipe: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def world_size(self) -> int:
        return int(self.state["world_size"])

    @property
    def grad_accum_steps(self) -> int:
        return int(self.state["grad_accum_steps"])

    @property
    def micro_batch_size(self) -> int:
        return int(self.recipe["train"]["micro_batch_size"])

    @property
    def global_batch_size(self) -> int:
        """The global batch it was trained with (older checkpoints did not record it)."""
        if "global_batch_size" in self.state:
            return int(self.state["global_batch_size"])
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def data(self) -> dict[str, Any] | None:
        return self.state.get("data")

    @property
    def base_model(self) -> Identity | None:
        return self.state.get(BASE_KEY)

    def train_state(self) -> TrainState:
        s = self.state
        counts = s.get("nonfinite", {"skipped": s.get("nonfinite_steps", 0)})  # the older name
        return TrainState(self.step, int(s["tokens"]), DataPosition.from_state_dict(s["position"]),
                          NonFiniteCounts.from_state_dict(counts))


def read_saved(path: Path) -> SavedRun:
    """A checkpoint's trainer_state.json and config.yaml (OSError, ValueError or yaml.YAMLError when unreadable)."""
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    recipe = yaml.safe_load((path / RECIPE).read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(recipe, dict):
        raise ValueError(f"{path}: {STATE} or {RECIPE} is not a mapping")
    return SavedRun(path, state, recipe)


def recorded_base(ckpt: Path) -> Identity | None:
    """The base identity an adapter checkpoint recorded (None: a checkpoint written before they were)."""
    try:
        return json.loads((ckpt / STATE).read_text(encoding="utf-8")).get(BASE_KEY)
    except (OSError, ValueError, AttributeError):
        return None
