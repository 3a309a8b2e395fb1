"""What a checkpoint is on disk, and finding them.

OUTPUT_DIR/checkpoints/step-000123/ holds what the engine writes (weights as safetensors, optimizer, LR schedule
position, loss scaler; per-rank shards where state is per-rank), `rng-rank<R>.pt` for every rank (Python, NumPy,
torch CPU and CUDA generators), `trainer_state.json` (the loop's counters and the run's fingerprint:
checkpoint/state.py), `config.yaml` (the resolved recipe), `hf/` (model config and tokenizer, for export), and
`manifest.json`, written last, listing every file with its size and SHA-256. A folder without a valid manifest is
not a checkpoint. A file whose name carries `rank<R>` / `rank_<R>` was written by rank R, the others by rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from trainer.errors import CheckpointError
from trainer.safeio import sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
RECIPE = "config.yaml"
STEP_DIR = re.compile(r"^step-(\d+)$")
RANK_IN_NAME = re.compile(r"rank_?(\d+)")


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def read_manifest(path: Path, checksums: bool) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError when it is missing, damaged or incomplete."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a complete checkpoint: no valid {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')} is not {FORMAT_VERSION}")
    for name, meta in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}: file {name} is missing or has the wrong size; the checkpoint is damaged")
        if checksums and sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {name} does not match its checksum; the checkpoint is damaged")
    return manifest


def writer_of(name: str, world_size: int) -> int:
    """The rank that writes a checkpoint file, by its name: ours (`rng-rank1.pt`, `optimizer-rank00001.pt`) and
    DeepSpeed's (`zero_pp_rank_1_mp_rank_00_optim_states.pt`: the first rank in the name is the data-parallel
    one) carry it; every other file is rank 0's."""
    found = RANK_IN_NAME.search(Path(name).name)
    rank = int(found.group(1)) if found else 0
    return rank if rank < world_size else 0


def verification_share(files: dict[str, dict[str, Any]], world_size: int, rank: int) -> list[str]:
    """The files `rank` checksums when a checkpoint is verified on `world_size` ranks: each file by the rank that
    wrote it when the number of ranks is the same (nobody reads another rank's files), else by its writer's rank
    modulo the new number of ranks."""
    return [name for name in sorted(files) if writer_of(name, 2**31) % world_size == rank]


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder, complete or not, oldest first."""
    root = checkpoints_root(output_dir)
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint with a valid manifest (sizes checked), oldest first."""
    found = []
    for step, p in checkpoint_folders(output_dir):
        try:
            read_manifest(p, checksums=False)
        except CheckpointError as e:
            log.warning("ignoring %s", e)
            continue
        found.append((step, p))
    return found


def move_aside(output_dir: Path) -> Path:
    """Start over without deleting anything: checkpoints/ and metrics.jsonl move to `previous-<time>/`."""
    aside = output_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    aside.mkdir()
    for name in ("checkpoints", "metrics.jsonl"):
        if (output_dir / name).exists():
            os.replace(output_dir / name, aside / name)
    return aside
