"""Packing on fine-tuning data: padded rows (`data.packing: none`), `concat` and `isolated`, on the shared Alpaca and
ShareGPT (tool-call chats) demo data, CPU, in one run.

    python benchmarks/packing.py                          # ../shared/data, seq_len 1024, 8 timed steps
    python benchmarks/packing.py --steps 4 --seq-len 512  # a quicker look
    python benchmarks/packing.py --offload                # also isolated with checkpointing, with and without
                                                          # activation offload (a GPU shows the gain)

Each configuration trains a small Llama (hidden 256, 4 layers, byte-level tokenizer, fp32, sdpa attention) through
the real loop (trainer.run.loop.setup / train_step) in a fresh process, so its peak RSS is its own. Columns:
- padding: the share of the batches' positions that are padding (1 - fill);
- real tokens/s: tokens that are not padding, per second of training (the first 2 steps are warm-up, not timed);
- peak RSS: the process's peak resident memory, MiB;
- steps/epoch: optimizer steps to see every example once (packing puts several in a row).
`concat` is fast and full but lets examples attend to each other (cross-contamination); `isolated` is as full, with
the loss of the examples run one by one (tests/test_packing.py). On a GPU run it with FlashAttention-2 installed to
use the variable-length path instead of the block-diagonal mask.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {"alpaca": ("alpaca_en_demo.json", "alpaca"), "sharegpt": ("glaive_toolcall_en_demo.json", "chat")}
MODES = ("none", "concat", "isolated")


MEMORY = {"plain": [], "checkpointing": ["model.gradient_checkpointing=true"],
          "offload": ["model.gradient_checkpointing=true", "model.activation_offload=true"]}
LABELS = {"plain": "", "checkpointing": " + checkpointing", "offload": " + checkpointing + activation offload"}


def overrides(dataset: str, mode: str, seq_len: int, steps: int, out: Path, memory: str) -> list[str]:
    file, fmt = DATASETS[dataset]
    return [f"output_dir={out}", f"data.source={SHARED / file}", f"data.format={fmt}", f"data.packing={mode}",
            f"data.seq_len={seq_len}", "data.too_long=truncate",  # the chats longer than seq_len stay, as measured
            "data.eval_fraction=0", "model.config.hidden_size=256",
            "model.config.intermediate_size=688", "model.config.num_hidden_layers=4",
            "model.config.num_attention_heads=4", "model.config.num_key_value_heads=4",
            f"model.config.max_position_embeddings={seq_len}", "model.attn_implementation=sdpa",
            "train.micro_batch_size=4", f"train.max_steps={steps}", "train.eval_every_steps=0",
            "optimizer.warmup_steps=0", "logging.progress_bar=false", "logging.plot=false",
            "checkpoint.every_steps=0", "checkpoint.save_final=false", *MEMORY[memory]]


def measure(dataset: str, mode: str, seq_len: int, steps: int, memory: str) -> dict[str, float]:
    """One configuration, in this process: fill, real tokens/s over the timed steps, peak RSS."""
    import torch

    from trainer.distributed import distributed_context
    from trainer.run.loop import setup, train_step
    from trainer.run.metrics import peak_memory_bytes
    from trainer.recipe.resolve import resolve

    with tempfile.TemporaryDirectory() as tmp:
        run = resolve(ROOT / "recipes" / "quickstart.yaml", overrides(dataset, mode, seq_len, steps + 2,
                                                                      Path(tmp) / "run", memory))
        with distributed_context() as dist:
            t = setup(run, dist)
            position, real, padded, seconds = t.state.position, 0, 0, 0.0
            for step in range(steps + 2):
                batches, position = t.data.step_batches(position)
                started = time.perf_counter()
                outcome = train_step(t, batches)
                t.state.step += 1
                if step >= 2:
                    seconds += time.perf_counter() - started
                    real += outcome.tokens
                    padded += sum(b.input_ids.numel() for b in batches)
            t.metrics.close()
            steps_per_epoch = t.data.steps_per_epoch
    return {"padding": 1 - real / padded, "tokens_per_s": real / seconds,
            "peak_rss_mib": peak_memory_bytes(torch.device("cpu")) / 2**20,  # the process's RSS, also beside a GPU
            "steps_per_epoch": steps_per_epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--offload", action="store_true",
                        help="add isolated packing with checkpointing, with and without activation offload")
    parser.add_argument("--measure", nargs=3, metavar=("DATASET", "MODE", "MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        dataset, mode, memory = args.measure
        print(json.dumps(measure(dataset, mode, args.seq_len, args.steps, memory)))
        return
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this benchmark reads the shared demo data beside the project")
    configs = [(d, m, "plain") for d in DATASETS for m in MODES]
    configs += [(d, "isolated", m) for d in DATASETS for m in ("checkpointing", "offload")] if args.offload else []
    print(f"seq_len {args.seq_len}, micro-batch 4, {args.steps} timed steps, hidden 256 x 4 layers, fp32, CPU\n")
    print("| data | packing | padding | real tokens/s | peak RSS MiB | steps/epoch |")
    print("|---|---|---|---|---|---|")
    for dataset, mode, memory in configs:
        cmd = [sys.executable, __file__, "--measure", dataset, mode, memory,
               "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"{dataset} {mode} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        label = mode + LABELS[memory]
        print(f"| {dataset} | {label} | {r['padding']:.1%} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} | "
              f"{r['steps_per_epoch']} |", flush=True)


if __name__ == "__main__":
    main()
