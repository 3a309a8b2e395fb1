"""How a split's documents become training samples (data.packing):

- `concat` (plain text's default): the split's token stream cut into seq_len blocks; every token attends to the
  ones before it in the block, across documents. With data.document_mask, attention and positions restart at each
  document boundary inside a block instead (as Llama 3 was trained).
- `isolated` (chats' and Alpaca's default when packing): whole examples placed into blocks of at most seq_len
  tokens by best-fit-decreasing (nearly full blocks, deterministic from the seed), positions restarting at 0 for
  each example and attention confined to it: the same loss as the examples run one by one, without the padding.
- `none`: one example per sample, padded per micro-batch.
- `pairs` (data.format: preference): a sample is a pair, its chosen and rejected sequences (documents 2i and 2i+1);
  `single` (data.format: kto): a sample is one labelled completion. Neither is packed.

The isolated packing plan (plans.py) is computed while the store is built, for the builder's seed, and kept in it;
for another seed it is computed at start and kept in the run's output_dir: a store is never written by a run.

An isolated sample carries `position_ids`; transformers then confines attention to each run of increasing
positions (FlashAttention-2's variable-length path on a GPU, a block-diagonal causal mask for sdpa and eager). The
first token of every example is never a target, so nothing is predicted across a boundary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from trainer.data.plans import Plan, compute_plan, load_plan, plan_name, save_plan
from trainer.data.store import Part, damaged_while_reading
from trainer.model.loss import IGNORE

log = logging.getLogger(__name__)

Sample = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # (input ids, labels, position ids or None)


def sample_mode(format: str, packing: str, document_mask: bool) -> tuple[str, bool]:
    """(mode, document mask) of a source: auto is isolated for chats, concat for plain text; plain text is always
    packed, and `isolated` for it means concat with its documents kept apart."""
    if format == "text":
        return "concat", document_mask or packing == "isolated"
    if format == "preference":
        return "pairs", False
    if format == "kto":
        return "single", False
    return ("isolated" if packing == "auto" else packing), False


def packing_plan(part: Part, seq_len: int, seed: int, plan_dir: Path | None) -> Plan:
    """The isolated packing plan of a split for (seq_len, seed): the store's own (written when it was built), else
    one kept in `plan_dir` (the run's output_dir), else computed, and kept there when there is one. Nothing is ever
    written into the store: it may be read-only, or shared by runs with other seeds."""
    name = plan_name(seq_len, seed)
    own = part.folder / name
    if own.is_file():
        plan = load_plan(own, part.documents)
        if plan is None:
            raise damaged_while_reading(part.folder.parent, f"{part.folder.name}/{name} is not a valid packing plan")
        return plan
    kept = plan_dir / f"{part.folder.parent.name}-{part.folder.name}-{name}" if plan_dir is not None else None
    if kept is not None and kept.is_file():
        plan = load_plan(kept, part.documents)
        if plan is not None:
            return plan
        log.warning("the packing plan %s cannot be used (damaged or of other data); computing it again", kept)
    started = time.perf_counter()
    plan = compute_plan(part.lengths(), seq_len, seed)
    log.info("data: packing plan of %s/%s for seed %d computed in %.1f s (%s)", part.folder.parent.name,
             part.folder.name, seed, time.perf_counter() - started, f"kept in {kept}" if kept else "in memory")
    if kept is not None:
        save_plan(kept, plan)
    return plan


class Samples:
    """The samples of one split of one store, in one packing mode."""

    def __init__(self, part: Part, seq_len: int, mode: str, document_mask: bool, seed: int,
                 plan_dir: Path | None = None) -> None:
        self.part, self.seq_len, self.mode, self.document_mask = part, seq_len, mode, document_mask
        self.bin_offsets: np.ndarray
        self.items: np.ndarray
        if mode == "concat":
            self.count = part.num_tokens // seq_len
        elif mode == "isolated":
            self.bin_offsets, self.items = packing_plan(part, seq_len, seed, plan_dir) if part.documents else \
                (np.zeros(1, np.int64), np.zeros(0, np.int64))
            self.count = len(self.bin_offsets) - 1
        elif mode == "pairs":
            self.count = part.documents // 2
        else:
            self.count = part.documents

    def __len__(self) -> int:
        return self.count

    @property
    def fill(self) -> float:
        """The share of the samples' positions that hold tokens (the rest would be padding)."""
        if self.mode == "concat" or not self.count:
            return 1.0
        tokens = min(self.part.num_tokens, self.count * self.seq_len) if self.mode == "isolated" else \
            self.part.num_tokens
        sequences = 2 * self.count if self.mode == "pairs" else self.count
        return tokens / (sequences * self.seq_len)

    def get(self, index: int) -> Sample:
        """(input ids, labels, position ids) of sample `index`, int64; position ids only where attention is confined
        to pieces of the sample."""
        if self.mode == "concat":
            return self._block(index)
        if self.mode == "isolated":
            docs = self.items[self.bin_offsets[index]:self.bin_offsets[index + 1]].tolist()
            return _joined([self._document(d) for d in docs])
        ids, labels = self._document(index)
        return ids, labels, None

    def example(self, index: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """A preference sample: (document index, input ids, labels) of each of its sequences (a pair: the chosen,
        then the rejected; kto: the completion)."""
        documents = [2 * index, 2 * index + 1] if self.mode == "pairs" else [index]
        return [(d, *self.document(d)) for d in documents]

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Document `index` of the split as (input ids, labels), cut to seq_len."""
        return self._document(index)

    def _document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raw, mask = self.part.document(index)
        ids = np.asarray(raw[:self.seq_len], dtype=np.int64)
        labels = ids.copy() if mask is None else np.where(np.asarray(mask[:self.seq_len], dtype=bool), ids, IGNORE)
        return ids, labels

    def _block(self, index: int) -> Sample:
        start, end = index * self.seq_len, (index + 1) * self.seq_len
        raw, raw_mask = self.part.span(start, end)
        ids = np.asarray(raw, dtype=np.int64)
        mask = None if raw_mask is None else np.asarray(raw_mask, dtype=bool)
        labels = ids.copy() if mask is None else np.where(mask, ids, IGNORE)
        if not self.document_mask:
            return ids, labels, None
        offsets = np.asarray(self.part.offsets, dtype=np.int64)
        first, last = np.searchsorted(offsets, [start, end], side="right")
        cuts = [0, *(offsets[first:last] - start).tolist(), self.seq_len]
        pieces = [(ids[a:b], labels[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]
        return _joined(pieces)


def _joined(pieces: list[tuple[np.ndarray, np.ndarray]]) -> Sample:
    """Pieces side by side, each with positions from 0 and its first token no target."""
    ids = np.concatenate([p for p, _ in pieces])
    labels = np.concatenate([np.concatenate([[IGNORE], lab[1:]]) if len(lab) else lab for _, lab in pieces])
    positions = np.concatenate([np.arange(len(p), dtype=np.int64) for p, _ in pieces])
    return ids, labels.astype(np.int64), positions
