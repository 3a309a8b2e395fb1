"""How a recipe is executed, decided once: which engine really runs a step, what it shards and offloads, and what is
trained. Every room reads this instead of re-deriving it from `distributed.*` and `adapter.*`.

`distributed.engine: deepspeed` with `zero_stage: 0` runs on the native engine (DDP is what ZeRO stage 0 is, and
DeepSpeed's own stage 0 mishandles fp16 and bf16: engine/deepspeed_spec.py); `zero_stage: 1` on the native engine
shards the optimizer state by whole parameters (optim/sharded.py) when there is more than one rank.

Pure: reads the typed recipe only (no torch, no environment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.recipe.schema import Recipe

EngineName = Literal["native", "deepspeed"]
AdapterMode = Literal["none", "lora", "qlora"]


@dataclass(frozen=True)
class Execution:
    """The resolved way a run executes (independent of the number of ranks)."""

    engine: EngineName  # the engine that runs the step
    named_engine: EngineName  # the engine the recipe names (distributed.engine: deepspeed at stage 0 runs natively)
    zero_stage: int  # native: 0 (replicated) or 1 (optimizer state sharded); DeepSpeed: ZeRO 1-3
    offload_optimizer: bool  # DeepSpeed: optimizer state (and its fp32 master copy) in CPU memory
    offload_params: bool  # DeepSpeed ZeRO-3: parameter partitions in CPU memory
    adapter: AdapterMode  # none: every weight trains; lora / qlora: adapters over a frozen (4-bit) base
    sequence_parallel: int = 1  # ranks that share one sequence (1: none)

    @property
    def deepspeed(self) -> bool:
        """DeepSpeed ZeRO runs the step."""
        return self.engine == "deepspeed"

    @property
    def zero3(self) -> bool:
        """DeepSpeed ZeRO-3: every rank holds a partition of each weight, gathered whole only while it computes."""
        return self.deepspeed and self.zero_stage == 3

    @property
    def deepspeed_stage0(self) -> bool:
        """The recipe names DeepSpeed at ZeRO stage 0, which runs on the native engine."""
        return self.named_engine == "deepspeed" and not self.deepspeed

    def zero_at_least(self, stage: int) -> bool:
        """DeepSpeed runs at this ZeRO stage or a higher one."""
        return self.deepspeed and self.zero_stage >= stage

    @property
    def native_sharded_state(self) -> bool:
        """The native engine keeps only each rank's share of the optimizer state, by whole parameters (which
        changes anything with more than one rank)."""
        return self.engine == "native" and self.zero_stage == 1

    @property
    def adapted(self) -> bool:
        """LoRA or QLoRA: only the adapters train."""
        return self.adapter != "none"

    def describe(self) -> str:
        """How the log and the plan name it: 'native (DDP)', 'DeepSpeed ZeRO-3, optimizer state and parameters in
        CPU memory', 'native, optimizer state sharded by whole parameters'."""
        if not self.deepspeed:
            text = "native, optimizer state sharded by whole parameters" if self.zero_stage == 1 else "native (DDP)"
        else:
            text = f"DeepSpeed ZeRO-{self.zero_stage}"
            offloaded = [what for what, on in (("optimizer state", self.offload_optimizer),
                                               ("parameters", self.offload_params)) if on]
            if offloaded:
                text += f", {' and '.join(offloaded)} in CPU memory"
        if self.adapted:
            text += f", {self.adapter} adapters"
        if self.sequence_parallel > 1:
            text += f", sequence parallel over {self.sequence_parallel} ranks"
        return text


def execution_of(recipe: Recipe) -> Execution:
    """The execution a recipe asks for. The one place that derives it from `distributed.*` and `adapter.type`."""
    d = recipe.distributed
    deepspeed = d.engine == "deepspeed" and d.zero_stage > 0
    return Execution(engine="deepspeed" if deepspeed else "native", named_engine=d.engine, zero_stage=d.zero_stage,
                     offload_optimizer=deepspeed and d.offload_optimizer == "cpu",
                     offload_params=deepspeed and d.offload_params == "cpu", adapter=recipe.adapter.type,
                     sequence_parallel=d.sequence_parallel)
