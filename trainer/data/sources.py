"""Where rows come from, streamed: memory stays bounded whatever the size of the source.

A source is a local `.txt` (documents are paragraphs: a blank line ends one), `.json` (an array of rows, or JSON
lines), `.jsonl` or `.parquet` file, a directory of them (recursively, sorted by path, hidden files skipped), a
directory written by `datasets`' `save_to_disk`, a hub dataset (read with `datasets` streaming), or a built-in one:
`builtin:shakespeare` (the works of Shakespeare, shipped in the package: the same text on every machine, one document
per speech) or `builtin:python_stdlib` (this Python's standard library source, one document per file: it differs
between Python versions).

`rows(spec)` yields `Row`s in source order; a row that cannot even be read (a line that is not UTF-8 or not JSON)
comes with the reason instead of a value, located by file and line or row number, counted from 1. `fingerprint(spec)`
says what identifies the source's content, for the token store: paths with sizes and modification times, a hub
dataset's name, revision and split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from trainer.errors import DataError
from trainer.paths import looks_local
from trainer.recipe.schema import DataConfig

log = logging.getLogger(__name__)

STDLIB = "builtin:python_stdlib"
SHAKESPEARE = "builtin:shakespeare"
SHAKESPEARE_FILE = Path(__file__).resolve().parent / "corpora" / "shakespeare.txt.gz"  # package data
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                         "ensurepip", "__pycache__"})
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
PARQUET_BATCH = 1024


@dataclass(frozen=True)
class SourceSpec:
    """One source as the recipe names it (data.source, or one entry of data.sources)."""

    source: str
    format: str  # text | alpaca | chat
    text_field: str = "text"
    split: str = "train"
    revision: str | None = None
    max_documents: int | None = None
    max_bytes: int = 4_000_000  # the built-in sources only
    weight: float = 1.0  # share in a mixture of sources


def source_specs(cfg: DataConfig) -> list[SourceSpec]:
    """data.source, or every entry of data.sources with data's own keys where it leaves them unset."""
    if not cfg.sources:
        return [SourceSpec(cfg.source or "", cfg.format, cfg.text_field, cfg.split, cfg.revision, cfg.max_documents,
                           cfg.max_bytes)]
    return [SourceSpec(e.source, e.format or cfg.format, e.text_field or cfg.text_field, e.split or cfg.split,
                       cfg.revision, e.max_documents, cfg.max_bytes, e.weight) for e in cfg.sources]


@dataclass(frozen=True)
class Row:
    where: str  # the file (relative to a source directory) or dataset
    number: int  # line (text and JSON lines files) or row, counted from 1
    value: Any  # the row: a string for text files, else what the file holds (usually a dict); None when bad
    bad: str | None = None  # why the row could not be read


def unit_of(where: str) -> str:
    """How a row is located in messages: by line in text and JSON lines files, by row elsewhere."""
    return "line" if where.endswith((".jsonl", ".txt")) else "row"


# ------------------------------------------------------------------------------------------------- files

def _paragraph_rows(lines: BinaryIO, where: str, path: Path) -> Iterator[Row]:
    """Paragraphs of a text stream (a blank line ends one), each numbered by its first line. Bytes that are not UTF-8
    become U+FFFD, and the lines that held them are named in one warning at the end."""
    bad_lines: list[int] = []
    paragraph: list[str] = []
    start = 0
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            bad_lines.append(number)
        if line.strip():
            if not paragraph:
                start = number
            paragraph.append(line)
        elif paragraph:
            yield Row(where, start, "".join(paragraph).strip("\n"))
            paragraph = []
    if paragraph:
        yield Row(where, start, "".join(paragraph).strip("\n"))
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:10])) + (", ..." if len(bad_lines) > 10 else "")
        log.warning("data: %s: %d line(s) are not valid UTF-8 (lines %s; counted from 1); their bad bytes were "
                    "replaced with U+FFFD", path, len(bad_lines), shown)


def _txt_rows(path: Path, where: str) -> Iterator[Row]:
    with open(path, "rb") as f:
        yield from _paragraph_rows(f, where, path)


