"""The forwards of preference training: the policy's log-probs of each response, and the reference's, from the
same model. With adapters (LoRA/QLoRA) the reference is the base with its adapters disabled, run under no_grad in
the same module: no copy of the base exists. In full training the reference log-probs are computed once, before the
first step, while the model still is the reference, and stored beside the token store (trainer/preference/
reference_store.py); every batch then carries them and no reference model is kept. SimPO and ORPO need none.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Callable

import numpy as np
import torch

from trainer import adapters
from trainer.data.batches import Batch, TrainData, collate
from trainer.distributed import DistInfo, all_reduce_sums, barrier, broadcast_object
from trainer.engine.base import Engine, Forward
from trainer.errors import DataError
from trainer.model.loss import IGNORE, row_loss_sums
from trainer.preference.objective import PreferenceLoss, needs_reference, pair_loss
from trainer.preference.reference_store import (SPLITS, open_reference, reference_folder, reference_identity,
                                                write_reference)
from trainer.recipe.schema import Recipe

log = logging.getLogger(__name__)

ForwardFn = Callable[[Batch], Forward]


def reference_mode(recipe: Recipe) -> str | None:
    """Where this run's reference log-probs come from: adapters_disabled, stored, or None (sft, simpo, orpo)."""
    objective = recipe.objective
    if not needs_reference(objective):
        return None
    if objective.reference != "auto":
        return objective.reference
    return "stored" if recipe.adapter.type == "none" else "adapters_disabled"


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-prob of its loss tokens (float64), and how many there are."""
    return -row_loss_sums(logits, labels).double(), (labels[:, 1:] != IGNORE).sum(dim=1).double()


def preference_loss(recipe: Recipe, engine: Engine, forward: ForwardFn, b: Batch,
                    device: torch.device) -> tuple[PreferenceLoss, torch.Tensor | None]:
    """One preference micro-batch's summed loss and statistics, and the policy forward's load-balancing loss."""
    rows = b.preference
    assert rows is not None, "a preference objective needs preference batches"
    labels = b.labels.to(device)
    reference = None
    if needs_reference(recipe.objective):
        if rows.reference is not None:
            reference = rows.reference.to(device)
        elif reference_mode(recipe) == "adapters_disabled":
            with torch.no_grad(), adapters.adapters_disabled(engine.module):
                reference, _ = sequence_logps(forward(b).logits, labels)
        else:
            raise AssertionError("stored reference log-probs were not attached to the data")
    out = forward(b)
    logps, tokens = sequence_logps(out.logits, labels)
    desirable = rows.desirable.to(device) if rows.desirable is not None else None
    loss = pair_loss(recipe.objective, logps, tokens, reference, desirable)
    return PreferenceLoss(loss.loss_sum.float(), loss.stats), out.aux_loss


# ------------------------------------------------------------------------------------ stored reference log-probs

def attach_stored_reference(recipe: Recipe, data: TrainData, engine: Engine, forward: ForwardFn, dist: DistInfo,
                            step: int, progress: bool) -> None:
    """Give `data` the stored reference log-probs of every source, computing the missing ones first: only at step 0,
    when the model is still the reference. A resumed run whose log-probs are gone cannot recompute them."""
    identities = [reference_identity(recipe, store) for store in data.stores] if dist.is_main else None
    identities = broadcast_object(identities)
    assert identities is not None
    folders = [reference_folder(store, identity) for store, identity in zip(data.stores, identities)]
    missing = [i for i, (folder, store) in enumerate(zip(folders, data.stores))
               if open_reference(folder, store) is None] if dist.is_main else None
    missing = broadcast_object(missing)
    assert missing is not None
    if missing and step > 0:
        first = missing[0]
        raise DataError(f"the stored reference log-probs of {data.specs[first].source} ({folders[first]}) are "
                        f"missing, and this run resumes at step {step}: its model is no longer the reference. They "
                        "are computed before the first step: start the run again (train --force moves the "
                        "checkpoints aside), or restore the folder")
    for source in missing:
        logps = _compute(data, source, engine, forward, dist, progress)
        if dist.is_main:
            write_reference(folders[source], logps, identities[source])
            log.info("reference log-probs of %s computed and stored in %s", data.specs[source].source,
                     folders[source])
        barrier()
    opened = [open_reference(folder, store) for folder, store in zip(folders, data.stores)]
    if any(o is None for o in opened):
        raise DataError(f"the stored reference log-probs in {folders[0].parent} cannot be read on rank {dist.rank}: "
                        "data.cache_dir must be a folder every rank sees")
    data.reference = opened  # type: ignore[assignment]
    if not missing:
        log.info("reference log-probs read from %s", ", ".join(str(f) for f in folders))


@torch.no_grad()
def _compute(data: TrainData, source: int, engine: Engine, forward: ForwardFn, dist: DistInfo,
             progress: bool) -> dict[str, np.ndarray]:
    """Every document's summed log-prob under the current model, for each split. Micro-batches of 2 x
    micro_batch_size sequences go round the ranks; every rank runs as many forwards (ZeRO-3 gathers weights inside
    each), and one collective adds up the results."""
    from tqdm import tqdm

    rows, world = 2 * data.micro_batch_size, dist.world_size
    sets = {"train": data.train_sets[source], "eval": data.eval_sets[source]}
    counts = {split: sets[split].part.documents for split in SPLITS}
    chunks = {split: math.ceil(counts[split] / rows) for split in SPLITS}
    rounds = sum(math.ceil(chunks[split] / world) for split in SPLITS)
    bar = tqdm(total=rounds, desc="reference log-probs", unit="batch", disable=not (progress and dist.is_main),
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    engine.train(False)
    out = {}
    for split in SPLITS:
        values = np.zeros(counts[split], dtype=np.float64)
        for first in range(0, math.ceil(chunks[split] / world) * world, world):
            chunk = min(first + dist.rank, chunks[split] - 1) if chunks[split] else -1
            if chunk < 0:
                continue
            documents = range(chunk * rows, min((chunk + 1) * rows, counts[split]))
            batch = collate([(*sets[split].document(d), None) for d in documents], data.pad_id)
            logps, _ = sequence_logps(forward(batch).logits, batch.labels.to(dist.device))
            if first + dist.rank < chunks[split]:  # a rank past the end repeated the last chunk: not counted
                values[documents.start:documents.stop] = logps.cpu().numpy()
            bar.update(1)
        out[split] = np.asarray(all_reduce_sums(values.tolist(), dist.device), dtype=np.float64) \
            if counts[split] else values
    engine.train(True)
    bar.close()
    return out
