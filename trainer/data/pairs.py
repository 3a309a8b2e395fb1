"""Preference rows -> token ids: a pair (data.format: preference) becomes two examples stored one after the other,
the chosen then the rejected response, each after the same prompt; an unpaired row (data.format: kto) becomes one
example and its label. Both are rendered with the chat template, as chats are, and only the response (its end-of-
turn marker included) carries the loss.

Pair rows, in the forms the common datasets use:
- `prompt`, `chosen`, `rejected` as text (a user turn and the assistant's replies), or as message lists (the prompt's
  turns; each response's assistant turns); an optional `system`;
- `chosen` and `rejected` as whole conversations (no `prompt`): the turns before the last are the prompt (with a
  `prompt` too, a response's turns up to its last non-assistant one repeat the prompt and are skipped);
- ShareGPT `conversations` (or OpenAI `messages`) as the prompt, with `chosen` and `rejected` each a message or text.
KTO rows: `prompt` and `completion` (text or messages) and `label` (true: desirable).

A pair longer than data.seq_len is handled by data.too_long, for both sequences alike: `drop` and `error` as for
chats; `truncate` cuts the prompt first (its first tokens, the same number from both sequences), then the responses'
ends, so the two still share their prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.data.examples import (ROLES, BadRow, Encoded, Encoder, _reply_mask, encode_batch, row_object,
                                   tools_of)
from trainer.data.sources import Row, unit_of
from trainer.errors import DataError

Messages = list[dict[str, str]]


def _turn(value: Any, default_role: str, where: str) -> dict[str, str]:
    """One message: OpenAI {role, content}, ShareGPT {from, value}, or text (spoken by default_role)."""
    if isinstance(value, str):
        return {"role": default_role, "content": value}
    if not isinstance(value, dict):
        raise BadRow(f"{where} is a {type(value).__name__}, not text or a message")
    role_key, text_key = ("role", "content") if "role" in value else ("from", "value")
    role = ROLES.get(value.get(role_key))  # type: ignore[arg-type]
    if role is None:
        raise BadRow(f"{where}: unknown {role_key} {value.get(role_key)!r} (known: {', '.join(ROLES)})")
    if not isinstance(value.get(text_key), str):
        raise BadRow(f"{where}: {text_key!r} is not a string")
    return {"role": role, "content": value[text_key]}


def _turns(value: Any, default_role: str, name: str) -> Messages:
    if value is None:
        raise BadRow(f"missing or null {name!r}")
    items = value if isinstance(value, list) else [value]
    return [_turn(item, default_role, f"{name!r} turn {i}" if isinstance(value, list) else repr(name))
            for i, item in enumerate(items)]


def _response(value: Any, name: str) -> Messages:
    """The assistant turns at the end of `value`: a response given as a whole conversation (UltraFeedback's
    `chosen` repeats the prompt's user turn) keeps only its reply."""
    turns = _turns(value, "assistant", name)
    start = max((i + 1 for i, t in enumerate(turns) if t["role"] != "assistant"), default=0)
    turns = turns[start:]
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        raise BadRow(f"{name!r} has no assistant text")
    return turns


def _system(row: dict[str, Any]) -> Messages:
    system = row.get("system")
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


def pair_messages(row: dict[str, Any]) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen response, rejected response) as messages, from any of the forms above."""
    if "chosen" not in row or "rejected" not in row:
        raise BadRow("no 'chosen' and 'rejected' (format: preference)")
    if "prompt" in row:
        prompt = _turns(row["prompt"], "user", "prompt")
        chosen, rejected = _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected")
    elif isinstance(row.get("conversations"), list) or isinstance(row.get("messages"), list):
        key = "conversations" if isinstance(row.get("conversations"), list) else "messages"
        prompt = _turns(row[key], "user", key)
        chosen, rejected = _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected")
    else:  # whole conversations: the last turn is the response
        whole_chosen, whole_rejected = _turns(row["chosen"], "assistant", "chosen"), \
            _turns(row["rejected"], "assistant", "rejected")
        prompt, chosen, rejected = whole_chosen[:-1], _response(whole_chosen[-1:], "chosen"), \
            _response(whole_rejected[-1:], "rejected")
    if not prompt:
        raise BadRow("no prompt")
    return _system(row) + prompt, chosen, rejected


def kto_messages(row: dict[str, Any]) -> tuple[Messages, Messages, bool]:
    """(prompt, completion, desirable) of an unpaired row."""
    label = row.get("label")
    if not isinstance(label, bool):
        raise BadRow(f"'label' is {label!r}: must be true (desirable) or false (undesirable)")
    prompt = _turns(row.get("prompt"), "user", "prompt")
    return _system(row) + prompt, _response(row.get("completion"), "completion"), label


@dataclass
class _Rendered:
    text: str
    spans: list[tuple[int, int]]  # the response's characters (its end-of-turn markers included)


@dataclass
class PreferenceEncoder:
    """Rows of a preference or KTO source to examples (picklable, like Encoder, which it uses for the chat
    rendering and the settings)."""

    encoder: Encoder

    def __call__(self, rows: list[Row]) -> Encoded:
        out = Encoded(masks=[], labels=[] if self.encoder.format == "kto" else None,
                      group=2 if self.encoder.format == "preference" else 1)
        parsed: list[tuple[Row, list[_Rendered], bool]] = []
        for row in rows:
            try:
                rendered, desirable = self._render(row_object(row))
            except ValueError as e:  # BadRow, or the renderer's reason
                out.dropped.append((row.where, row.number, str(e)))
                continue
            parsed.append((row, rendered, desirable))
        texts = [r.text for _, rendered, _ in parsed for r in rendered]
        out.chars = sum(len(t) for t in texts)
        encodings = iter(encode_batch(self.encoder.tokenizer, texts, chat=True))
        for row, rendered, desirable in parsed:
            sequences = []
            for r in rendered:
                enc = next(encodings)
                offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                sequences.append((np.asarray(enc.ids, dtype=self.encoder.id_dtype), _reply_mask(offsets, r.spans)))
            fitted = self._fit(row, sequences, out)
            if fitted is None:
                continue
            for ids, mask in fitted:
                out.ids.append(ids)
                out.masks.append(mask)  # type: ignore[union-attr]
            if out.labels is not None:
                out.labels.append(desirable)
        out.rows = len(rows)
        out.dropped.sort(key=lambda d: d[1])
        return out

    def _render(self, row: dict[str, Any]) -> tuple[list[_Rendered], bool]:
        """The rendered sequences of a row (two for a pair, one for KTO), each with its response's spans."""
        tools = tools_of(row)
        if self.encoder.format == "preference":
            prompt, chosen, rejected = pair_messages(row)
            responses, desirable = [chosen, rejected], True
        else:
            prompt, completion, desirable = kto_messages(row)
            responses = [completion]
        renderer = self.encoder.renderer
        assert renderer is not None
        asked = sum(m["role"] == "assistant" for m in prompt)  # replies inside the prompt carry no loss
        rendered = []
        for response in responses:
            text, spans = renderer.spans(prompt + response, tools)
            rendered.append(_Rendered(text, spans[asked:]))
        return rendered, desirable

    def _fit(self, row: Row, sequences: list[tuple[np.ndarray, np.ndarray]],
             out: Encoded) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """The sequences within seq_len (data.too_long), or None when the row is dropped; a row whose responses
        carry no loss token is dropped."""
        seq_len = self.encoder.seq_len
        longest = max(len(ids) for ids, _ in sequences)
        if longest > seq_len:
            out.too_long.append((row.where, row.number, longest))
            if self.encoder.too_long == "error":
                raise DataError(f"data.too_long = 'error': {row.where} {unit_of(row.where)} {row.number} (counted "
                                f"from 1) is {longest} tokens long, longer than data.seq_len={seq_len}; raise "
                                "data.seq_len, or set data.too_long to drop or truncate (the prompt is cut first)")
            if self.encoder.too_long == "drop":
                out.dropped.append((row.where, row.number, f"{longest} tokens, longer than data.seq_len={seq_len} "
                                                           "(data.too_long: drop)"))
                return None
            sequences = _truncated(sequences, seq_len)
            out.tokens_cut += longest - max(len(ids) for ids, _ in sequences)
        if not all(mask[1:].any() for _, mask in sequences):
            out.dropped.append((row.where, row.number, f"no response within data.seq_len={seq_len} tokens"))
            return None
        return sequences


def _truncated(sequences: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut to seq_len: the prompt's first tokens first (as many from every sequence, keeping one), then each
    response's end."""
    prompt = min(int(np.argmax(mask)) if mask.any() else len(mask) for _, mask in sequences)
    excess = max(len(ids) for ids, _ in sequences) - seq_len
    cut = min(excess, max(prompt - 1, 0))
    return [(ids[cut:][:seq_len], mask[cut:][:seq_len]) for ids, mask in sequences]
