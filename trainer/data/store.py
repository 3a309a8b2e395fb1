"""The token store: a source tokenized once into memory-mapped arrays on disk, reused until anything that changes
its tokens changes.

Layout of a store, `CACHE/<key>/` (key: a hash of the fingerprint): `manifest.json` (the fingerprint, counts, the
first dropped rows, every file with its size and SHA-256, and the content identity), and for each split, `train/`
and `eval/`: `tokens.bin` (token ids in the smallest unsigned type that holds the vocabulary: uint16 up to 65,536
ids, else uint32), `offsets.bin` (uint64, where each document starts, one more than documents), for chats
`mask.bin` (uint8, 1 where the token carries the loss), for KTO rows `labels.bin` (uint8 per document, 1:
desirable), and for isolated packing the plan of the builder's seed
(`bins-<seq_len>-<seed>.npz`, plans.py).

Integrity: opening a store checks every file's size against the manifest and the last offset against the token
count (O(1), always); reading checks each document's ids against the vocabulary, its offsets and its mask values (a
bound check per sample); `prepare` verifies every file's SHA-256. A store found damaged when opened is reported and
rebuilt (or, where its folder cannot be written, refused with the command that rebuilds it); one found damaged while
reading stops the run with that command. The content identity (`content`: a SHA-256 of the files' digests, hashed
as they are written, so it costs no extra pass) is what a checkpoint records to refuse resuming on other data.
A built store is never written again: a run that needs another seed's packing plan keeps it elsewhere.

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
from trainer.data.pairs import PreferenceEncoder
from trainer.data.plans import compute_plan, plan_name, save_plan
from trainer.data.sources import Row, SourceSpec, fingerprint, rows, size_in_bytes, unit_of
from trainer.errors import DataError
from trainer.recipe.schema import PREFERENCE_FORMATS
from trainer.run_lock import FileLock

log = logging.getLogger(__name__)

STORE_VERSION = 2  # 2: file digests and the content identity in the manifest; data.too_long
MANIFEST = "manifest.json"
CHUNK_ROWS = 512  # rows tokenized together, at most
CHUNK_CHARS = 1_000_000  # and at most about this many characters: a chunk's encodings cost ~40 bytes per token
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker process: bounds the memory of a parallel build
PARALLEL_FROM_BYTES = 32 * 2**20  # smaller sources are tokenized in this process (workers cost seconds to start)
WAIT_REPORT_S = 30.0
FIRST_DROPPED = 20  # dropped rows kept in the manifest, for the report
SPLITS = ("train", "eval")
DATA_FILES = ("tokens.bin", "offsets.bin", "mask.bin", "labels.bin")  # the content; a packing plan is derived from it
HASH_BLOCK = 1 << 22
MISSING = "missing"  # _problem(): no store there yet


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
    too_long: str = "drop"  # data.too_long: what happens to a chat longer than seq_len
    plan_seed: int | None = None  # write the isolated packing plan of this seed while building (not in the key)

    def fingerprint(self) -> dict[str, Any]:
        chat = self.spec.format != "text"
        return {"version": STORE_VERSION, "source": fingerprint(self.spec), "tokenizer": tokenizer_hash(self.tokenizer),
                "template": self.template if chat else None, "seq_len": self.seq_len if chat else None,
                "too_long": self.too_long if chat else None, "eval_fraction": self.eval_fraction}

    def key(self) -> str:
        """The store's folder name: the source's name (readable) and a hash of the fingerprint."""
        digest = hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()
        name = "".join(c if c.isalnum() else "-" for c in Path(self.spec.source).name or "source")[:40]
        return f"{name}-{digest[:16]}"


# ---------------------------------------------------------------------------------------------- reading

class Part:
    """One split of a built store, memory-mapped. Whatever it hands out was checked on the way (damage())."""

    def __init__(self, folder: Path, dtype: np.dtype, vocab_size: int) -> None:
        self.folder, self.vocab_size = folder, vocab_size
        offsets = np.memmap(folder / "offsets.bin", dtype=np.uint64, mode="r")
        self.offsets = offsets
        self.documents = len(offsets) - 1
        self.tokens = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r") if int(offsets[-1]) else \
            np.zeros(0, dtype=dtype)
        mask = folder / "mask.bin"
        self.mask = (np.memmap(mask, dtype=np.uint8, mode="r") if int(offsets[-1]) else np.zeros(0, np.uint8)) \
            if mask.is_file() else None
        labels = folder / "labels.bin"
        self.labels = (np.memmap(labels, dtype=np.uint8, mode="r") if self.documents else np.zeros(0, np.uint8)) \
            if labels.is_file() else None  # kto: 1 where the document's completion is desirable

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        """Every document's length in tokens (int64), checked (a pass over the offsets, once per plan)."""
        lengths = np.diff(np.asarray(self.offsets, dtype=np.int64))
        if len(lengths) and int(lengths.min()) < 0:
            at = int(np.argmin(lengths))
            raise self._damaged(f"offsets.bin decreases at document {at}")
        return lengths

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Document `index`'s ids and loss mask (None: every token carries the loss), checked."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        if not start <= end <= self.num_tokens:
            raise self._damaged(f"offsets.bin gives document {index} the tokens [{start}, {end}) of "
                                f"{self.num_tokens}")
        return self.span(start, end)

    def span(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The ids and mask of tokens [start, end) of the split, checked against the vocabulary: a flipped byte
        must stop the run with the store's name, never index past the embedding or train on another token."""
        ids = self.tokens[start:end]
        mask = None if self.mask is None else self.mask[start:end]
        if len(ids) and int(ids.max()) >= self.vocab_size:
            at = start + int(np.argmax(ids >= self.vocab_size))
            raise self._damaged(f"tokens.bin holds the id {int(self.tokens[at])} at token {at}, outside the "
                                f"vocabulary of {self.vocab_size} ids")
        if mask is not None and len(mask) and int(mask.max()) > 1:
            raise self._damaged(f"mask.bin holds a value other than 0 or 1 among tokens [{start}, {end})")
        return ids, mask

    def _damaged(self, what: str) -> DataError:
        return damaged_while_reading(self.folder.parent, f"{self.folder.name}/{what}")


@dataclass
class TokenStore:
    path: Path
    manifest: dict[str, Any]
    train: Part
    eval: Part

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        """Map a store that damage() found whole."""
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        dtype = np.dtype(manifest["dtype"])
        vocab = int(manifest["vocab_size"])
        return cls(path, manifest, Part(path / "train", dtype, vocab), Part(path / "eval", dtype, vocab))

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    @property
    def content(self) -> str:
        """The identity of what the store holds (a SHA-256 over its data files' digests)."""
        return str(self.manifest["content"])


def damaged_while_reading(path: Path, what: str) -> DataError:
    return DataError(f"the token store {path} is damaged: {what}. Rebuild it: `python -m trainer prepare RECIPE` "
                     "checks every file of the recipe's stores and rebuilds a damaged one (or delete the folder: the "
                     "next run builds it again)")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def damage(path: Path, full: bool = False) -> str | None:
    """Why the store in `path` (its manifest present) cannot be used, or None. Always: the manifest reads, every
    file it lists has its size, and each split's last offset is its token count (O(1)). `full`: every file's
    SHA-256 too (a pass over the store: what `prepare` does)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files, tokens = manifest["files"], manifest["tokens"]
        if manifest["fingerprint"]["version"] != STORE_VERSION:
            return f"{MANIFEST} is of store version {manifest['fingerprint']['version']}, not {STORE_VERSION}"
        for name, meta in files.items():
            size = (path / name).stat().st_size if (path / name).is_file() else None
            if size != meta["size"]:
                return f"{name} is {'missing' if size is None else f'{size:,} bytes'}; the manifest says " \
                       f"{meta['size']:,} bytes"
        for split in SPLITS:
            offsets = np.memmap(path / split / "offsets.bin", dtype=np.uint64, mode="r")
            if int(offsets[-1]) != int(tokens[split]) or int(offsets[0]) != 0:
                return f"{split}/offsets.bin ends at token {int(offsets[-1]):,}; the manifest says {tokens[split]:,}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{MANIFEST} or a file it lists cannot be read ({type(e).__name__}: {str(e)[:200]})"
    if full:
        for name, meta in files.items():
            if _file_sha256(path / name) != meta["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
    return None


# ---------------------------------------------------------------------------------------------- writing

class _PartWriter:
    """Appends documents to one split's files, hashing every byte as it is written (the store's content identity
    costs no pass of its own)."""

    def __init__(self, folder: Path, dtype: np.dtype, with_mask: bool, with_labels: bool = False) -> None:
        folder.mkdir(parents=True)
        self.folder, self.dtype = folder, dtype
        names = ("tokens.bin", "offsets.bin") + (("mask.bin",) if with_mask else ()) + \
            (("labels.bin",) if with_labels else ())
        self.files = {name: open(folder / name, "wb") for name in names}
        self.digests = {name: hashlib.sha256() for name in names}
        self.count = 0
        self.documents = 0
        self._write("offsets.bin", np.zeros(1, dtype=np.uint64).tobytes())

    def _write(self, name: str, data: bytes) -> None:
        self.files[name].write(data)
        self.digests[name].update(data)

    def add(self, ids: np.ndarray, mask: np.ndarray | None, label: bool | None = None) -> None:
        self._write("tokens.bin", ids.astype(self.dtype, copy=False).tobytes())
        if "mask.bin" in self.files:
            self._write("mask.bin", mask.astype(np.uint8).tobytes())  # type: ignore[union-attr]
        if "labels.bin" in self.files:
            self._write("labels.bin", np.array([bool(label)], dtype=np.uint8).tobytes())
        self.count += len(ids)
        self.documents += 1
        self._write("offsets.bin", np.array([self.count], dtype=np.uint64).tobytes())

    def close(self) -> dict[str, dict[str, Any]]:
        """Flush and close; returns {name relative to the store: {size, sha256}}."""
        out = {}
        for name, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            out[f"{self.folder.name}/{name}"] = {"size": f.tell(), "sha256": self.digests[name].hexdigest()}
            f.close()
        return out


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


RowEncoder = Callable[[list[Row]], Encoded]  # an Encoder, or a PreferenceEncoder around one
_worker_encoder: RowEncoder | None = None


def _start_worker(encoder: RowEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(chunk: list[Row]) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder(chunk)


def _encoded(encoder: RowEncoder, chunks: Iterator[list[Row]], num_proc: int) -> Iterator[Encoded]:
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
    writers = {split: _PartWriter(folder / split, dtype, with_mask=chat, with_labels=spec.format == "kto")
               for split in SPLITS}
    rows_to_tokens = Encoder(request.tokenizer, spec.format, spec.text_field, request.seq_len, request.template,
                             request.too_long)
    encoder: RowEncoder = PreferenceEncoder(rows_to_tokens) if spec.format in PREFERENCE_FORMATS else rows_to_tokens
    size = size_in_bytes(spec)
    workers = num_proc if size is None or size >= PARALLEL_FROM_BYTES else 1
    documents = rows_read = dropped = 0
    first_dropped: list[list[Any]] = []
    long_rows, tokens_cut = 0, 0
    first_long: list[list[Any]] = []
    bar = _progress(size, progress)
    for done, encoded in enumerate(_encoded(encoder, _chunks(rows(spec)), workers), 1):
        masks: list[np.ndarray | None] = list(encoded.masks) if encoded.masks else [None] * len(encoded.ids)
        for i, (ids, mask) in enumerate(zip(encoded.ids, masks)):
            unit = documents // encoded.group  # a pair's two examples go to the same split
            label = encoded.labels[i] if encoded.labels is not None else None
            writers["eval" if held_out(unit, request.eval_fraction) else "train"].add(ids, mask, label)
            documents += 1
        rows_read += encoded.rows
        dropped += len(encoded.dropped)
        first_dropped += [list(d) for d in encoded.dropped[:FIRST_DROPPED - len(first_dropped)]]
        long_rows += len(encoded.too_long)
        tokens_cut += encoded.tokens_cut
        first_long += [list(d) for d in encoded.too_long[:FIRST_DROPPED - len(first_long)]]
        bar.update(encoded.chars)  # characters: about the bytes read, for plain text
        bar.set_postfix_str(f"{documents:,} documents, {writers['train'].count + writers['eval'].count:,} tokens",
                            refresh=False)
        on_chunk(done)
    bar.close()
    files: dict[str, dict[str, Any]] = {}
    for writer in writers.values():
        files.update(writer.close())
    content = hashlib.sha256("".join(f"{name}:{meta['sha256']}\n" for name, meta in sorted(files.items()))
                             .encode()).hexdigest()
    if request.plan_seed is not None:
        files.update(_write_plans(folder, writers, request.seq_len, request.plan_seed))
    manifest = {"fingerprint": request.fingerprint(), "dtype": dtype.name, "vocab_size": len(request.tokenizer),
                "format": spec.format, "source": spec.source, "rows": rows_read, "documents": documents,
                "dropped": dropped, "first_dropped": first_dropped,
                "too_long": {"choice": request.too_long if chat else None, "rows": long_rows, "tokens_cut": tokens_cut,
                             "first": first_long},
                "tokens": {split: w.count for split, w in writers.items()},
                "train_documents": writers["train"].documents, "content": content, "files": files,
                "seconds": round(time.perf_counter() - started, 2), "workers": workers}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def _write_plans(folder: Path, writers: dict[str, _PartWriter], seq_len: int, seed: int) -> dict[str, Any]:
    """The isolated packing plan of each split for (seq_len, seed), written into the store being built: the run
    that uses the store then computes nothing and writes nothing into it."""
    files = {}
    for split, writer in writers.items():
        if not writer.documents:
            continue
        lengths = np.diff(np.fromfile(folder / split / "offsets.bin", dtype=np.uint64).astype(np.int64))
        path = folder / split / plan_name(seq_len, seed)
        save_plan(path, compute_plan(lengths, seq_len, seed))
        files[f"{split}/{path.name}"] = {"size": path.stat().st_size, "sha256": _file_sha256(path)}
    return files


def describe_dropped(manifest: dict[str, Any]) -> str:
    return "; ".join(f"{w} {unit_of(w)} {n}: {why}" for w, n, why in manifest["first_dropped"][:5])


def describe_too_long(manifest: dict[str, Any]) -> str:
    """The first rows longer than seq_len, for the report: 'a.jsonl line 3: 812 tokens; ...'."""
    return "; ".join(f"{w} {unit_of(w)} {n}: {tokens} tokens" for w, n, tokens in manifest["too_long"]["first"][:5])


def open_or_build(request: StoreRequest, cache_dir: Path, num_proc: int, *, job: str = "", progress: bool = True,
                  on_chunk: Callable[[int], None] = lambda done: None, verify: bool = False) -> tuple[TokenStore, bool]:
    """The store for this request, and whether this call built it. Built at most once, by whichever process takes
    its lock first; the others wait for the finished folder. A store that is there but damaged (damage(); `verify`
    checks every file's digest too) is reported and rebuilt, under the same lock. A whole store is only read: this
    works on a read-only filesystem."""
    final = cache_dir / request.key()
    lock = FileLock(cache_dir / f".{final.name}.lock", job)
    last_report = time.monotonic()
    while True:
        why = _problem(final, verify)
        if why is None:
            return TokenStore.open(final), False
        holder = _lock_to_rebuild(lock, final, why)
        if holder is None:
            try:
                why = _problem(final, verify)
                if why is None:  # another process finished it while we took the lock
                    return TokenStore.open(final), False
                if why != MISSING:
                    log.warning("the token store %s is damaged: %s; rebuilding it", final, why)
                    _remove_damaged(final, why)
                _build_into(request, final, num_proc, progress, on_chunk)
                return TokenStore.open(final), True
            finally:
                lock.release()
        if time.monotonic() - last_report > WAIT_REPORT_S:
            log.info("waiting for the token store %s, being built by %s", final, holder.describe())
            last_report = time.monotonic()
        time.sleep(0.5)


def _problem(final: Path, verify: bool) -> str | None:
    """None: a whole store is there; MISSING: none is (or only a folder a crash left, without a manifest); else
    what is damaged."""
    return damage(final, verify) if (final / MANIFEST).is_file() else MISSING


def _lock_to_rebuild(lock: FileLock, final: Path, why: str) -> Any:
    """lock.try_acquire(), where a folder that cannot be written (a read-only or shared store) makes a damaged
    store a DataError that says how to rebuild it."""
    try:
        return lock.try_acquire()
    except OSError as e:
        if why == MISSING:
            raise
        raise _cannot_rebuild(final, why, e) from None


def _remove_damaged(final: Path, why: str) -> None:
    """Rename the damaged store out of the way (other processes then wait for the rebuild), then delete it."""
    aside = final.with_name(f".damaged-{final.name}-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(final, aside)
    except OSError as e:
        raise _cannot_rebuild(final, why, e) from None
    shutil.rmtree(aside, ignore_errors=True)


def _cannot_rebuild(final: Path, why: str, error: OSError) -> DataError:
    return DataError(f"the token store {final} is damaged ({why}) and cannot be rebuilt from here "
                     f"({error.strerror or error}): run `python -m trainer prepare RECIPE` where {final.parent} can be "
                     "written (it rebuilds the damaged store), or set data.cache_dir to a folder this run can write")


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
    long = manifest["too_long"]["rows"]
    fix = (f"{long} of them are longer than data.seq_len: raise data.seq_len or set data.too_long: truncate"
           if long else "check data.format and the data's fields")
    return DataError(f"data.source = {spec.source!r} (data.format = {spec.format}) has no usable rows: "
                     f"{manifest['dropped']} of {manifest['rows']} dropped (lines and rows counted from 1): "
                     f"{describe_dropped(manifest) or 'the source is empty'}; {fix}")
