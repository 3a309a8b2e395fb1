"""Did the frozen base really get sharded? Measured on every rank right after the model is built, against the plan.

Sharding can fail without an error: a base loaded whole on every rank before the engine partitions it (the peak
is then the whole 4-bit model per GPU, which is what ZeRO-3 was chosen to avoid), tensors an engine leaves whole,
a library that copies a partitioned weight back into a whole one. Training then runs, only with the memory of a
full copy per rank, until it does not fit. So each rank counts the bytes of the base it holds
(adapters/footprint.py `held_frozen_bytes`: partitions, whatever is whole, the 4-bit quantization constants) and
compares them with the plan's share for one rank (engine/deepspeed_spec.py `base_bytes_per_rank`: under
ZeRO-3 1/N of every tensor plus the constants). More than TOLERANCE over stops the run on every rank, before the
engine is built, with both numbers and the likely causes.
"""

from __future__ import annotations

import logging

from torch import nn

from trainer.adapters.footprint import held_frozen_bytes
from trainer.distributed import gather_objects
from trainer.errors import NotSharded
from trainer.engine.deepspeed_spec import base_bytes_per_rank
from trainer.plan.items import GiB
from trainer.plan.shapes import shapes
from trainer.recipe.resolved import ResolvedRun

log = logging.getLogger(__name__)

TOLERANCE = 0.10  # a partition is padded to a multiple of N elements: far below this

LIKELY_CAUSES = (
    "the base was loaded whole instead of module by module (a model built outside the engine's "
    "model_init_context, or a transformers/peft version that changed how layers are created)",
    "a library copied partitioned weights back into whole tensors (a .to() or a cast of the model after it was "
    "built)",
    "distributed.deepspeed_overrides changes how ZeRO-3 partitions (zero_optimization.*)",
)


def check_base_sharded(run: ResolvedRun, model: nn.Module) -> None:
    """Raise NotSharded on every rank when any rank holds more than (1 + TOLERANCE) x the plan's share of the
    frozen base. Adapter runs under ZeRO-3 only: elsewhere every rank holds the whole base by design (and a full
    fine-tune has no frozen base). A collective: every rank calls it."""
    if not (run.execution.adapted and run.execution.zero3):
        return
    held = held_frozen_bytes(model)
    expected = base_bytes_per_rank(run, shapes(run))
    per_rank = [int(x) for x in gather_objects(held)]
    worst = max(range(len(per_rank)), key=lambda r: per_rank[r])
    log.info("frozen base held per rank: %s MiB (plan: %.1f MiB per rank)",
             ", ".join(f"{b / 2**20:.1f}" for b in per_rank), expected / 2**20)
    if per_rank[worst] <= (1 + TOLERANCE) * expected:
        return
    how = f"1/{run.world_size} of every tensor plus the 4-bit quantization constants"
    causes = "\n".join(f"  - {c}" for c in LIKELY_CAUSES)
    raise NotSharded(
        f"the frozen base is not sharded as planned: rank {worst} holds {per_rank[worst] / GiB:.3f} GiB of it "
        f"({per_rank[worst] / expected:.2f}x), but the plan expects {expected / GiB:.3f} GiB per rank ({how}); "
        f"per rank: {', '.join(f'{b / GiB:.3f}' for b in per_rank)} GiB. Training would hold that much more on "
        f"every GPU. Likely causes:\n{causes}\n"
        "Stopped before training; report it with train.log if none of these applies.")
