"""Checkpoint cost per rank: save and resume seconds on each rank and bytes on disk, the native engine (DDP)
against DeepSpeed ZeRO-3 with and without the gathered full-weights copy (`checkpoint.full_weights`), for
Llama-style models of about 25M, 100M and 200M parameters, 2 ranks on CPU.

    python benchmarks/checkpoint_scale.py                  # 25M, 100M, 200M (a few minutes; ~10 GB of disk)
    python benchmarks/checkpoint_scale.py --sizes 25M      # a quick look

Each variant trains one step of the quickstart recipe reshaped to the model size (so the optimizer state exists)
and saves a checkpoint (timed on every rank); a second launch resumes from it on the same 2 ranks, a third on 1
rank (the native engine reloads its replicated state; DeepSpeed reshards its partitions, ds_reshard.py). Columns:
- checkpoint MB: the manifest's bytes, and the memory plan's estimate (trainer.plan.disk.checkpoint_size);
- written by rank 0 / 1: the bytes each rank wrote (and fsynced and hashed: checkpoint.writer_of);
- save s, rank 0 / 1: each rank's own part (writing its files, fsync, hashing them); the save's wall time on rank 0
  (with the barriers, the manifest and the rename) after it;
- resume s, rank 0 / 1: choosing the checkpoint (each rank checksums a share of the files) and loading it, on
  each rank; the engine's load alone after it;
- resume on 1 rank s: the same on one rank (engine load after it).
Timings read files from the page cache (just written); on a cold cache the reads cost the disk's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
# Llama-style shapes (byte vocabulary, so nearly every parameter is in the decoder layers)
SIZES = {
    "25M": ["model.config.hidden_size=512", "model.config.intermediate_size=1376", "model.config.num_hidden_layers=8",
            "model.config.num_attention_heads=8", "model.config.num_key_value_heads=8"],
    "100M": ["model.config.hidden_size=1024", "model.config.intermediate_size=2816",
             "model.config.num_hidden_layers=8", "model.config.num_attention_heads=16",
             "model.config.num_key_value_heads=16"],
    "200M": ["model.config.hidden_size=1024", "model.config.intermediate_size=2816",
             "model.config.num_hidden_layers=16", "model.config.num_attention_heads=16",
             "model.config.num_key_value_heads=16"],
}
COMMON = ["train.max_steps=1", "train.micro_batch_size=1", "train.global_batch_size=2", "data.seq_len=32",
          "data.max_bytes=200000", "train.eval_every_steps=0", "data.eval_fraction=0", "logging.progress_bar=false",
          "logging.plot=false", "checkpoint.every_steps=0", "checkpoint.save_final=false", "optimizer.warmup_steps=0",
          "precision.dtype=bf16"]
ZERO3 = ["distributed.engine=deepspeed", "distributed.zero_stage=3"]
VARIANTS = {  # name: (overrides, full weights column)
    "native (DDP)": ([], "always"),
    "DeepSpeed ZeRO-3": (ZERO3, "off (default)"),
    "DeepSpeed ZeRO-3 + full weights": ([*ZERO3, "checkpoint.full_weights=true"], "on"),
}


# ---------------------------------------------------------------------------------------------- worker side

def _timed(cls: type, method: str, key: str, times: dict[str, float]) -> None:
    """Accumulate the seconds spent in cls.method on this rank under `key`."""
    original = getattr(cls, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - started

    setattr(cls, method, wrapper)


def _instrument(times: dict[str, float]) -> None:
    from trainer.checkpoint.checkpointer import Checkpointer
    from trainer.checkpoint.commit import AtomicSave
    from trainer.engine.native import NativeEngine

    _timed(Checkpointer, "save", "save_wall", times)
    _timed(Checkpointer, "_write_files", "save_own", times)
    _timed(AtomicSave, "_hash_own_files", "save_own", times)
    _timed(Checkpointer, "choose", "resume", times)
    _timed(Checkpointer, "restore", "resume", times)
    _timed(NativeEngine, "load", "load", times)
    try:
        from trainer.engine.deepspeed import ZeroEngine

        _timed(ZeroEngine, "load", "load", times)
    except ImportError:  # without DeepSpeed only the native rows can run
        pass


def worker(spec_path: str) -> None:
    """Under torchrun. phase "save": train one step and save (timed); phase "resume": build the run and resume
    (timed). Writes this rank's timings next to the spec."""
    from trainer.distributed import barrier, distributed_context
    from trainer.run.loop import run_loop, setup
    from trainer.recipe.resolve import resolve

    spec = json.loads(Path(spec_path).read_text())
    times: dict[str, float] = {}
    _instrument(times)
    with distributed_context() as dist:
        saving = spec["phase"] == "save"
        run = resolve(RECIPE, [*spec["overrides"], f"checkpoint.resume={'never' if saving else 'auto'}"],
                      world_size=dist.world_size)
        t = setup(run, dist)
        if saving:
            run_loop(t, until_step=1)
            barrier()
            t.checkpointer.save(t.engine, t.state)
        t.metrics.close()
        Path(spec_path).with_name(f"times-{spec['phase']}-rank{dist.rank}.json").write_text(json.dumps(times))


