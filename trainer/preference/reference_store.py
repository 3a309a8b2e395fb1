"""Stored reference log-probs: full-training DPO and KTO compare the policy with the model they started from, whose
log-prob of each response never changes. They are computed once, before the first step (trainer/run/preference.py),
and kept beside the token store, memory-mapped, so the reference model never sits in memory beside the policy and a
later run or a resume (on any number of ranks) reads them instead of computing them again.

Layout: `CACHE/<store folder>.reference/<key>/` with `manifest.json` (the identity and the document counts) and,
per split, `train.bin` / `eval.bin`: float64, one summed log-prob per document of the split (a pair's chosen and
rejected sequences are documents 2i and 2i+1). The key is a hash of what gives the numbers: the store's content, the
reference model (its base identity: config and sampled weight bytes, never the path; or a from-scratch config and
seed), the precision and the settings that change a forward. Written in a temporary folder renamed into place: a
crash never leaves a set that looks whole. The token store itself is never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np

from trainer.adapters.base_identity import identify
from trainer.data.store import TokenStore
from trainer.recipe.schema import Recipe

REFERENCE_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")


def reference_identity(recipe: Recipe, store: TokenStore) -> dict[str, Any]:
    """What the stored log-probs of `store` depend on."""
    m = recipe.model
    if m.name_or_path:
        base = {k: v for k, v in identify(m.name_or_path, m.revision).items() if k != "path"}
    else:
        base = {"config": m.config, "seed": recipe.train.seed}  # from scratch: the initial weights come from the seed
    adapter = recipe.adapter
    return {"version": REFERENCE_VERSION, "store": store.content, "base": base, "dtype": recipe.precision.dtype,
            "master_weights": recipe.precision.master_weights, "weights": recipe.precision.weights,
            "quant": adapter.quant.model_dump() if adapter.type == "qlora" else None,
            "rope_scaling": m.rope_scaling, "attn_implementation": m.attn_implementation}


def reference_folder(store: TokenStore, identity: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return store.path.parent / f"{store.path.name}.reference" / digest


def open_reference(folder: Path, store: TokenStore) -> dict[str, np.ndarray] | None:
    """The stored log-probs of each split, memory-mapped; None when there are none (or not whole)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        out = {}
        for split in SPLITS:
            documents = getattr(store, split).documents
            path = folder / f"{split}.bin"
            if manifest["documents"][split] != documents or path.stat().st_size != 8 * documents:
                return None
            out[split] = np.memmap(path, dtype=np.float64, mode="r") if documents else np.zeros(0)
        return out
    except (OSError, ValueError, KeyError):
        return None


def write_reference(folder: Path, logps: dict[str, np.ndarray], identity: dict[str, Any]) -> None:
    """Write the log-probs of every split into `folder`, atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for split, values in logps.items():
            np.asarray(values, dtype=np.float64).tofile(tmp / f"{split}.bin")
        manifest = {"identity": identity, "documents": {split: len(v) for split, v in logps.items()}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
