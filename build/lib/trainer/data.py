"""Datasets -> tokens -> packed blocks -> this rank's micro-batches, in an order that can be resumed.

Sources: a local .txt file (one text stream, split into documents at blank lines), a local .json/.jsonl
file (read with the `datasets` json builder), a directory of such files (recursively, sorted by path), a
hub dataset name (`load_dataset(name, split=data.split)`), or `builtin:python_stdlib`.

Formats: `text` documents get EOS appended and are packed into seq_len blocks (always packed, labels =
input_ids). `alpaca` and `chat` rows are rendered with a chat template and trained only on the assistant's
replies plus their end-of-turn marker; with `packing` they are packed like text, otherwise padded per batch.

Order: epoch e is a permutation of the train samples that depends on (seed, e) only. One optimizer step
takes G = micro_batch_size * grad_accum_steps * world_size consecutive samples of it from `cursor`; micro-step
k of rank r takes micro_batch_size of them from `cursor + (k*world_size + r)*micro_batch_size`, so what a step
sees does not depend on how G is split. A tail of fewer than G samples is skipped: the next epoch starts at 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from trainer.errors import DataError
from trainer.loss import IGNORE
from trainer.paths import looks_local
from trainer.schema import DataConfig
from trainer.tokenizer import ChatRenderer, resolve_chat_template

log = logging.getLogger(__name__)

STDLIB = "builtin:python_stdlib"
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                         "turtledemo", "ensurepip", "__pycache__"})
FILE_SUFFIXES = (".txt", ".json", ".jsonl")
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "model": "assistant", "function_call": "assistant", "observation": "tool", "tool": "tool",
         "function": "tool", "ipython": "tool"}


@dataclass
class Batch:
    """One micro-batch of CPU tensors; labels are aligned with input_ids (the loop shifts them)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def num_loss_tokens(self) -> int:
        """Positions that contribute to the shifted next-token loss (for exact loss averaging)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


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


class _BadRow(ValueError):
    """A row that cannot become a training example; the message is the reason shown to the user."""


@dataclass
class _Rows:
    """Rows of one file or dataset: `name` is how warnings refer to it, `numbers` the 1-based line (JSON lines) or
    row number of each row, `bad` the (number, reason) of rows that could not even be read."""

    name: str
    rows: list[Any]
    numbers: list[int]
    bad: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def of(cls, name: str, rows: list[Any]) -> _Rows:
        return cls(name, rows, list(range(1, len(rows) + 1)))

    def head(self, limit: int | None) -> _Rows:
        """The first `limit` rows (data.max_documents), with the bad rows among them."""
        if limit is None or limit >= len(self.rows):
            return self
        last = self.numbers[limit - 1] if limit else 0
        return _Rows(self.name, self.rows[:limit], self.numbers[:limit], [b for b in self.bad if b[0] <= last])


# ----------------------------------------------------------------------------------------------- reading

def _seed_int(*parts: object) -> int:
    """A 63-bit seed from labelled parts, so that (seed, epoch) pairs never collide."""
    digest = hashlib.sha256(":".join(str(p) for p in ("trainer.data", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _read_txt(path: Path) -> list[str]:
    """Paragraphs: a blank line (whitespace allowed) ends a document, so a book becomes scenes or
    paragraphs rather than one huge document. Bytes that are not UTF-8 become U+FFFD, with a warning naming
    the lines (a text corpus with a few bad bytes is still worth training on)."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and raw.count("\ufffd".encode()) < text.count("\ufffd"):
        lines = [n for n, line in enumerate(raw.split(b"\n"), 1) if not _is_utf8(line)]
        shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
        log.warning("data: %s: %d line(s) are not valid UTF-8 (lines %s; counted from 1); their bad bytes were "
                    "replaced with U+FFFD", path, len(lines), shown)
    return [doc.strip("\n") for doc in re.split(r"\n(?:[ \t\r]*\n)+", text) if doc.strip()]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _json_lines(path: Path, raw: bytes) -> _Rows:
    """One JSON value per line: a line that is not UTF-8 or not JSON is a bad row (1-based line number)."""
    rows, numbers, bad = [], [], []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
            numbers.append(number)
        except UnicodeDecodeError as e:
            bad.append((number, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"))
        except json.JSONDecodeError as e:
            bad.append((number, f"not valid JSON ({e.msg} at column {e.colno})"))
    return _Rows(path.name, rows, numbers, bad)


def _read_json(path: Path) -> _Rows:
    """A .jsonl file, or a .json file holding a JSON array of rows (or, as many datasets ship it, JSON lines)."""
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        return _json_lines(path, raw)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"data.source: {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save "
                        "it as UTF-8") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return _json_lines(path, raw)
        raise DataError(f"data.source: {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix "
                        "the file (a .json file holds one array of rows; use .jsonl for one row per line)") from None
    if not isinstance(data, list):
        raise DataError(f"data.source: {path} holds a JSON {type(data).__name__}, not an array of rows; give a list "
                        "of rows, or JSON lines (.jsonl)")
    return _Rows.of(path.name, data)


def _text_values(part: _Rows, cfg: DataConfig) -> _Rows:
    """For format text: the data.text_field of each JSON row (a row without it is a bad row)."""
    if cfg.format != "text":
        return part
    field_name = cfg.text_field
    if part.rows and not any(isinstance(r, dict) and field_name in r for r in part.rows):
        fields = sorted({k for r in part.rows[:100] if isinstance(r, dict) for k in r})
        raise DataError(f"data.text_field = {field_name!r} is not a field of {part.name} (fields: "
                        f"{', '.join(fields) or 'none: the rows are not objects'}); set data.text_field to the one "
                        "holding the text")
    values = [r.get(field_name) if isinstance(r, dict) else None for r in part.rows]
    return _Rows(part.name, values, part.numbers, part.bad)


def _read_hub(cfg: DataConfig) -> _Rows:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split, keep_in_memory=True)
    except Exception as e:
        raise DataError(f"data.source = {cfg.source!r} (split {cfg.split!r}) could not be loaded from the hub "
                        f"({type(e).__name__}: {str(e)[:300]}); check the name and data.split, or give a "
                        "local file or directory") from e
    if cfg.max_documents is not None:
        ds = ds.select(range(min(len(ds), cfg.max_documents)))
    return _Rows.of(str(cfg.source), ds.to_list())


