"""A run's data: token stores -> samples -> this rank's micro-batches, in an order that can be resumed.

Samples (packing.py): a seq_len block of the split's token stream (concat: plain text), whole examples packed into a
block with attention confined to each (isolated: chats), or one example (none). Labels are the input ids where a
token carries the loss, -100 elsewhere (prompts of chats, padding).

Order: epoch e visits the samples in a permutation that depends on (seed, e) only (order.py). One optimizer step
takes G = micro_batch_size * grad_accum_steps * world_size consecutive positions of it from `cursor`; micro-step k
of rank r takes micro_batch_size of them from `cursor + (k * world_size + r) * micro_batch_size`, so what a step
sees does not depend on how G is split over ranks, and the cursor means the same on any number of ranks. The tail
of fewer than G positions is skipped: the next epoch starts at 0.

Mixtures (data.sources): an epoch has as many positions as all sources have samples; each source gets a share of
them by weight (largest remainder), its samples drawn in its own seeded order (repeated if its share is larger
than it). Where the positions of each source fall is the epoch's permutation, so the sources are interleaved.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TypedDict

import numpy as np
import torch

from trainer.data.order import Permutation, seed_int
from trainer.data.packing import Sample, Samples, sample_mode
from trainer.data.sizes import Need, too_few_eval_samples, too_few_training_samples
from trainer.data.sources import SourceSpec, source_specs
from trainer.data.store import (StoreRequest, TokenStore, default_cache_dir, describe_dropped, describe_too_long,
                                no_usable_rows, open_or_build)
from trainer.errors import DataError
from trainer.model.loss import IGNORE
from trainer.recipe.schema import PREFERENCE_FORMATS, DataConfig
from trainer.model.tokenizer import resolve_chat_template

log = logging.getLogger(__name__)


@dataclass
class PreferenceRows:
    """What a preference micro-batch carries beside its sequences. Pairs: rows [0, n) are the chosen responses of n
    pairs and rows [n, 2n) their rejected ones, in the same order; kto: one row per completion."""

    pairs: bool
    sources: torch.Tensor  # (rows,) int64: the source of each row (data.sources' order)
    documents: torch.Tensor  # (rows,) int64: its document in that source's split (the key of its reference)
    desirable: torch.Tensor | None = None  # kto: (rows,) bool
    reference: torch.Tensor | None = None  # (rows,) float64: the stored reference log-probs, where the run has them

    @property
    def examples(self) -> int:
        rows = len(self.documents)
        return rows // 2 if self.pairs else rows


@dataclass
class Batch:
    """One micro-batch of CPU tensors; labels are aligned with input_ids (the loss shifts them)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None  # set when attention is confined to pieces of each row (packing)
    preference: PreferenceRows | None = None  # preference objectives

    def num_loss_tokens(self) -> int:
        """Positions that contribute to the shifted next-token loss (for exact loss averaging)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def num_loss_units(self) -> int:
        """What the objective averages over: loss tokens, or the examples of a preference batch (pairs or
        completions)."""
        return self.preference.examples if self.preference is not None else self.num_loss_tokens()

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_inputs(self, device: torch.device) -> ModelInputs:
        """The model's keyword arguments on `device`: packed rows pass their position ids and no attention mask, so
        that transformers confines attention to each run of increasing positions (padding is a run of its own)."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids.to(device), "attention_mask": None,
                    "position_ids": self.position_ids.to(device)}
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                "position_ids": None}


class ModelInputs(TypedDict):
    """The keyword arguments of one micro-batch's forward (Engine.forward)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None


@dataclass
class DataPosition:
    """Where the run is in the data order: checkpointed so a resumed run sees the same batches."""

    epoch: int = 0
    cursor: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataPosition:
        return cls(epoch=int(state["epoch"]), cursor=int(state["cursor"]))


@dataclass(frozen=True)
class OpenedStore:
    spec: SourceSpec
    store: TokenStore
    built: bool  # built by this call (else it was there already)


def open_stores(cfg: DataConfig, tokenizer: Any, *, seed: int | None = None, num_proc: int | None = None,
                job: str = "", progress: bool = False, on_chunk: Any = None, verify: bool = False
                ) -> list[OpenedStore]:
    """The token store of every source of the recipe, built first where missing, stale or damaged. `seed`: a store
    built here also holds the isolated packing plan of that seed. `verify`: check every file's digest (prepare)."""
    # the template actually used (the tokenizer's own when the recipe names none): part of the store's fingerprint
    template = resolve_chat_template(cfg.chat_template, tokenizer) or getattr(tokenizer, "chat_template", None)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    out = []
    for spec in source_specs(cfg):
        isolated = sample_mode(spec.format, cfg.packing, cfg.document_mask)[0] == "isolated"
        request = StoreRequest(spec, tokenizer, template, cfg.seq_len, cfg.eval_fraction, cfg.too_long,
                               plan_seed=seed if isolated else None)
        store, built = open_or_build(request, cache, num_proc or cfg.num_proc or os.cpu_count() or 1, job=job,
                                     progress=progress, on_chunk=on_chunk or (lambda done: None), verify=verify)
        out.append(OpenedStore(spec, store, built))
    return out