def _json_line(raw: bytes, where: str, number: int) -> Row:
    try:
        return Row(where, number, json.loads(raw.decode("utf-8")))
    except UnicodeDecodeError as e:
        return Row(where, number, None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    except json.JSONDecodeError as e:
        return Row(where, number, None, f"not valid JSON ({e.msg} at column {e.colno})")


def _jsonl_rows(path: Path, where: str) -> Iterator[Row]:
    """One JSON value per line, read line by line; a line that is not UTF-8 or not JSON is a bad row."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield _json_line(raw.rstrip(b"\r\n"), where, number)


def _json_rows(path: Path, where: str) -> Iterator[Row]:
    """A JSON array of rows (read whole: use JSON lines or parquet for large data), or JSON lines in a .json."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"data.source: {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it "
                        "as UTF-8") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            del raw
            yield from _jsonl_rows(path, where)
            return
        raise DataError(f"data.source: {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix "
                        "the file (a .json file holds one array of rows; use .jsonl for one row per line)") from None
    if not isinstance(data, list):
        raise DataError(f"data.source: {path} holds a JSON {type(data).__name__}, not an array of rows; give a list "
                        "of rows, or JSON lines (.jsonl)")
    for number, value in enumerate(data, 1):
        yield Row(where, number, value)


def _parquet_rows(path: Path, where: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
        for value in batch.to_pylist():
            number += 1
            yield Row(where, number, value)


READERS = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk."""
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def _saved_dataset_rows(path: Path, spec: SourceSpec) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged or foreign folder: say what datasets said
        raise DataError(f"data.source = {spec.source!r}: datasets could not read this save_to_disk folder "
                        f"({type(e).__name__}: {str(e)[:200]})") from e
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise DataError(f"data.split = {spec.split!r} is not a split of {spec.source} (splits: "
                            f"{', '.join(ds)}); set data.split")
        ds = ds[spec.split]
    number = 0
    for batch in ds.iter(batch_size=PARQUET_BATCH):
        keys = list(batch)
        for i in range(len(batch[keys[0]]) if keys else 0):
            number += 1
            yield Row(path.name, number, {k: batch[k][i] for k in keys})


def local_files(path: Path, source: str) -> list[Path]:
    """The data files of a source path, sorted (a file gives itself)."""
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"data.source = {source!r}: unsupported file type {path.suffix!r}; give .txt, .json, "
                            ".jsonl or .parquet (or a directory of them, or a hub dataset name)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"data.source = {source!r}: no .txt, .json, .jsonl or .parquet files in this directory; put "
                        "the data files there or point data.source at a file")
    return files


# --------------------------------------------------------------------------------------------- the others

def stdlib_files() -> list[Path]:
    """This Python's standard library .py files, sorted by path (tests and vendored packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP)
        paths += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def read_stdlib(max_bytes: int, max_documents: int | None = None) -> Iterator[str]:
    """The standard library's source, one document per file, whole files until max_bytes (the file crossing it is
    cut at a line end). Deterministic for a given Python."""
    budget, count = max_bytes, 0
    for path in stdlib_files():
        if budget <= 0 or count == max_documents:
            return
        raw = path.read_bytes()
        if len(raw) > budget:
            raw, budget = raw[:raw.rfind(b"\n", 0, budget) + 1], 0
        else:
            budget -= len(raw)
        if raw.strip():  # empty __init__.py files are not documents
            count += 1
            yield raw.decode("utf-8", errors="replace")


def read_shakespeare(max_bytes: int) -> Iterator[Row]:
    """The shipped works of Shakespeare, one document per speech (paragraph), whole ones while they fit in max_bytes.
    The same rows on every machine: the quickstart's figures reproduce anywhere."""
    budget = max_bytes
    with gzip.open(SHAKESPEARE_FILE, "rb") as f:
        for row in _paragraph_rows(f, "shakespeare.txt", SHAKESPEARE_FILE):  # type: ignore[arg-type]
            budget -= len(row.value.encode("utf-8")) + 2  # the blank line that ended it
            if budget < 0:
                return
            yield row


def shakespeare_bytes() -> int:
    """The uncompressed size of the shipped corpus (gzip's trailer holds it)."""
    with open(SHAKESPEARE_FILE, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def _hub_rows(spec: SourceSpec) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.source, split=spec.split, revision=spec.revision, streaming=True)
    except Exception as e:
        raise DataError(f"data.source = {spec.source!r} (split {spec.split!r}) could not be loaded from the hub "
                        f"({type(e).__name__}: {str(e)[:300]}); check the name and data.split, or give a local file "
                        "or directory") from e
    for number, value in enumerate(ds, 1):
        yield Row(spec.source, number, value)


# ---------------------------------------------------------------------------------------------- the API

def _text_field(row: Row, field: str) -> Row:
    """For format text: a JSON row's data.text_field (a row without it is reported when it is tokenized)."""
    if row.bad is not None or isinstance(row.value, str):
        return row
    value = row.value.get(field) if isinstance(row.value, dict) else None
    if isinstance(row.value, dict) and field not in row.value:
        return Row(row.where, row.number, None, f"no field {field!r} (fields: {', '.join(sorted(row.value))[:120]}; "
                                                "set data.text_field)")
    return Row(row.where, row.number, value)


def _all_rows(spec: SourceSpec) -> Iterator[Row]:
    if spec.source == STDLIB:
        for number, text in enumerate(read_stdlib(spec.max_bytes, spec.max_documents), 1):
            yield Row("python_stdlib", number, text)
        return
    if spec.source == SHAKESPEARE:
        yield from read_shakespeare(spec.max_bytes)
        return
    path = Path(spec.source).expanduser()
    if not path.exists():
        if not spec.source or looks_local(spec.source):
            raise DataError(f"data.source = {spec.source!r}: file or directory not found; check the path")
        yield from _hub_rows(spec)
        return
    if is_saved_dataset(path):
        yield from _saved_dataset_rows(path, spec)
        return
    for file in local_files(path, spec.source):
        if file.suffix == ".txt" and spec.format != "text":
            raise DataError(f"data.source: {file} is plain text but data.format = {spec.format!r}; use format: text, "
                            "or give JSON rows (.json, .jsonl, .parquet) for alpaca/chat")
        where = file.relative_to(path).as_posix() if path.is_dir() else file.name
        yield from READERS[file.suffix](file, where)


def rows(spec: SourceSpec) -> Iterator[Row]:
    """The source's rows in order, at most max_documents readable ones (bad rows among them are kept)."""
    taken = 0
    for row in _all_rows(spec):
        if spec.max_documents is not None and taken >= spec.max_documents:
            return
        if row.bad is None:
            taken += 1
        yield _text_field(row, spec.text_field) if spec.format == "text" else row


def size_in_bytes(spec: SourceSpec) -> int | None:
    """The bytes a local source will read (for the progress bar's ETA), or None when unknown."""
    if spec.source == STDLIB:
        return spec.max_bytes
    if spec.source == SHAKESPEARE:
        return min(spec.max_bytes, shakespeare_bytes())
    path = Path(spec.source).expanduser()
    if not path.exists() or is_saved_dataset(path):
        return None
    return sum(f.stat().st_size for f in local_files(path, spec.source))


def fingerprint(spec: SourceSpec) -> dict[str, Any]:
    """What identifies the source's content: any change here means its tokens must be computed again."""
    base = {"source": spec.source, "format": spec.format, "text_field": spec.text_field,
            "max_documents": spec.max_documents}
    if spec.source == STDLIB:
        return {**base, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"], "max_bytes": spec.max_bytes}
    if spec.source == SHAKESPEARE:
        return {**base, "sha256": hashlib.sha256(SHAKESPEARE_FILE.read_bytes()).hexdigest(),
                "max_bytes": spec.max_bytes}
    path = Path(spec.source).expanduser()
    if not path.exists():  # a hub dataset: its name, revision and split (a branch may move: pin a commit)
        return {**base, "hub": True, "split": spec.split, "revision": spec.revision}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {**base, "split": spec.split if is_saved_dataset(path) else None,
            "files": [[str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size,
                       f.stat().st_mtime_ns] for f in files]}