def read_stdlib(max_bytes: int, max_documents: int | None = None) -> list[str]:
    """The .py files of this Python's standard library, sorted by path, one document per file, whole files
    until max_bytes (the file crossing it is cut at a line end). Deterministic for a given Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP)
        paths += [Path(folder, f) for f in files if f.endswith(".py")]
    docs: list[str] = []
    budget = max_bytes
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        if budget <= 0 or len(docs) == max_documents:
            break
        raw = path.read_bytes()
        if len(raw) > budget:
            raw, budget = raw[:raw.rfind(b"\n", 0, budget) + 1], 0
        else:
            budget -= len(raw)
        if raw.strip():  # empty __init__.py files are not documents
            docs.append(raw.decode("utf-8", errors="replace"))
    return docs


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"data.source = {str(path)!r}: no .txt, .json or .jsonl files in this directory; "
                        "put the data files there or point data.source at a file")
    return files


def read_source(cfg: DataConfig) -> list[_Rows]:
    """All rows, capped at data.max_documents; a .txt file gives strings, JSON gives dicts or values."""
    source = cfg.source or ""
    if source == STDLIB:
        return [_Rows.of("python_stdlib", read_stdlib(cfg.max_bytes, cfg.max_documents))]
    path = Path(source).expanduser()
    if not path.exists():
        if not source or looks_local(source):
            raise DataError(f"data.source = {source!r}: file or directory not found; check the path")
        return [_text_values(_read_hub(cfg), cfg)]
    out, left = [], cfg.max_documents
    for file in _local_files(path):
        if file.suffix == ".txt" and cfg.format != "text":
            raise DataError(f"data.source: {file} is plain text but data.format = {cfg.format!r}; use "
                            "format: text, or give .json/.jsonl rows for alpaca/chat")
        if file.suffix not in FILE_SUFFIXES:
            raise DataError(f"data.source = {source!r}: unsupported file type {file.suffix!r}; give .txt, "
                            ".json or .jsonl (or a hub dataset name)")
        part = _Rows.of(file.name, _read_txt(file)) if file.suffix == ".txt" else _text_values(_read_json(file), cfg)
        part.name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        out.append(part.head(left))
        if left is not None:
            left -= len(out[-1].rows)
            if left <= 0:
                break
    return out


# ---------------------------------------------------------------------------------------------- examples

def _unit(name: str) -> str:
    """How a bad row is located: by line in JSON lines, by row elsewhere."""
    return "line" if name.endswith(".jsonl") else "row"


def _text(value: Any, name: str) -> str:
    if value is None:
        raise _BadRow(f"missing or null {name!r}")
    if not isinstance(value, str):
        raise _BadRow(f"{name!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise _BadRow(f"{name!r} is empty")
    return value


def _alpaca_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A user turn (instruction, then the input after a blank line) and the assistant's output."""
    instruction = _text(row.get("instruction"), "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _BadRow(f"'input' is a {type(extra).__name__}, not a string")
    output = _text(row.get("output"), "output")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    system = row.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _chat_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI-style `messages` or ShareGPT `conversations`, with roles mapped by ROLES (a function call is
    the assistant speaking, an observation is a tool message)."""
    if isinstance(row.get("messages"), list):
        turns, role_key, text_key = row["messages"], "role", "content"
    elif isinstance(row.get("conversations"), list):
        turns, role_key, text_key = row["conversations"], "from", "value"
    else:
        raise _BadRow("no 'messages' or 'conversations' list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRow(f"turn {i} is a {type(turn).__name__}, not an object")
        role = ROLES.get(turn.get(role_key))  # type: ignore[arg-type]
        if role is None:
            raise _BadRow(f"turn {i}: unknown {role_key} {turn.get(role_key)!r} (known: {', '.join(ROLES)})")
        if not isinstance(turn.get(text_key), str):
            raise _BadRow(f"turn {i}: {text_key!r} is not a string")
        out.append({"role": role, "content": turn[text_key]})
    while out and out[-1]["role"] != "assistant":
        out.pop()  # trailing prompts have no reply to learn
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise _BadRow("no assistant turn with text")
    return out


def _tools(row: dict[str, Any]) -> list[Any] | None:
    """Function specs shown to the template (ShareGPT tool datasets store them as a JSON string)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise _BadRow(f"'tools' is not valid JSON ({e.msg})") from e
    if not tools:
        return None
    if not isinstance(tools, list):
        raise _BadRow("'tools' must be a list of function specs")
    return tools


def _encode(tokenizer: Any, texts: list[str], *, chat: bool) -> list[Any]:
    """Batch-encode in Rust. Text: a "</s>" inside a document is text, not a document boundary, and no
    offsets are computed (faster). Chat: the template's markers must match their special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"model.tokenizer: {type(tokenizer).__name__} is not a fast (Rust) tokenizer; use one "
                        "with a tokenizer.json, or model.tokenizer: byte")
    encode = backend.encode_batch if chat else getattr(backend, "encode_batch_fast", backend.encode_batch)
    saved = backend.encode_special_tokens
    backend.encode_special_tokens = not chat
    try:
        out = []
        for start in range(0, len(texts), 4096):
            out += encode(texts[start:start + 4096], add_special_tokens=False)
        return out
    finally:
        backend.encode_special_tokens = saved


def _label_mask(ids: np.ndarray, offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels: a token is learned when its characters overlap a reply span."""
    keep = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        keep |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return np.where(keep, ids, IGNORE)


Example = tuple[np.ndarray, "np.ndarray | None"]  # (input_ids, labels); labels None means "= input_ids"


def _text_examples(parts: list[_Rows], cfg: DataConfig, tok: Any, dropped: list[tuple[str, int, str]]
                   ) -> list[Example]:
    """One example per document: its tokens then EOS, so the model learns where documents end."""
    texts = []
    for part in parts:
        dropped += [(part.name, number, why) for number, why in part.bad]
        for number, value in zip(part.numbers, part.rows):
            try:
                texts.append(_text(value, cfg.text_field))
            except _BadRow as e:
                dropped.append((part.name, number, str(e)))
    _in_file_order(dropped, parts)
    eos = np.array([tok.eos_token_id], dtype=np.int64)
    return [(np.concatenate([np.asarray(enc.ids, dtype=np.int64), eos]), None)
            for enc in _encode(tok, texts, chat=False)]


def _sft_examples(parts: list[_Rows], cfg: DataConfig, tok: Any, dropped: list[tuple[str, int, str]]) -> list[Example]:
    """Rendered conversations, truncated to seq_len, labels only on the assistant's replies."""
    renderer = ChatRenderer(tok, resolve_chat_template(cfg.chat_template, tok))
    to_messages = _alpaca_messages if cfg.format == "alpaca" else _chat_messages
    texts, spans, where = [], [], []
    for part in parts:
        dropped += [(part.name, number, why) for number, why in part.bad]
        for number, row in zip(part.numbers, part.rows):
            try:
                if not isinstance(row, dict):
                    raise _BadRow(f"a {type(row).__name__}, not an object")
                text, found = renderer.spans(to_messages(row), _tools(row))
            except ValueError as e:  # _BadRow, or the renderer's reason
                dropped.append((part.name, number, str(e)))
                continue
            texts.append(text)
            spans.append(found)
            where.append((part.name, number))
    out: list[Example] = []
    for (name, i), enc, found in zip(where, _encode(tok, texts, chat=True), spans):
        ids = np.asarray(enc.ids, dtype=np.int64)
        labels = _label_mask(ids, np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), found)
        ids, labels = ids[:cfg.seq_len], labels[:cfg.seq_len]
        if not (labels[1:] != IGNORE).any():
            dropped.append((name, i, f"no reply within the first data.seq_len={cfg.seq_len} tokens"))
            continue
        out.append((ids, labels))
    _in_file_order(dropped, parts)
    return out


