"""The token store: a source tokenized once into memory-mapped arrays on disk, reused until anything that changes
its tokens changes.

Layout of a store, `CACHE/<key>/` (key: a hash of the fingerprint): `manifest.json` (the fingerprint, counts and
the first dropped rows), and for each split, `train/` and `eval/`: `tokens.bin` (token ids in the smallest
unsigned type that holds the vocabulary: uint16 up to 65,536 ids, else uint32), `offsets.bin` (uint64, where each
document starts, one more than documents), and for chats `mask.bin` (uint8, 1 where the token carries the loss).

The held-out documents are every 1/eval_fraction-th usable document in source order (exactly that share, evenly
spread, with no per-document memory), so the split needs no seed and a store serves every seed.

Building: rows are read streaming, tokenized a chunk at a time (in `num_proc` worker processes, at most a few
chunks in flight, so memory stays bounded), and appended to the files of a temporary folder, which is renamed into
place only when complete: a crash mid-build never leaves a store that looks valid. Exactly one process builds a
store: the others wait on the filesystem (its lock file, then the rename), not inside a collective, so a long build
never trips a distributed timeout; a waiter takes over from a builder that died (trainer/run_lock.py's rules).
Opening a built store reads the manifest and maps the files: nothing grows with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from trainer.data.examples import Encoded, Encoder, token_dtype
from trainer.data.sources import Row, SourceSpec, fingerprint, rows, size_in_bytes, unit_of
from trainer.errors import DataError
from trainer.run_lock import FileLock

log = logging.getLogger(__name__)

STORE_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_ROWS = 512  # rows tokenized together, at most
CHUNK_CHARS = 1_000_000  # and at most about this many characters: a chunk's encodings cost ~40 bytes per token
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker process: bounds the memory of a parallel build
PARALLEL_FROM_BYTES = 32 * 2**20  # smaller sources are tokenized in this process (workers cost seconds to start)
WAIT_REPORT_S = 30.0
FIRST_DROPPED = 20  # dropped rows kept in the manifest, for the report


def default_cache_dir() -> Path:
    """data.cache_dir when null: $TRAINER_DATA_CACHE, else ~/.cache/trainer/data."""
    env = os.environ.get("TRAINER_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trainer" / "data"


def tokenizer_hash(tokenizer: Any) -> str:
    """What makes two tokenizers give the same ids: the whole Rust tokenizer (vocabulary, merges, normalizers,
    added tokens) and the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}, sort_keys=True)
    return hashlib.sha256((body + specials).encode()).hexdigest()


def held_out(index: int, fraction: float) -> bool:
    """Whether usable document `index` (0-based, source order) is in the eval split: every 1/fraction-th one."""
    return fraction > 0 and int((index + 1) * fraction) > int(index * fraction)


@dataclass(frozen=True)
class StoreRequest:
    """What a store holds: one source, tokenized by one tokenizer for one data setup."""

    spec: SourceSpec
    tokenizer: Any
    template: str | None  # the chat template (alpaca and chat)
    seq_len: int  # chats are cut to it (plain text is not: it is packed when read)
    eval_fraction: float

    def fingerprint(self) -> dict[str, Any]:
        chat = self.spec.format != "text"
        return {"version": STORE_VERSION, "source": fingerprint(self.spec), "tokenizer": tokenizer_hash(self.tokenizer),
                "template": self.template if chat else None, "seq_len": self.seq_len if chat else None,
                "eval_fraction": self.eval_fraction}

    def key(self) -> str:
        """The store's folder name: the source's name (readable) and a hash of the fingerprint."""
        digest = hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()
        name = "".join(c if c.isalnum() else "-" for c in Path(self.spec.source).name or "source")[:40]
        return f"{name}-{digest[:16]}"


# ---------------------------------------------------------------------------------------------- reading

