"""How a split's documents become training samples (data.packing):

- `concat` (plain text's default): the split's token stream cut into seq_len blocks; every token attends to the
  ones before it in the block, across documents. With data.document_mask, attention and positions restart at each
  document boundary inside a block instead (as Llama 3 was trained).
- `isolated` (chats' and Alpaca's default when packing): whole examples placed into blocks of at most seq_len
  tokens by best-fit-decreasing (nearly full blocks, deterministic from the seed), positions restarting at 0 for
  each example and attention confined to it: the same loss as the examples run one by one, without the padding.
- `none`: one example per sample, padded per micro-batch.

An isolated sample carries `position_ids`; transformers then confines attention to each run of increasing
positions (FlashAttention-2's variable-length path on a GPU, a block-diagonal causal mask for sdpa and eager). The
first token of every example is never a target, so nothing is predicted across a boundary.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from trainer.data.store import Part
from trainer.loss import IGNORE

log = logging.getLogger(__name__)

Sample = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # (input ids, labels, position ids or None)


def sample_mode(format: str, packing: str, document_mask: bool) -> tuple[str, bool]:
    """(mode, document mask) of a source: auto is isolated for chats, concat for plain text; plain text is always
    packed, and `isolated` for it means concat with its documents kept apart."""
    if format == "text":
        return "concat", document_mask or packing == "isolated"
    return ("isolated" if packing == "auto" else packing), False


def _tiebreak(count: int, seed: int) -> np.ndarray:
    """A seeded pseudo-random key per document, to order equal lengths reproducibly."""
    digest = hashlib.sha256(f"trainer.packing:{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(count)


def best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins of at most `capacity` tokens: documents longest first (ties in a seeded order), each into the bin it
    fills best. Returns (bin offsets into `items`, items = document indices in bin order). A segment tree over the
    remaining capacities finds the best bin in O(log capacity)."""
    size = 1 << max(1, capacity.bit_length())
    counts = np.zeros(2 * size, dtype=np.int64)  # counts[size + c]: bins with exactly c tokens of room
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    bins: list[list[int]] = []

    def change(room: int, delta: int) -> None:
        node = size + room
        while node:
            counts[node] += delta
            node //= 2

    def best(length: int) -> int | None:
        """The smallest room >= length that some bin has."""
        if counts[1] == 0:
            return None
        node, lo, hi = 1, 0, size - 1
        if _count_in(counts, size, length, capacity) == 0:
            return None
        while node < size:
            mid = (lo + hi) // 2
            left = 2 * node
            if length <= mid and _count_in(counts, size, max(length, lo), mid) > 0:
                node, hi = left, mid
            else:
                node, lo = left + 1, mid + 1
        return lo

    for index in np.lexsort((_tiebreak(len(lengths), seed), -lengths)).tolist():
        length = int(lengths[index])
        room = best(length)
        if room is None:
            bins.append([index])
            left = capacity - length
            target = len(bins) - 1
        else:
            target = by_room[room].pop()
            change(room, -1)
            bins[target].append(index)
            left = room - length
        if left > 0:
            by_room[left].append(target)
            change(left, 1)
    offsets = np.cumsum([0, *(len(b) for b in bins)]).astype(np.int64)
    items = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(offsets[-1]))
    return offsets, items


def _count_in(counts: np.ndarray, size: int, lo: int, hi: int) -> int:
    """Bins whose room is in [lo, hi] (segment tree range sum)."""
    total, lo, hi = 0, lo + size, hi + size + 1
    while lo < hi:
        if lo & 1:
            total += int(counts[lo])
            lo += 1
        if hi & 1:
            hi -= 1
            total += int(counts[hi])
        lo //= 2
        hi //= 2
    return total


def _cached_bins(part: Part, folder: Path, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The packing plan of a split, computed once per (seq_len, seed) and kept beside the store."""
    path = folder / f"bins-{capacity}-{seed}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return saved["offsets"], saved["items"]
    lengths = np.diff(np.asarray(part.offsets, dtype=np.int64))
    offsets, items = best_fit_decreasing(np.minimum(lengths, capacity), capacity, seed)
    tmp = path.with_name(f".{path.stem}-{os.getpid()}.npz")
    np.savez(tmp, offsets=offsets, items=items)
    os.replace(tmp, path)  # atomic: another rank may write the same plan at the same time
    return offsets, items


class Samples:
    """The samples of one split of one store, in one packing mode."""

    def __init__(self, part: Part, folder: Path, seq_len: int, mode: str, document_mask: bool, seed: int) -> None:
        self.part, self.seq_len, self.mode, self.document_mask = part, seq_len, mode, document_mask
        if mode == "concat":
            self.count = part.num_tokens // seq_len
        elif mode == "isolated":
            self.bin_offsets, self.items = _cached_bins(part, folder, seq_len, seed) if part.documents else \
                (np.zeros(1, np.int64), np.zeros(0, np.int64))
            self.count = len(self.bin_offsets) - 1
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
        return tokens / (self.count * self.seq_len)

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

    def _document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raw, mask = self.part.document(index)
        ids = np.asarray(raw[:self.seq_len], dtype=np.int64)
        labels = ids.copy() if mask is None else np.where(np.asarray(mask[:self.seq_len], dtype=bool), ids, IGNORE)
        return ids, labels

    def _block(self, index: int) -> Sample:
        start, end = index * self.seq_len, (index + 1) * self.seq_len
        ids = np.asarray(self.part.tokens[start:end], dtype=np.int64)
        mask = None if self.part.mask is None else np.asarray(self.part.mask[start:end], dtype=bool)
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