def _in_file_order(dropped: list[tuple[str, int, str]], parts: list[_Rows]) -> None:
    """Sort the dropped rows by file, then line: whichever stage dropped them."""
    rank = {part.name: k for k, part in enumerate(parts)}
    dropped.sort(key=lambda d: (rank[d[0]], d[1]))


@dataclass
class _Samples:
    """Packed blocks ([n, seq_len] int32 tensors) or one array per example (padded per micro-batch)."""

    ids: torch.Tensor | list[np.ndarray]
    labels: torch.Tensor | list[np.ndarray] | None  # None: the labels are the input_ids

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: list[int], pad_id: int) -> Batch:
        if isinstance(self.ids, torch.Tensor):
            ids = self.ids[index].long()
            labels = ids.clone() if self.labels is None else self.labels[index].long()  # type: ignore[index]
            return Batch(ids, torch.ones_like(ids), labels)
        assert isinstance(self.labels, list)
        ids = torch.full((len(index), max(len(self.ids[i]) for i in index)), pad_id, dtype=torch.long)
        labels, mask = torch.full_like(ids, IGNORE), torch.zeros_like(ids)
        for row, i in enumerate(index):
            n = len(self.ids[i])
            ids[row, :n] = torch.from_numpy(self.ids[i])
            labels[row, :n] = torch.from_numpy(self.labels[i])
            mask[row, :n] = 1
        return Batch(ids, mask, labels)


