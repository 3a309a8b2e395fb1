"""Model states per rank (weights, gradients, master copies, optimizer state) and the transients an engine adds
around them (autocast copies, optimizer-step temporaries): asked of the spec of the engine that runs
(engine/specs.py), which knows what it shards, offloads and keeps."""

from __future__ import annotations

from trainer.engine.specs import spec_of
from trainer.plan.items import ModelStates, Shapes
from trainer.recipe.resolved import ResolvedRun


def model_states(run: ResolvedRun, sh: Shapes) -> ModelStates:
    return spec_of(run.execution).model_states(run, sh)


def step_temporaries(run: ResolvedRun, sh: Shapes, states: ModelStates) -> int:
    return spec_of(run.execution).step_temporaries(run, sh, states)


def autocast_copies(run: ResolvedRun, sh: Shapes) -> int:
    return spec_of(run.execution).autocast_copies(run, sh)