# ---------------------------------------------------------------------------------------------- parent side

def launch(spec: dict[str, Any], folder: Path, nproc: int) -> list[dict[str, float]]:
    path = folder / f"spec-{spec['phase']}-{nproc}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        sys.exit(f"{spec['phase']} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(path.with_name(f"times-{spec['phase']}-rank{r}.json").read_text()) for r in range(nproc)]


def bytes_by_rank(checkpoint: Path, world_size: int) -> list[int]:
    from trainer.checkpoint.layout import MANIFEST, writer_of

    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    out = [0] * world_size
    for name, meta in files.items():
        out[writer_of(name, world_size)] += int(meta["size"])
    return out


def planned_bytes(overrides: list[str]) -> int:
    from trainer.plan.disk import checkpoint_size
    from trainer.plan.shapes import shapes
    from trainer.recipe.resolve import resolve

    run = resolve(RECIPE, overrides, world_size=2)
    return checkpoint_size(run, shapes(run)).total


def parameters(overrides: list[str]) -> int:
    from trainer.plan.shapes import shapes
    from trainer.recipe.resolve import resolve

    return shapes(resolve(RECIPE, overrides, world_size=2)).total


def row(size: str, name: str, overrides: list[str], full: str, out: Path) -> str:
    root = out.parent
    given = [f"output_dir={out}", *COMMON, *SIZES[size], *overrides]
    saved = launch({"phase": "save", "overrides": given}, root, nproc=2)
    checkpoint = next((out / "checkpoints").glob("step-*"))
    written = bytes_by_rank(checkpoint, 2)
    on2 = launch({"phase": "resume", "overrides": given}, root, nproc=2)
    on1 = launch({"phase": "resume", "overrides": given}, root, nproc=1)[0]
    shutil.rmtree(out)
    mb = 1e6

    def pair(key: str, times: list[dict[str, float]] = on2, fmt: Callable[[float], str] = "{:.2f}".format) -> str:
        return " / ".join(fmt(t.get(key, 0.0)) for t in times)

    return (f"| {size} ({parameters(given) / 1e6:.0f}M) | {name} | {full} | {sum(written) / mb:,.0f} "
            f"({planned_bytes(given) / mb:,.0f}) | {written[0] / mb:,.0f} / {written[1] / mb:,.0f} | "
            f"{pair('save_own', saved)} ({saved[0]['save_wall']:.2f}) | {pair('resume')} ({pair('load')}) | "
            f"{on1['resume']:.2f} ({on1['load']:.2f}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    os.environ.setdefault("TRAINER_DATA_CACHE", tempfile.mkdtemp(prefix="checkpoint-scale-stores-"))
    print("| model | engine | full weights | checkpoint MB (planned) | written by rank 0 / 1, MB | "
          "save s, rank 0 / 1 (wall) | resume s, rank 0 / 1 (engine load) | resume on 1 rank s (engine load) |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="checkpoint-scale-") as tmp:
        for size in args.sizes:
            for i, (name, (overrides, full)) in enumerate(VARIANTS.items()):
                print(row(size, name, overrides, full, Path(tmp) / f"{size}-{i}"), flush=True)


if __name__ == "__main__":
    main()
