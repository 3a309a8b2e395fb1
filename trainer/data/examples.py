"""Rows -> token ids, a chunk of rows at a time (in a worker process when the store is built in parallel).

`text` rows become one document each: its tokens then EOS, so the model learns where documents end, and every token
carries the loss. `alpaca` and `chat` rows are rendered with the chat template; only the assistant's replies (and
their end-of-turn marker) carry the loss, recorded as a mask beside the ids. An example longer than seq_len is
handled by data.too_long: `drop` (the default: dropped, counted and reported like a bad row), `truncate` (its first
tokens kept and its end-of-turn marker put back at the end; a row with no reply left within it is dropped) or
`error` (a DataError naming the row). A row that cannot become an example is dropped with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.data.sources import Row, unit_of
from trainer.errors import DataError
from trainer.model.tokenizer import ChatRenderer

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "model": "assistant", "function_call": "assistant", "observation": "tool", "tool": "tool",
         "function": "tool", "ipython": "tool"}
ENCODE_BATCH = 4096


class BadRow(ValueError):
    """A row that cannot become a training example; the message is the reason shown to the user."""


def row_object(row: Row) -> dict[str, Any]:
    """The row's JSON object, or BadRow with why it is not one (a row the reader could not parse, or not an
    object)."""
    if row.bad is not None:
        raise BadRow(row.bad)
    if not isinstance(row.value, dict):
        raise BadRow(f"a {type(row.value).__name__}, not an object")
    return row.value


def _text(value: Any, name: str) -> str:
    if value is None:
        raise BadRow(f"missing or null {name!r}")
    if not isinstance(value, str):
        raise BadRow(f"{name!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRow(f"{name!r} is empty")
    return value


def alpaca_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A user turn (instruction, then the input after a blank line) and the assistant's output."""
    instruction = _text(row.get("instruction"), "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"'input' is a {type(extra).__name__}, not a string")
    output = _text(row.get("output"), "output")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    system = row.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def chat_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI-style `messages` or ShareGPT `conversations`, with roles mapped by ROLES (a function call is the
    assistant speaking, an observation is a tool message)."""
    if isinstance(row.get("messages"), list):
        turns, role_key, text_key = row["messages"], "role", "content"
    elif isinstance(row.get("conversations"), list):
        turns, role_key, text_key = row["conversations"], "from", "value"
    else:
        raise BadRow("no 'messages' or 'conversations' list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {i} is a {type(turn).__name__}, not an object")
        role = ROLES.get(turn.get(role_key))  # type: ignore[arg-type]
        if role is None:
            raise BadRow(f"turn {i}: unknown {role_key} {turn.get(role_key)!r} (known: {', '.join(ROLES)})")
        if not isinstance(turn.get(text_key), str):
            raise BadRow(f"turn {i}: {text_key!r} is not a string")
        out.append({"role": role, "content": turn[text_key]})
    while out and out[-1]["role"] != "assistant":
        out.pop()  # trailing prompts have no reply to learn
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise BadRow("no assistant turn with text")
    return out


def tools_of(row: dict[str, Any]) -> list[Any] | None:
    """Function specs shown to the template (ShareGPT tool datasets store them as a JSON string)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise BadRow(f"'tools' is not valid JSON ({e.msg})") from e
    if not tools:
        return None
    if not isinstance(tools, list):
        raise BadRow("'tools' must be a list of function specs")
    return tools


def encode_batch(tokenizer: Any, texts: list[str], *, chat: bool) -> list[Any]:
    """Batch-encode in Rust. Text: a "</s>" inside a document is text, not a document boundary, and no offsets are
    computed (faster). Chat: the template's markers must match their special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"model.tokenizer: {type(tokenizer).__name__} is not a fast (Rust) tokenizer; use one with a "
                        "tokenizer.json, or model.tokenizer: byte")
    encode = backend.encode_batch if chat else getattr(backend, "encode_batch_fast", backend.encode_batch)
    saved = backend.encode_special_tokens
    backend.encode_special_tokens = not chat
    try:
        out = []
        for start in range(0, len(texts), ENCODE_BATCH):
            out += encode(texts[start:start + ENCODE_BATCH], add_special_tokens=False)
        return out
    finally:
        backend.encode_special_tokens = saved


def _reply_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """A token carries the loss when its characters overlap a reply span."""
    keep = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        keep |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return keep


@dataclass
class Encoded:
    """The examples of a chunk of rows, in row order."""

    ids: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] | None = None  # per example, True where the token carries the loss; None: every token
    dropped: list[tuple[str, int, str]] = field(default_factory=list)  # (file or dataset, number, reason)
    rows: int = 0
    chars: int = 0  # characters tokenized (the progress bar's measure of how far through the source it is)
    too_long: list[tuple[str, int, int]] = field(default_factory=list)  # (file or dataset, number, tokens): rows
    # longer than seq_len, whatever data.too_long did with them
    tokens_cut: int = 0  # tokens that data.too_long: truncate cut off
    labels: list[bool] | None = None  # kto: per example, whether its completion is desirable
    group: int = 1  # examples that belong together (a preference pair: 2) and go to the same split


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id of the vocabulary (what the store writes)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class Encoder:
    """Rows of one source to examples (picklable: each worker of a parallel build makes its own)."""

    tokenizer: Any
    format: str
    text_field: str
    seq_len: int
    template: str | None = None  # the chat template (None: the tokenizer's own)
    too_long: str = "drop"  # data.too_long: drop | truncate | error (alpaca and chat)

    def __post_init__(self) -> None:
        self.renderer = ChatRenderer(self.tokenizer, self.template) if self.format != "text" else None
        self.id_dtype = token_dtype(len(self.tokenizer))  # ids cross from the workers in the store's own type

    def __call__(self, rows: list[Row]) -> Encoded:
        out = self._text(rows) if self.format == "text" else self._sft(rows)
        out.rows = len(rows)
        out.dropped.sort(key=lambda d: d[1])  # row order, whichever stage dropped them
        return out

    def _text(self, rows: list[Row]) -> Encoded:
        out, texts = Encoded(), []
        for row in rows:
            try:
                if row.bad is not None:
                    raise BadRow(row.bad)
                texts.append(_text(row.value, self.text_field))
            except BadRow as e:
                out.dropped.append((row.where, row.number, str(e)))
        eos = self.tokenizer.eos_token_id
        out.chars = sum(len(t) for t in texts)
        for enc in encode_batch(self.tokenizer, texts, chat=False):
            ids = np.empty(len(enc.ids) + 1, dtype=self.id_dtype)
            ids[:-1], ids[-1] = enc.ids, eos
            out.ids.append(ids)
        return out

    def _sft(self, rows: list[Row]) -> Encoded:
        out = Encoded(masks=[])
        to_messages = alpaca_messages if self.format == "alpaca" else chat_messages
        texts, spans, where = [], [], []
        for row in rows:
            try:
                value = row_object(row)
                text, found = self.renderer.spans(to_messages(value), tools_of(value))  # type: ignore[union-attr]
            except ValueError as e:  # BadRow, or the renderer's reason
                out.dropped.append((row.where, row.number, str(e)))
                continue
            texts.append(text)
            spans.append(found)
            where.append(row)
        out.chars = sum(len(t) for t in texts)
        for row, text, enc, found in zip(where, texts, encode_batch(self.tokenizer, texts, chat=True), spans):
            ids = np.asarray(enc.ids, dtype=self.id_dtype)
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            mask = _reply_mask(offsets, found)
            if len(ids) > self.seq_len:
                fitted = self._fit(row, text, ids, mask, offsets, found, out)
                if fitted is None:
                    continue
                ids, mask = fitted
            if not mask[1:].any():  # the first token is never a target
                out.dropped.append((row.where, row.number, f"no reply within the first data.seq_len={self.seq_len} "
                                                           "tokens"))
                continue
            out.ids.append(ids)
            out.masks.append(mask)  # type: ignore[union-attr]
        return out

    def _fit(self, row: Row, text: str, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
             spans: list[tuple[int, int]], out: Encoded) -> tuple[np.ndarray, np.ndarray] | None:
        """An example longer than seq_len, as data.too_long says: None when it is dropped, else it truncated to
        seq_len with the end-of-turn marker put back last (carrying the loss when the cut falls inside a reply)."""
        out.too_long.append((row.where, row.number, len(ids)))
        if self.too_long == "error":
            raise DataError(f"data.too_long = 'error': {row.where} {unit_of(row.where)} {row.number} (counted from 1) "
                            f"is {len(ids)} tokens long, longer than data.seq_len={self.seq_len}; raise data.seq_len, "
                            "or set data.too_long to drop (such rows are skipped, counted and reported) or truncate "
                            "(cut to seq_len, keeping the end-of-turn marker)")
        closing = self._end_of_turn(text, ids, mask, offsets, spans) if self.too_long == "truncate" else ids[:0]
        keep = self.seq_len - len(closing)
        if self.too_long == "drop" or keep < 2:  # (a marker that fills seq_len leaves nothing to learn)
            out.dropped.append((row.where, row.number, f"{len(ids)} tokens, longer than data.seq_len={self.seq_len} "
                                                       f"(data.too_long: {self.too_long})"))
            return None
        out.tokens_cut += len(ids) - self.seq_len
        cut_ids = np.concatenate([ids[:keep], ids[closing]])
        cut_mask = np.concatenate([mask[:keep], np.full(len(closing), mask[keep - 1])])
        return cut_ids, cut_mask

    def _end_of_turn(self, text: str, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
                     spans: list[tuple[int, int]]) -> np.ndarray:
        """The indices of the tokens of the last reply's end-of-turn marker (the template's, probed once); the last
        reply token when the template has none."""
        marker = self.renderer.marker if self.renderer is not None else ""
        end = spans[-1][1] if spans else len(text)
        if marker and text[end - len(marker):end] == marker:
            found = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > end - len(marker)))
            if len(found):
                return found
        last = np.flatnonzero(mask)
        return last[-1:] if len(last) else np.array([len(ids) - 1])