def _assemble(examples: list[Example], seq_len: int, pack: bool) -> _Samples:
    """Packing: concatenate, cut into seq_len blocks, drop the short tail."""
    if not pack:
        return _Samples([ids for ids, _ in examples], [labels for _, labels in examples])  # type: ignore[misc]
    if not examples:
        return _Samples(torch.zeros((0, seq_len), dtype=torch.int32), None)

    def blocks(stream: np.ndarray) -> torch.Tensor:
        n = len(stream) // seq_len
        return torch.from_numpy(stream[:n * seq_len].astype(np.int32).reshape(n, seq_len))

    ids = blocks(np.concatenate([ids for ids, _ in examples]))
    if examples[0][1] is None:
        return _Samples(ids, None)
    return _Samples(ids, blocks(np.concatenate([labels for _, labels in examples])))  # type: ignore[misc]


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) document indices, each in source order; the held-out set depends on seed only."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    held = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_int("eval", seed)))
    held_set = set(held[:min(n - 1, max(1, round(n * fraction)))].tolist())
    return [i for i in range(n) if i not in held_set], sorted(held_set)


class TrainData:
    """The run's data: read, tokenized and packed once at start-up; batches are cut on demand.

    Every rank builds the same samples (cheap next to training) and takes only its share, so no
    communication is needed and every rank agrees on the order. `summary` holds the numbers logged.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, *, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, grad_accum_steps: int) -> None:
        assert 0 <= rank < world_size and micro_batch_size >= 1 and grad_accum_steps >= 1
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.dropped: list[tuple[str, int, str]] = []  # (file or dataset, line or row counted from 1, reason)
        parts = read_source(cfg)
        num_rows = sum(len(part.rows) + len(part.bad) for part in parts)
        build = _text_examples if cfg.format == "text" else _sft_examples
        examples = build(parts, cfg, tokenizer, self.dropped)
        self._report_dropped(num_rows, len(examples))
        train_docs, eval_docs = split_eval(len(examples), cfg.eval_fraction, seed)
        pack = cfg.format == "text" or cfg.packing
        self._train = _assemble([examples[i] for i in train_docs], cfg.seq_len, pack)
        self._eval = _assemble([examples[i] for i in eval_docs], cfg.seq_len, pack)
        self.num_train_samples, self.num_eval_samples = len(self._train), len(self._eval)
        self.steps_per_epoch = self.num_train_samples // self.global_batch_size
        self._order_cache: tuple[int, torch.Tensor] | None = None
        self.summary = {"documents": num_rows, "dropped": len(self.dropped), "train_documents": len(train_docs),
                        "eval_documents": len(eval_docs), "tokens": int(sum(len(ids) for ids, _ in examples)),
                        "train_samples": self.num_train_samples, "eval_samples": self.num_eval_samples,
                        "steps_per_epoch": self.steps_per_epoch}
        self._check_sizes()
        log.info("data: %d documents from %s (%d dropped), %d tokens -> %d train / %d eval samples of <= %d "
                 "tokens (%s); one epoch = %d optimizer steps of %d samples", num_rows, cfg.source,
                 len(self.dropped), self.summary["tokens"], self.num_train_samples, self.num_eval_samples,
                 cfg.seq_len, "packed" if pack else "padded", self.steps_per_epoch, self.global_batch_size)

    def _report_dropped(self, num_rows: int, kept: int) -> None:
        """Bad rows are never dropped silently: warn with the first few, fail if nothing is left."""
        first = "; ".join(f"{name} {_unit(name)} {i}: {why}" for name, i, why in self.dropped[:5])
        if kept == 0:
            raise DataError(f"data.source = {self.cfg.source!r} (data.format = {self.cfg.format}) has no usable "
                            f"rows: {len(self.dropped)} of {num_rows} dropped (lines and rows counted from 1): "
                            f"{first or 'the source is empty'}; check data.format and the data's fields")
        if self.dropped:
            log.warning("data: dropped %d of %d rows of %s (format %s; lines and rows counted from 1): %s%s",
                        len(self.dropped), num_rows, self.cfg.source, self.cfg.format, first,
                        "; ..." if len(self.dropped) > 5 else "")

    def _check_sizes(self) -> None:
        g, n, c = self.global_batch_size, self.num_train_samples, self.cfg
        if n < g:
            raise DataError(
                f"data.source = {c.source!r} gives {n} training samples of data.seq_len={c.seq_len} tokens, "
                f"fewer than one global batch of {g} (micro_batch_size {self.micro_batch_size} x "
                f"grad_accum_steps {self.grad_accum_steps} x world_size {self.world_size}); lower "
                "train.micro_batch_size or grad_accum_steps, lower data.seq_len, or use more data")
        per_round = self.micro_batch_size * self.world_size
        if c.eval_fraction > 0 and self.num_eval_samples < per_round:
            raise DataError(
                f"data.eval_fraction = {c.eval_fraction} holds out {self.num_eval_samples} eval samples, fewer "
                f"than one micro-batch per rank ({per_round}); raise data.eval_fraction or set it to 0")

    def _order(self, epoch: int) -> torch.Tensor:
        """This epoch's permutation: a pure function of (seed, epoch), never the global RNG."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            gen = torch.Generator().manual_seed(_seed_int("order", self.seed, epoch))
            self._order_cache = (epoch, torch.randperm(self.num_train_samples, generator=gen))
        return self._order_cache[1]

    def step_batches(self, pos: DataPosition) -> tuple[list[Batch], DataPosition]:
        """This rank's grad_accum_steps micro-batches for one optimizer step, and the position after it."""
        if pos.epoch < 0 or pos.cursor < 0:
            raise DataError(f"data position {pos} is invalid (negative); the checkpoint is damaged")
        epoch, cursor = pos.epoch, pos.cursor
        if cursor + self.global_batch_size > self.num_train_samples:
            epoch, cursor = epoch + 1, 0  # the tail shorter than a global batch is skipped
        order, mb = self._order(epoch), self.micro_batch_size
        batches = []
        for k in range(self.grad_accum_steps):
            start = cursor + k * mb * self.world_size + self.rank * mb
            batches.append(self._train.batch(order[start:start + mb].tolist(), self.pad_id))
        return batches, DataPosition(epoch, cursor + self.global_batch_size)

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        """The eval split in source order; every rank yields the same number of micro-batches (whole rounds
        of micro_batch_size * world_size), so collectives over them line up."""
        mb, per_round = self.micro_batch_size, self.micro_batch_size * self.world_size
        for k in range(min(max_batches, self.num_eval_samples // per_round)):
            start = k * per_round + self.rank * mb
            yield self._eval.batch(list(range(start, start + mb)), self.pad_id)
