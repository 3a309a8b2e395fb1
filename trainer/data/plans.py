"""The packing plan of a split (data.packing: isolated): which examples go into which block of at most seq_len
tokens, by best-fit-decreasing, deterministic from the seed. A plan is a pair of int64 arrays (bin offsets into
`items`, items = document indices in bin order), computed once per (seq_len, seed).

Where plans are kept: the store's own plan, `<split>/bins-<seq_len>-<seed>.npz`, is written while the store is
built (for the seed of the recipe that builds it: `prepare` or the first run) and listed in its manifest; a store is
never written after it was built, so a plan for another seed lives in the run's output_dir (`packing-plans/`), or
only in memory. A plan read from a file is checked (every document exactly once) before it is used.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

Plan = tuple[np.ndarray, np.ndarray]  # (bin offsets into items, items: document indices in bin order)
RUN_PLAN_DIR = "packing-plans"  # in a run's output_dir: the plans its token stores do not hold


def plan_name(seq_len: int, seed: int) -> str:
    return f"bins-{seq_len}-{seed}.npz"


def compute_plan(lengths: np.ndarray, seq_len: int, seed: int) -> Plan:
    """The plan of documents of these lengths (a longer one counts as seq_len: it is cut when read)."""
    return best_fit_decreasing(np.minimum(np.asarray(lengths, dtype=np.int64), seq_len), seq_len, seed)


def save_plan(path: Path, plan: Plan) -> None:
    """Write atomically: several ranks may write the same plan at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}-{os.getpid()}.npz")
    np.savez(tmp, offsets=plan[0], items=plan[1])
    os.replace(tmp, path)


def load_plan(path: Path, documents: int) -> Plan | None:
    """The plan in `path`, or None when it cannot be read or does not place each of `documents` exactly once."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            offsets, items = np.asarray(saved["offsets"], dtype=np.int64), np.asarray(saved["items"], dtype=np.int64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    valid = (offsets.ndim == items.ndim == 1 and len(offsets) >= 1 and offsets[0] == 0
             and offsets[-1] == len(items) == documents and bool(np.all(np.diff(offsets) >= 0))
             and np.array_equal(np.sort(items), np.arange(documents)))
    return (offsets, items) if valid else None


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
