"""Is this the data a checkpoint was trained on? A checkpoint records the data's identity (batches.data_identity):
the sample and token counts, and per source its name, its store's key (the fingerprint: paths, sizes, modification
times, tokenizer, template...) and the store's content hash (a SHA-256 of the ids, offsets and masks written, taken
once at build time). Resuming on data whose content differs would continue the run on other text from a cursor
that meant something else, so the checkpoint refuses it unless checkpoint.allow_data_change says otherwise.

The content decides, not the fingerprint: a file touched or copied (new modification time, same bytes) rebuilds
its store with the same content, and the run resumes. Checkpoints written before content hashes were recorded
hold only the counts: they resume with a warning when the counts agree (nothing more can be checked).
"""

from __future__ import annotations

from typing import Any

SHOWN_HASH = 16  # hex digits of a content hash shown in messages


def _short(digest: Any) -> str:
    return str(digest)[:SHOWN_HASH] if digest else "none"


def data_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str] | None:
    """How the data differs from the data of a checkpoint, one line per difference ([]: the same data). None when
    the checkpoint predates content identities and its counts agree: the data cannot be compared."""
    saved = saved or {}
    counts = [f"data {key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in ("train_samples", "tokens")
              if saved.get(key) != current.get(key)]
    if "sources" not in saved:
        return counts or None
    old, new = saved["sources"], current["sources"]
    if len(old) != len(new):
        return [f"data sources: {len(old)} -> {len(new)}", *counts]
    lines = []
    for before, after in zip(old, new):
        if before.get("source") != after.get("source"):
            lines.append(f"data source {before.get('source')!r} -> {after.get('source')!r}")
        elif before.get("content") != after.get("content"):
            old_id = f"content {_short(before.get('content'))} in store {before.get('store')}"
            new_id = f"content {_short(after.get('content'))} in store {after.get('store')}"
            lines.append(f"data source {after['source']!r}: its content changed ({old_id} -> {new_id})")
    return lines + counts
