"""`ResolvedRun`: a recipe made concrete for one launch, every derived value computed once (by resolve.py).

It sits below the rooms that read it (the engines' specs, the plan, the data, the model, the loop) and above the
recipe's own declarations; it computes nothing itself beyond reading what resolve.py put in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.recipe import architecture as arch
from trainer.recipe.execution import Execution
from trainer.recipe.read import Sources
from trainer.recipe.schema import Recipe


@dataclass(frozen=True)
class ResolvedRun:
    """A recipe made concrete for one launch."""

    recipe: Recipe
    world_size: int
    grad_accum_steps: int  # micro-batches per optimizer step on each rank
    global_batch_size: int  # sequences per optimizer step over all ranks (a sequence-parallel group counts once)
    architecture: Any  # the model's transformers config (vocab_size resolved)
    architecture_source: str  # recipe | local | known models table | hub
    output_dir: Path
    execution: Execution  # which engine runs, what it shards and offloads, what trains (execution.py)
    warnings: tuple[str, ...] = ()  # allowed but probably not meant: printed by validate and train
    sources: Sources = Sources()
    recipe_path: str | None = None

    @property
    def data_parallel_size(self) -> int:
        """Groups of ranks that take different sequences: the world size over distributed.sequence_parallel
        (the ranks of a group share every sequence, each computing seq_len / N of its tokens)."""
        return self.world_size // self.execution.sequence_parallel

    def data_rank(self, rank: int) -> int:
        """Which share of each step's sequences `rank` takes: its group's (groups are consecutive ranks)."""
        return rank // self.execution.sequence_parallel

    @property
    def mlp_tiles(self) -> int:
        """model.tiled_mlp resolved: auto is one tile per hidden_size tokens of the sequence each rank computes
        (at least 1, so a short sequence stays untiled)."""
        chosen = self.recipe.model.tiled_mlp
        if chosen != "auto":
            return int(chosen)
        hidden = int(getattr(arch.text_config(self.architecture), "hidden_size", 0) or 0)
        local = self.seq_len // self.execution.sequence_parallel
        return max(1, -(-local // hidden)) if hidden else 1

    @property
    def micro_batch_size(self) -> int:
        return self.recipe.train.micro_batch_size

    @property
    def seq_len(self) -> int:
        return self.recipe.data.seq_len

    @property
    def vocab_size(self) -> int:
        return int(arch.text_config(self.architecture).vocab_size)

    @property
    def sharded_native_state(self) -> bool:
        """The native engine splits the optimizer state over the ranks of this launch (zero_stage 1, N > 1)."""
        return self.execution.native_sharded_state and self.world_size > 1

    @property
    def full_weights(self) -> bool:
        """checkpoint.full_weights resolved: whether a DeepSpeed checkpoint also holds the whole fp32 weights
        gathered on rank 0. Auto: not at ZeRO-3, whose point is that no rank holds the whole model (export
        consolidates them from the shards instead); at ZeRO-1/2 every rank holds the weights anyway."""
        chosen = self.recipe.checkpoint.full_weights
        if chosen is not None:
            return chosen
        return not self.execution.zero3
