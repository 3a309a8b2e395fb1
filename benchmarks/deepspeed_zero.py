"""Peak memory per rank and throughput: the native engine (DDP) against DeepSpeed ZeRO 1-3 and CPU offload.

Every variant is the same recipe through the real CLI under torchrun, changing only `distributed.*`; the
numbers come from each run's metrics.jsonl (peak_mem_bytes: CUDA max allocated on GPU, peak RSS of rank 0 on
CPU; tokens_per_s: median over the steps after the first two).

    python benchmarks/deepspeed_zero.py                 # CPU: 2 ranks, a ~90M-parameter Llama, bf16
    python benchmarks/deepspeed_zero.py --gpu           # one GPU: a 1B-shaped Llama, bf16 and fp16, native vs
                                                        # ZeRO-2 (prints the fp16 loss-scale log too)

On CPU the model states are the same bytes wherever they sit, so offload shows only its speed; peak RSS also
holds torch, DeepSpeed and activations, so the differences between rows are what ZeRO saves, not the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_SHAPE = ["model.config.hidden_size=1024", "model.config.intermediate_size=2816",
             "model.config.num_hidden_layers=8", "model.config.num_attention_heads=8",
             "model.config.num_key_value_heads=8", "data.seq_len=128", "train.micro_batch_size=2"]
GPU_SHAPE = ["model.config.hidden_size=2048", "model.config.intermediate_size=5504",
             "model.config.num_hidden_layers=16", "model.config.num_attention_heads=16",
             "model.config.num_key_value_heads=16", "model.config.vocab_size=32000",
             "model.config.max_position_embeddings=1024", "model.config.tie_word_embeddings=false",
             "data.seq_len=1024", "train.micro_batch_size=4", "model.gradient_checkpointing=true"]
COMMON = ["train.eval_every_steps=0", "data.eval_fraction=0", "logging.progress_bar=false", "logging.plot=false",
          "checkpoint.every_steps=0", "checkpoint.save_final=false", "checkpoint.resume=never",
          "optimizer.warmup_steps=2", "optimizer.lr=3e-4", "data.max_bytes=2000000"]
DS = ["distributed.engine=deepspeed"]
OFFLOAD = "distributed.offload_optimizer=cpu"
CPU_VARIANTS = {
    "native (DDP)": [], "ZeRO-1": [*DS, "distributed.zero_stage=1"], "ZeRO-2": [*DS, "distributed.zero_stage=2"],
    "ZeRO-3": [*DS, "distributed.zero_stage=3"], "ZeRO-2 + offload": [*DS, "distributed.zero_stage=2", OFFLOAD],
    "ZeRO-3 + offload (+params)": [*DS, "distributed.zero_stage=3", OFFLOAD, "distributed.offload_params=cpu"],
}
GPU_VARIANTS = {
    "native bf16": ["precision.dtype=bf16"], "ZeRO-2 bf16": ["precision.dtype=bf16", *DS, "distributed.zero_stage=2"],
    "native fp16": ["precision.dtype=fp16"], "ZeRO-2 fp16": ["precision.dtype=fp16", *DS, "distributed.zero_stage=2"],
}


def run(name: str, overrides: list[str], nproc: int, steps: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "trainer", "train", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={out}",
           f"train.max_steps={steps}", *COMMON, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="one GPU, a 1B-shaped model, bf16/fp16 native vs ZeRO-2")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    variants, shape, nproc = (GPU_VARIANTS, GPU_SHAPE, 1) if args.gpu else (CPU_VARIANTS, CPU_SHAPE, 2)
    extra = [] if args.gpu else ["precision.dtype=bf16"]
    print("| variant | peak memory per rank (GiB) | tokens/s | final loss |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(variants.items()):
            rows = run(name, [*shape, *extra, *overrides], nproc, args.steps, Path(tmp) / str(i))
            peak = max(r["peak_mem_bytes"] for r in rows) / 2**30
            speed = statistics.median(r["tokens_per_s"] for r in rows[2:] or rows)
            print(f"| {name} | {peak:.2f} | {speed:,.0f} | {rows[-1]['loss']:.4f} |", flush=True)
            if any(r.get("loss_scale") for r in rows):
                print("|   loss scale by step | " + " ".join(f"{r['loss_scale']:g}" for r in rows)
                      + f" (skipped {rows[-1]['skipped_steps']}) | | |", flush=True)


if __name__ == "__main__":
    main()
