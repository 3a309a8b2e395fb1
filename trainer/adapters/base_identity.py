"""Which base model an adapter was trained on, and whether the base read now is that one.

A LoRA adapter is a small difference from one particular set of base weights: over another base of the same shape it
loads without a complaint and gives another model. So an adapter run records its base's identity (in every
checkpoint's trainer_state.json, and beside an `--adapter-only` export as base_model.json), and every later reader
of the base (resume, `export --merge`, generate and chat) compares the base it finds with it.

The identity is cheap to take: it never hashes the weights. It holds
- `config`: the base's config.json, less the keys a re-save changes without changing the model (IGNORED_CONFIG_KEYS);
- `files`: each weight file (`*.safetensors`, `*.bin`) and the shard index, by name: its size; for safetensors the
  hash of its header (tensor names, dtypes, shapes, offsets); and the hash of SAMPLE_BLOCKS blocks of SAMPLE_BYTES
  spread evenly over the file (64 KiB read per file). Two models of one shape have the same config, sizes and
  headers: only their bytes tell them apart, and a fine-tune changes nearly every block of every tensor;
- `name`, `revision`, `path`: where it was read (a local directory as an absolute path; a hub id from its snapshot
  in the local hub cache). A base moved to another folder keeps its identity; the location is only shown.
A hub base that is not in the local cache (nothing can be read) is known by name and revision only, and two such
identities are compared by those.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from trainer.errors import show_value

IGNORED_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "use_cache")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
INDEX_SUFFIX = ".index.json"
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 4096
Identity = dict[str, Any]


def absolute_if_local(name_or_path: str) -> str:
    """A base given as a local directory, as an absolute path (symlinks kept); a hub id as given. What an adapter's
    config records, so that the base is found from any working directory."""
    folder = Path(name_or_path).expanduser()
    return os.path.abspath(folder) if folder.is_dir() else name_or_path


def base_folder(name_or_path: str, revision: str | None) -> Path | None:
    """The folder holding the base's files: a local directory, or the hub id's snapshot in the local hub cache
    (never downloaded here); None when neither is there."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except ValueError:  # not a valid repository id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def identify(name_or_path: str, revision: str | None = None) -> Identity:
    """The identity of the base `name_or_path` (at `revision`) as it is on this machine now."""
    folder = base_folder(name_or_path, revision)
    identity: Identity = {"name": name_or_path, "revision": revision, "path": None, "config": None, "files": None}
    if folder is None:
        return identity
    try:
        files = {f.name: _file_identity(f) for f in sorted(folder.iterdir()) if _is_weight_file(f)}
    except OSError:  # not readable by this account: loading it will say so; known by name and revision here
        return identity
    return {**identity, "path": os.path.abspath(folder), "config": _config_of(folder), "files": files}


def _is_weight_file(f: Path) -> bool:
    return f.is_file() and (f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".safetensors" + INDEX_SUFFIX)
                            or f.name.endswith(".bin" + INDEX_SUFFIX))


def _config_of(folder: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS} if isinstance(config, dict) else None


def _file_identity(f: Path) -> dict[str, Any]:
    """Size, safetensors header hash and sampled-bytes hash of one file (an index is small: hashed whole)."""
    size = f.stat().st_size
    with open(f, "rb") as stream:
        if f.name.endswith(INDEX_SUFFIX):
            return {"size": size, "sha256": hashlib.sha256(stream.read()).hexdigest()}
        entry: dict[str, Any] = {"size": size}
        if f.name.endswith(".safetensors") and size >= 8:
            (header_len,) = struct.unpack("<Q", stream.read(8))
            entry["header"] = hashlib.sha256(stream.read(min(header_len, size - 8))).hexdigest()
        entry["sample"] = _sampled_hash(stream, size)
    return entry


def _sampled_hash(stream: Any, size: int) -> str:
    """The hash of SAMPLE_BLOCKS blocks spread evenly over the file, the last one ending at its end."""
    digest = hashlib.sha256()
    span = max(size - SAMPLE_BYTES, 0)
    for i in range(SAMPLE_BLOCKS):
        stream.seek(span * i // (SAMPLE_BLOCKS - 1))
        digest.update(stream.read(SAMPLE_BYTES))
    return digest.hexdigest()


def readable(identity: Identity) -> bool:
    """Whether the base's files could be read when the identity was taken (else: name and revision only)."""
    return identity.get("files") is not None


def short_id(identity: Identity) -> str:
    """A 12-digit digest of what identifies the base (config and files), for messages."""
    content = json.dumps({"config": identity.get("config"), "files": identity.get("files")}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:12]


def describe(identity: Identity) -> str:
    """One line: where the base was read and its digest, or what is known of a base that could not be read."""
    where = identity.get("path") or identity.get("name")
    revision = f" (revision {identity['revision']})" if identity.get("revision") else ""
    if not readable(identity):
        return f"{identity.get('name')}{revision}, files not readable here (known by name and revision only)"
    files = identity["files"]
    size = sum(meta["size"] for meta in files.values())
    count = f"{len(files)} weight file{'s' if len(files) != 1 else ''}"
    return f"{where}{revision}, id {short_id(identity)} ({count}, {size / 1e6:,.1f} MB)"


def differences(recorded: Identity, current: Identity) -> list[str]:
    """What differs between two identities, one line each; empty when `current` is the recorded base (or, when
    either side's files could not be read, when name and revision agree)."""
    if not (readable(recorded) and readable(current)):
        return [f"{key}: {show_value(recorded.get(key))} -> {show_value(current.get(key))}"
                for key in ("name", "revision") if recorded.get(key) != current.get(key)]
    return _config_differences(recorded.get("config"), current.get("config")) + \
        _file_differences(recorded["files"], current["files"])


def _config_differences(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    if old == new:
        return []
    if old is None or new is None:
        return [f"config.json: {'missing' if old is None else 'present'} -> {'missing' if new is None else 'present'}"]
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return [f"config key {k}: {show_value(old.get(k))} -> {show_value(new.get(k))}" for k in keys]


def _file_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines = [f"file {name}: only in the recorded base" for name in sorted(old.keys() - new.keys())]
    lines += [f"file {name}: not in the recorded base" for name in sorted(new.keys() - old.keys())]
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        if a.get("size") != b.get("size"):
            lines.append(f"file {name}: size {a.get('size'):,} -> {b.get('size'):,} bytes")
        elif a.get("header") != b.get("header"):
            lines.append(f"file {name}: header hash {str(a.get('header'))[:12]} -> {str(b.get('header'))[:12]} "
                         "(tensor names, dtypes or shapes)")
        elif a != b:
            before, after = (str(meta.get("sample") or meta.get("sha256"))[:12] for meta in (a, b))
            lines.append(f"file {name}: same size and header, different contents (sampled bytes {before} -> "
                         f"{after})")
    return lines


def mismatch(recorded: Identity, current: Identity) -> str | None:
    """None when `current` is the base the adapter was trained on; else both identities and what differs."""
    found = differences(recorded, current)
    if not found:
        return None
    return (f"  trained on: {describe(recorded)}\n  found now:  {describe(current)}\n"
            + "\n".join(f"  - {line}" for line in found[:12])
            + (f"\n  - ... and {len(found) - 12} more" if len(found) > 12 else ""))


def mismatch_line(recorded: Identity, current: Identity) -> str | None:
    """The same as one line (generate and chat warn with it and go on)."""
    found = differences(recorded, current)
    if not found:
        return None
    return (f"trained on {describe(recorded)}; found {describe(current)}; differs: {'; '.join(found[:3])}"
            + (f" (and {len(found) - 3} more)" if len(found) > 3 else ""))
