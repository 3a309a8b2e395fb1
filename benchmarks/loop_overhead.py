"""Steps/s of trainer's loop against a minimal hand-written PyTorch loop doing the same work.

Same model (same config and seed), same batches, same AdamW, same clipping and LR schedule. Each side warms up,
then is timed over the same number of steps; the two alternate for several rounds and the median is reported.

    python benchmarks/loop_overhead.py [--steps 30] [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from trainer.data.batches import DataPosition
from trainer.distributed import distributed_context
from trainer.run.loop import run_loop, setup, token_loss_sum
from trainer.model.build import build_model
from trainer.optim import build_optimizer, build_scheduler
from trainer.recipe.resolve import resolve
from trainer.model.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["model.config.hidden_size=256", "model.config.intermediate_size=688", "model.config.num_hidden_layers=4",
         "data.seq_len=256", "train.micro_batch_size=8", "train.eval_every_steps=0", "data.eval_fraction=0",
         "logging.progress_bar=false", "logging.plot=false", "checkpoint.every_steps=0",
         "checkpoint.save_final=false", "checkpoint.resume=never"]


def time_ours(overrides: list[str], warmup: int, steps: int, out: Path) -> float:
    resolved = resolve(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={out}", *SHAPE, *overrides,
                                                              f"train.max_steps={warmup + steps}"])
    with distributed_context() as dist:
        run = setup(resolved, dist)
        run_loop(run, until_step=warmup)
        t0 = time.perf_counter()
        run_loop(run)
        elapsed = time.perf_counter() - t0
        run.metrics.close()
    return steps / elapsed


def time_plain(overrides: list[str], warmup: int, steps: int) -> float:
    """The same step written directly in PyTorch, batches prepared up front."""
    from trainer.data.batches import TrainData

    run = resolve(ROOT / "recipes" / "quickstart.yaml", [*SHAPE, *overrides, f"train.max_steps={warmup + steps}"])
    cfg = run.recipe
    tok = build_tokenizer(cfg.model)
    data = TrainData(cfg.data, tok, seed=cfg.train.seed, rank=0, world_size=1,
                     micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=1)
    pos, batches = DataPosition(), []
    for _ in range(warmup + steps):
        (b,), pos = data.step_batches(pos)
        batches.append((b.input_ids, b.attention_mask, b.labels))
    model = build_model(run, tok)
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_scheduler(opt, cfg.optimizer, cfg.train.max_steps)
    model.train()
    t0 = 0.0
    for i, (ids, mask, labels) in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = token_loss_sum(logits, labels) / (labels[:, 1:] != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/trainer-bench-loop"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ours, plain = [], []
    for r in range(args.rounds):
        plain.append(time_plain(args.overrides, args.warmup, args.steps))
        ours.append(time_ours(args.overrides, args.warmup, args.steps, args.out / f"round{r}"))
        print(f"round {r + 1}: plain {plain[-1]:.3f} steps/s, trainer {ours[-1]:.3f} steps/s", flush=True)
    mo, mp = statistics.median(ours), statistics.median(plain)
    print(f"\nmodel {' '.join(SHAPE[:4] + args.overrides)}; {args.steps} timed steps, median of {args.rounds} rounds;"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| loop | steps/s | relative |\n|---|---|---|\n| plain PyTorch | {mp:.3f} | 1.000 |\n"
          f"| trainer | {mo:.3f} | {mo / mp:.3f} |")
    print(f"overhead: {(mp / mo - 1) * 100:+.1f}% time per step")


if __name__ == "__main__":
    main()