def sample_sets(opened: list[OpenedStore], cfg: DataConfig, seed: int, split: str,
                plan_dir: Path | None) -> list[Samples]:
    """The samples of one split of every store, in the recipe's packing mode (isolated plans computed where the
    store does not hold them, kept in plan_dir)."""
    out = []
    for o in opened:
        mode, masked = sample_mode(o.spec.format, cfg.packing, cfg.document_mask)
        out.append(Samples(getattr(o.store, split), cfg.seq_len, mode, masked, seed, plan_dir))
    return out


def data_identity(opened: list[OpenedStore], train_samples: int, tokens: int) -> dict[str, Any]:
    """What a checkpoint records of the data, to refuse resuming on other data (trainer/data/identity.py): the
    counts, and per source its name, its store (the fingerprint's key) and the store's content hash."""
    return {"train_samples": train_samples, "tokens": tokens,
            "sources": [{"source": o.spec.source, "store": o.store.path.name, "content": o.store.content}
                        for o in opened]}


def collate(samples: list[Sample], pad_id: int) -> Batch:
    """A micro-batch, padded to its longest sample (concat samples are all seq_len long). Samples that confine
    attention carry position ids; the padding after them is a piece of its own (positions from 0), which no real
    token attends to and which carries no loss."""
    length = max(len(ids) for ids, _, _ in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels, mask = torch.full_like(ids, IGNORE), torch.zeros_like(ids)
    isolated = any(p is not None for _, _, p in samples)
    positions = torch.zeros_like(ids) if isolated else None
    for row, (sample_ids, sample_labels, sample_positions) in enumerate(samples):
        n = len(sample_ids)
        ids[row, :n] = torch.from_numpy(sample_ids)
        labels[row, :n] = torch.from_numpy(sample_labels)
        mask[row, :n] = 1
        if positions is not None:
            own = torch.from_numpy(sample_positions) if sample_positions is not None else torch.arange(n)
            positions[row, :n] = own
            positions[row, n:] = torch.arange(length - n)
    return Batch(ids, mask, labels, positions)


Located = tuple[int, int]  # (source, sample index in that source's split)
Reference = list[dict[str, np.ndarray]]  # per source, per split: the reference log-prob of each document


def collate_preference(samples: list[Samples], located: list[Located], pad_id: int, split: str,
                       reference: Reference | None) -> Batch:
    """A preference micro-batch: the pairs' chosen sequences, then their rejected ones (or kto's completions), with
    each row's document (and its stored reference log-prob when the run keeps them)."""
    examples = [(source, samples[source].example(j)) for source, j in located]
    pairs = samples[located[0][0]].mode == "pairs" if located else True
    width = 2 if pairs else 1
    rows = [(source, *examples_of[k]) for k in range(width) for source, examples_of in examples]
    batch = collate([(ids, labels, None) for _, _, ids, labels in rows], pad_id)
    sources = torch.tensor([source for source, *_ in rows], dtype=torch.long)
    documents = torch.tensor([document for _, document, _, _ in rows], dtype=torch.long)
    desirable = None
    if not pairs:
        desirable = torch.tensor([bool(samples[source].part.labels[document])  # type: ignore[index]
                                  for source, document, _, _ in rows])
    stored = None
    if reference is not None:
        stored = torch.tensor([float(reference[source][split][document]) for source, document, _, _ in rows],
                              dtype=torch.float64)
    batch.preference = PreferenceRows(pairs, sources, documents, desirable, stored)
    return batch


def apportion(total: int, weights: list[float]) -> list[int]:
    """`total` positions split by weight, summing exactly to total (largest remainder)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    return counts


class TrainData:
    """The run's data for this rank: stores opened (built first when missing or stale), samples cut on demand.

    Every rank opens the same stores (the page cache is shared) and takes only its share of each step, so no
    communication is needed and every rank agrees on the order. `summary` holds the numbers logged."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, *, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, grad_accum_steps: int, num_proc: int | None = None, job: str = "",
                 progress: bool = False, on_chunk: Any = None, plan_dir: Path | None = None) -> None:
        assert 0 <= rank < world_size and micro_batch_size >= 1 and grad_accum_steps >= 1
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        opened = open_stores(cfg, tokenizer, seed=seed, num_proc=num_proc, job=job, progress=progress,
                             on_chunk=on_chunk)
        self.specs = [o.spec for o in opened]
        self.stores: list[TokenStore] = [o.store for o in opened]
        for o in opened:
            log.info("data: %s the token store %s (%s)", "built" if o.built else "opened", o.store.path, o.spec.source)
            self._report(o.store, o.spec)
        self.train_sets = sample_sets(opened, cfg, seed, "train", plan_dir)
        self.eval_sets = sample_sets(opened, cfg, seed, "eval", plan_dir)
        self.shares = apportion(sum(len(s) for s in self.train_sets), [spec.weight for spec in self.specs])
        self._bounds = np.cumsum([0, *self.shares])
        self.num_train_samples = int(self._bounds[-1])
        self.num_eval_samples = sum(len(s) for s in self.eval_sets)
        self.steps_per_epoch = self.num_train_samples // self.global_batch_size
        self.preference = any(spec.format in PREFERENCE_FORMATS for spec in self.specs)
        self.reference: Reference | None = None  # stored reference log-probs, attached by the run that uses them
        self.summary = self._summary()
        self.identity = data_identity(opened, self.num_train_samples, self.summary["tokens"])
        self._check_sizes()
        self._log()

    # ------------------------------------------------------------------------------------------ reporting

    def _report(self, store: TokenStore, spec: SourceSpec) -> None:
        """Bad rows are never dropped silently: warn with the first few, fail if nothing is left."""
        m = store.manifest
        if m["documents"] == 0:
            raise no_usable_rows(m, spec)
        if m["dropped"]:
            log.warning("data: dropped %d of %d rows of %s (format %s; lines and rows counted from 1): %s%s",
                        m["dropped"], m["rows"], spec.source, spec.format, describe_dropped(m),
                        "; ..." if m["dropped"] > 5 else "")
        long = m["too_long"]
        if long["rows"] and long["choice"] == "truncate":
            how = "their prompt cut first, alike in both sequences of a pair" if spec.format in PREFERENCE_FORMATS \
                else "keeping their end-of-turn marker"
            log.warning("data: %d examples of %s were longer than data.seq_len=%d and were truncated to it, %s "
                        "(data.too_long: truncate): %d tokens cut; %s%s", long["rows"], spec.source, self.cfg.seq_len,
                        how, long["tokens_cut"], describe_too_long(m), "; ..." if long["rows"] > 5 else "")

    @property
    def dropped(self) -> list[tuple[str, int, str]]:
        """The first dropped rows of every source: (file or dataset, line or row counted from 1, reason)."""
        return [tuple(d) for s in self.stores for d in s.manifest["first_dropped"]]

    def _summary(self) -> dict[str, Any]:
        ms = [s.manifest for s in self.stores]
        return {"documents": sum(m["rows"] for m in ms), "dropped": sum(m["dropped"] for m in ms),
                "too_long": sum(m["too_long"]["rows"] for m in ms),
                "tokens_cut": sum(m["too_long"]["tokens_cut"] for m in ms),
                "train_documents": sum(m["train_documents"] for m in ms),
                "eval_documents": sum(m["documents"] - m["train_documents"] for m in ms),
                "tokens": sum(sum(m["tokens"].values()) for m in ms), "train_samples": self.num_train_samples,
                "eval_samples": self.num_eval_samples, "steps_per_epoch": self.steps_per_epoch,
                "stores": [str(s.path) for s in self.stores]}

    def _log(self) -> None:
        s, c = self.summary, self.cfg
        modes = ", ".join(sorted({x.mode + (" with documents kept apart" if x.document_mask else "")
                                  for x in self.train_sets}))
        log.info("data: %d documents (%d dropped), %d tokens -> %d train / %d eval samples of <= %d tokens (%s; "
                 "%.1f%% of their positions hold tokens); one epoch = %d optimizer steps of %d samples",
                 s["documents"], s["dropped"], s["tokens"], self.num_train_samples, self.num_eval_samples, c.seq_len,
                 modes, 100 * self.train_fill, self.steps_per_epoch, self.global_batch_size)
        if len(self.specs) > 1:
            parts = [f"{spec.source}: {share} samples ({share / max(1, self.num_train_samples):.1%}), "
                     f"{store.train.num_tokens:,} tokens" for spec, share, store in zip(self.specs, self.shares,
                                                                                          self.stores)]
            log.info("data: mixture per epoch: %s", "; ".join(parts))

    @property
    def train_fill(self) -> float:
        """The share of the training samples' positions that hold tokens (eval samples are not trained on)."""
        return sum(x.fill * len(x) for x in self.train_sets) / max(1, sum(len(x) for x in self.train_sets))

    def _check_sizes(self) -> None:
        g, n, c = self.global_batch_size, self.num_train_samples, self.cfg
        need = Need(self.micro_batch_size, self.grad_accum_steps, self.world_size)
        if n < g:
            raise DataError(too_few_training_samples(n, c.seq_len, need))
        if c.eval_fraction > 0 and self.num_eval_samples < need.eval_round:
            shortfall = too_few_eval_samples(self.num_eval_samples, need)
            raise DataError(f"data.eval_fraction = {c.eval_fraction} {shortfall}")

    # ---------------------------------------------------------------------------------------------- order

    def locate(self, position: np.ndarray, epoch: int) -> list[Located]:
        """(source, sample index) of the samples at these positions of epoch `epoch`'s order."""
        slots = Permutation(self.num_train_samples, seed_int("order", self.seed, epoch))(position)
        out = []
        for slot in slots.tolist():
            source = int(np.searchsorted(self._bounds, slot, side="right") - 1)
            j = slot - int(self._bounds[source])
            samples = self.train_sets[source]
            if len(self.specs) > 1:  # the source's own order, a new one each time its share wraps around it
                turn, within = divmod(j, len(samples))
                order = Permutation(len(samples), seed_int("source", self.seed, epoch, source, turn))
                j = int(order([within])[0])
            out.append((source, j))
        return out

    def train_sample(self, position: np.ndarray, epoch: int) -> list[Sample]:
        """The samples at these positions of epoch `epoch`'s order."""
        return [self.train_sets[source].get(j) for source, j in self.locate(position, epoch)]

    def _train_batch(self, position: np.ndarray, epoch: int) -> Batch:
        if self.preference:
            return collate_preference(self.train_sets, self.locate(position, epoch), self.pad_id, "train",
                                      self.reference)
        return collate(self.train_sample(position, epoch), self.pad_id)

    def step_batches(self, pos: DataPosition) -> tuple[list[Batch], DataPosition]:
        """This rank's grad_accum_steps micro-batches for one optimizer step, and the position after it."""
        if pos.epoch < 0 or pos.cursor < 0:
            raise DataError(f"data position {pos} is invalid (negative); the checkpoint is damaged")
        epoch, cursor = pos.epoch, pos.cursor
        if cursor + self.global_batch_size > self.num_train_samples:
            epoch, cursor = epoch + 1, 0  # the tail shorter than a global batch is skipped
        mb, batches = self.micro_batch_size, []
        for k in range(self.grad_accum_steps):
            start = cursor + k * mb * self.world_size + self.rank * mb
            batches.append(self._train_batch(np.arange(start, start + mb), epoch))
        return batches, DataPosition(epoch, cursor + self.global_batch_size)

    def eval_samples(self) -> Iterator[Sample]:
        for source, i in self._eval_located():
            yield self.eval_sets[source].get(i)

    def _eval_located(self) -> Iterator[Located]:
        for source, samples in enumerate(self.eval_sets):
            for i in range(len(samples)):
                yield source, i

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        """The eval split in source order; every rank yields the same number of micro-batches (whole rounds of
        micro_batch_size * world_size), so collectives over them line up."""
        mb, per_round = self.micro_batch_size, self.micro_batch_size * self.world_size
        rounds = min(max_batches, self.num_eval_samples // per_round)
        wanted = {k * per_round + self.rank * mb + i for k in range(rounds) for i in range(mb)}
        chunk: list[Located] = []
        for index, located in enumerate(self._eval_located()):
            if index >= rounds * per_round:
                break
            if index in wanted:
                chunk.append(located)
                if len(chunk) == mb:
                    yield self._eval_batch(chunk)
                    chunk = []

    def _eval_batch(self, located: list[Located]) -> Batch:
        if self.preference:
            return collate_preference(self.eval_sets, located, self.pad_id, "eval", self.reference)
        return collate([self.eval_sets[source].get(i) for source, i in located], self.pad_id)
