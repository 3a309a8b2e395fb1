"""The order of an epoch, computed lazily: a keyed bijection on [0, n) (a Feistel network over the next even power of
two, cycle-walking back into range), so the position of any sample is known without a table. Memory does not grow
with n: half a billion samples cost what ten do. The same key gives the same order on every rank and every run."""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 4
_MIX1, _MIX2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def seed_int(*parts: object) -> int:
    """A 63-bit seed from labelled parts, so that (seed, epoch, ...) tuples never collide."""
    digest = hashlib.sha256(":".join(str(p) for p in ("trainer.data", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of [0, n) chosen by `key`."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation of {n} items")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(seed_int("round", key, r)) for r in range(ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, index: np.ndarray | list[int]) -> np.ndarray:
        """The images of these indices (each in [0, n)), as int64."""
        with np.errstate(over="ignore"):
            out = self._encrypt(np.asarray(index, dtype=np.uint64))
            outside = out >= np.uint64(self.n)
            while outside.any():  # cycle walking: the domain is at most 4n, so a few rounds at most
                out[outside] = self._encrypt(out[outside])
                outside = out >= np.uint64(self.n)
        return out.astype(np.int64)