class Part:
    """One split of a built store, memory-mapped."""

    def __init__(self, folder: Path, dtype: np.dtype) -> None:
        offsets = np.memmap(folder / "offsets.bin", dtype=np.uint64, mode="r")
        self.offsets = offsets
        self.documents = len(offsets) - 1
        self.tokens = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r") if int(offsets[-1]) else \
            np.zeros(0, dtype=dtype)
        mask = folder / "mask.bin"
        self.mask = (np.memmap(mask, dtype=np.uint8, mode="r") if int(offsets[-1]) else np.zeros(0, np.uint8)) \
            if mask.is_file() else None

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.tokens[start:end], None if self.mask is None else self.mask[start:end]


@dataclass
class TokenStore:
    path: Path
    manifest: dict[str, Any]
    train: Part
    eval: Part

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        dtype = np.dtype(manifest["dtype"])
        return cls(path, manifest, Part(path / "train", dtype), Part(path / "eval", dtype))

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------- writing

class _PartWriter:
    """Appends documents to one split's files."""

    def __init__(self, folder: Path, dtype: np.dtype, with_mask: bool) -> None:
        folder.mkdir(parents=True)
        self.dtype = dtype
        self.tokens = open(folder / "tokens.bin", "wb")
        self.offsets = open(folder / "offsets.bin", "wb")
        self.mask = open(folder / "mask.bin", "wb") if with_mask else None
        self.count = 0
        self.offsets.write(np.zeros(1, dtype=np.uint64).tobytes())

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        self.tokens.write(ids.astype(self.dtype, copy=False).tobytes())
        if self.mask is not None:
            self.mask.write(mask.astype(np.uint8).tobytes())  # type: ignore[union-attr]
        self.count += len(ids)
        self.offsets.write(np.array([self.count], dtype=np.uint64).tobytes())

    def close(self) -> None:
        for f in (self.tokens, self.offsets, self.mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()


def _characters(row: Row) -> int:
    """About how much text a row holds (its string values, one level deep)."""
    if isinstance(row.value, str):
        return len(row.value)
    if isinstance(row.value, dict):
        return sum(len(v) for v in row.value.values() if isinstance(v, str)) or 100
    return 100


def _chunks(stream: Iterator[Row]) -> Iterator[list[Row]]:
    """Rows in chunks of at most CHUNK_ROWS rows and about CHUNK_CHARS characters, so memory stays bounded however
    long the documents are."""
    chunk: list[Row] = []
    chars = 0
    for row in stream:
        chunk.append(row)
        chars += _characters(row)
        if len(chunk) == CHUNK_ROWS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


_worker_encoder: Encoder | None = None


def _start_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(chunk: list[Row]) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder(chunk)


def _encoded(encoder: Encoder, chunks: Iterator[list[Row]], num_proc: int) -> Iterator[Encoded]:
    """The chunks tokenized in order: here, or by num_proc worker processes with a bounded number in flight."""
    if num_proc <= 1:
        yield from map(encoder, chunks)
        return
    context = multiprocessing.get_context("spawn")  # never fork a process holding threads (torch, gloo)
    with context.Pool(num_proc, initializer=_start_worker, initargs=(encoder,)) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= num_proc * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _progress(total_bytes: int | None, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


def build(request: StoreRequest, folder: Path, num_proc: int, progress: bool,
          on_chunk: Callable[[int], None] = lambda done: None) -> dict[str, Any]:
    """Tokenize the source into `folder` (a fresh one); returns the manifest written there."""
    started = time.perf_counter()
    spec = request.spec
    dtype = token_dtype(len(request.tokenizer))
    chat = spec.format != "text"
    writers = {split: _PartWriter(folder / split, dtype, with_mask=chat) for split in ("train", "eval")}
    encoder = Encoder(request.tokenizer, spec.format, spec.text_field, request.seq_len, request.template)
    size = size_in_bytes(spec)
    workers = num_proc if size is None or size >= PARALLEL_FROM_BYTES else 1
    documents = rows_read = dropped = 0
    first_dropped: list[list[Any]] = []
    bar = _progress(size, progress)
    for done, encoded in enumerate(_encoded(encoder, _chunks(rows(spec)), workers), 1):
        masks = encoded.masks or [None] * len(encoded.ids)
        for ids, mask in zip(encoded.ids, masks):
            writers["eval" if held_out(documents, request.eval_fraction) else "train"].add(ids, mask)
            documents += 1
        rows_read += encoded.rows
        dropped += len(encoded.dropped)
        first_dropped += [list(d) for d in encoded.dropped[:FIRST_DROPPED - len(first_dropped)]]
        bar.update(encoded.chars)  # characters: about the bytes read, for plain text
        bar.set_postfix_str(f"{documents:,} documents, {writers['train'].count + writers['eval'].count:,} tokens",
                            refresh=False)
        on_chunk(done)
    bar.close()
    for writer in writers.values():
        writer.close()
    tokens = {split: w.count for split, w in writers.items()}
    manifest = {"fingerprint": request.fingerprint(), "dtype": dtype.name, "format": spec.format,
                "source": spec.source, "rows": rows_read, "documents": documents, "dropped": dropped,
                "first_dropped": first_dropped, "tokens": tokens,
                "train_documents": documents - sum(held_out(i, request.eval_fraction) for i in range(documents)),
                "seconds": round(time.perf_counter() - started, 2), "workers": workers}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def describe_dropped(manifest: dict[str, Any]) -> str:
    return "; ".join(f"{w} {unit_of(w)} {n}: {why}" for w, n, why in manifest["first_dropped"][:5])


def open_or_build(request: StoreRequest, cache_dir: Path, num_proc: int, *, job: str = "", progress: bool = True,
                  on_chunk: Callable[[int], None] = lambda done: None) -> tuple[TokenStore, bool]:
    """The store for this request, and whether this call built it. Built at most once, by whichever process takes
    its lock first; the others wait for the finished folder."""
    final = cache_dir / request.key()
    lock = FileLock(cache_dir / f".{final.name}.lock", job)
    last_report = time.monotonic()
    while not (final / MANIFEST).is_file():
        holder = lock.try_acquire()
        if holder is None:
            try:
                if not (final / MANIFEST).is_file():
                    _build_into(request, final, num_proc, progress, on_chunk)
                    return TokenStore.open(final), True
            finally:
                lock.release()
            break
        if time.monotonic() - last_report > WAIT_REPORT_S:
            log.info("waiting for the token store %s, being built by %s", final, holder.describe())
            last_report = time.monotonic()
        time.sleep(0.5)
    return TokenStore.open(final), False


def _build_into(request: StoreRequest, final: Path, num_proc: int, progress: bool,
                on_chunk: Callable[[int], None]) -> None:
    """Build in a temporary folder beside the store, then rename it into place."""
    tmp = final.with_name(f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for leftover in final.parent.glob(f".tmp-{final.name}-*"):  # an earlier builder that died (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists():  # a folder without a manifest is not a store: it was left by a crash
        shutil.rmtree(final)
    log.info("building the token store %s (%s, %s)", final, request.spec.source, request.spec.format)
    try:
        manifest = build(request, tmp, num_proc, progress, on_chunk)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("token store built in %.1f s: %s documents, %s tokens, %d dropped rows", manifest["seconds"],
             f"{manifest['documents']:,}", f"{sum(manifest['tokens'].values()):,}", manifest["dropped"])


def no_usable_rows(manifest: dict[str, Any], spec: SourceSpec) -> DataError:
    return DataError(f"data.source = {spec.source!r} (data.format = {spec.format}) has no usable rows: "
                     f"{manifest['dropped']} of {manifest['rows']} dropped (lines and rows counted from 1): "
                     f"{describe_dropped(manifest) or 'the source is empty'}; check data.format and the data's fields")
