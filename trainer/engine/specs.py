"""Each engine's plan-time knowledge, by name: what it refuses, what each rank keeps, what a step and autocast add,
and what a checkpoint takes on disk (engine/native_spec.py, engine/deepspeed_spec.py). The rules and the plan ask
the spec of the engine that runs (`ResolvedRun.execution`); a new engine is one more spec here."""

from __future__ import annotations

from types import ModuleType

from trainer.engine import deepspeed_spec, native_spec
from trainer.errors import KeySource, Problem
from trainer.recipe.execution import Execution
from trainer.recipe.schema import Recipe

SPECS: dict[str, ModuleType] = {native_spec.NAME: native_spec, deepspeed_spec.NAME: deepspeed_spec}


def spec_of(execution: Execution) -> ModuleType:
    """The spec of the engine that runs a step."""
    return SPECS[execution.engine]


def engine_problems(recipe: Recipe, src: KeySource) -> list[Problem]:
    """What every engine refuses in this recipe (each checks the recipes that name it or that it would run)."""
    return [problem for spec in SPECS.values() for problem in spec.problems(recipe, src)]
