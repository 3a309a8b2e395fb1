"""Is there enough data for one global batch, and, with an eval split, for one eval micro-batch per rank?

`train` knows for sure once the token stores are built (batches.TrainData). `validate` answers before anything is
built: it reads the source's rows without tokenizing them and bounds the samples they can give from above (a
token is at least one byte, an example at most one sample when examples are kept whole), so a recipe it refuses
would certainly be refused by `train`. One it passes may still fall short (isolated packing can put several short
examples into one sample): `train` says so once the stores are built. Sources it cannot read cheaply (a hub dataset,
a `datasets` save_to_disk folder) are left to `train`, and validate says so.

The messages are shared: validate and train name the same fixes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

from trainer.data.packing import sample_mode
from trainer.data.sources import SourceSpec, is_saved_dataset, rows, source_specs
from trainer.data.store import held_out
from trainer.errors import Problem
from trainer.recipe.resolved import ResolvedRun
from trainer.recipe.schema import DataConfig

CHECK_EVERY_ROWS = 4096  # how often the scan asks whether the bound already suffices (then it stops reading)


@dataclass(frozen=True)
class Need:
    """What the launch takes from the data: one global batch to train, one micro-batch per rank to evaluate."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def eval_round(self) -> int:
        return self.micro_batch_size * self.world_size


@dataclass(frozen=True)
class AtMost:
    """Upper bounds on the samples of a source (or of all of them, summed)."""

    train: int
    eval: int

    def __add__(self, other: AtMost) -> AtMost:
        return AtMost(self.train + other.train, self.eval + other.eval)


def too_few_training_samples(samples: int, seq_len: int, need: Need, at_most: bool = False) -> str:
    return (f"the data gives {'at most ' if at_most else ''}{samples} training samples of data.seq_len={seq_len} "
            f"tokens, fewer than one global batch of {need.global_batch} (micro_batch_size {need.micro_batch_size} x "
            f"grad_accum_steps {need.grad_accum_steps} x world_size {need.world_size}); lower "
            "train.micro_batch_size or grad_accum_steps, lower data.seq_len, or use more data")


def too_few_eval_samples(samples: int, need: Need, at_most: bool = False) -> str:
    """What follows `data.eval_fraction = F` in the message."""
    return (f"holds out {'at most ' if at_most else ''}{samples} eval samples, fewer "
            f"than one micro-batch per rank ({need.eval_round}: micro_batch_size {need.micro_batch_size} x "
            f"{need.world_size} rank{'s' if need.world_size > 1 else ''}); raise data.eval_fraction or use more "
            "data, or turn evaluation off: data.eval_fraction=0 together with train.eval_every_steps=0")


def uncountable(spec: SourceSpec) -> bool:
    """A source whose rows cannot be read cheaply here: a hub dataset or a save_to_disk folder."""
    if spec.source.startswith("builtin:"):
        return False
    path = Path(spec.source).expanduser()
    return not path.exists() or is_saved_dataset(path)


def at_most(spec: SourceSpec, cfg: DataConfig, enough: AtMost) -> AtMost:
    """Bounds on the samples `spec` gives, from its rows (not tokenized); reading stops once both reach `enough`
    (the bounds only grow with more rows). The held-out documents are every 1/fraction-th usable one: at most as many
    as among all readable rows, and for plain text at most the largest of them."""
    mode, _ = sample_mode(spec.format, cfg.packing, cfg.document_mask)
    text = spec.format == "text"
    sizes: list[int] = []  # plain text: an upper bound on each document's tokens (its UTF-8 bytes, plus EOS)
    documents = held = 0
    bound = AtMost(0, 0)
    for row in rows(spec):
        if row.bad is not None or (text and not isinstance(row.value, str)):
            continue  # dropped when the store is built
        held += held_out(documents, cfg.eval_fraction)
        documents += 1
        if text:
            sizes.append(len(row.value.encode("utf-8")) + 1)
        if documents % CHECK_EVERY_ROWS == 0:
            bound = _bound(mode, documents, held, sizes, cfg.seq_len)
            if bound.train >= enough.train and bound.eval >= enough.eval:
                return bound
    return _bound(mode, documents, held, sizes, cfg.seq_len)


def _bound(mode: str, documents: int, held: int, sizes: list[int], seq_len: int) -> AtMost:
    if mode != "concat":  # isolated or none: an example is at most one sample
        return AtMost(documents - held, held)
    return AtMost(sum(sizes) // seq_len, sum(heapq.nlargest(held, sizes)) // seq_len)


def shortfalls(run: ResolvedRun) -> tuple[list[Problem], list[str]]:
    """Each certain shortfall of the run's data, and the sources that could not be counted (then nothing is said:
    the others' bounds prove nothing about the whole)."""
    cfg = run.recipe.data
    need = Need(run.micro_batch_size, run.grad_accum_steps, run.world_size)
    specs = source_specs(cfg)
    countable = [s for s in specs if not uncountable(s)]
    skipped = [s.source for s in specs if uncountable(s)]
    if skipped:
        return [], skipped
    enough = AtMost(need.global_batch, need.eval_round if cfg.eval_fraction > 0 else 0)
    total = AtMost(0, 0)
    for spec in countable:
        total = total + at_most(spec, cfg, enough)
    out = []
    if total.train < need.global_batch:
        key = "data.sources" if cfg.sources else "data.source"
        out.append(Problem(key, [e.source for e in cfg.sources] if cfg.sources else cfg.source,
                           too_few_training_samples(total.train, cfg.seq_len, need, at_most=True), run.sources(key)))
    if cfg.eval_fraction > 0 and total.eval < need.eval_round:
        out.append(Problem("data.eval_fraction", cfg.eval_fraction,
                           too_few_eval_samples(total.eval, need, at_most=True), run.sources("data.eval_fraction")))
    return out, []
