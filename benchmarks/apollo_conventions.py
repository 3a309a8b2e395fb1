"""APOLLO's two conventions where this project and the authors' apollo-torch (1.0.3) once differed, measured on real
training: which channels of a square matrix get a scale each (rows, as apollo-torch's `std` projection does for
m >= n, or columns), and where the norm-growth limiter measures the update (before Adam's bias correction, as
apollo-torch does, or after it). Wide and tall matrices are projected on their smaller side in both.

A tiny Llama from config (byte tokenizer, hidden 64, 2 layers, kv heads = heads, so q/k/v/o are 64 x 64) trains on
tests/data/shakespeare.txt (its first 90%) with APOLLO (rank 16) and APOLLO-Mini (rank 1, tensor-wise) built from
the recipe defaults the trainer uses (trainer/optim/lowrank_groups.py), under each pair of conventions, for several
seeds (the seed draws the initial weights and the batches; every convention of a seed sees the same ones). The
held-out loss is the mean over every 128-token window of the last 10% of the file, after the last step. AdamW rows
give the scale. One thread; 10-20 s per run (36 runs by default: 6-12 minutes).

    PYTHONPATH=. python benchmarks/apollo_conventions.py [--steps 600] [--seeds 0 1 2 3] [--optimizers apollo_adamw]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.optim import lr_factor
from trainer.optim.apollo import ApolloAdamW
from trainer.optim.lowrank_groups import lowrank_defaults, lowrank_param_groups
from trainer.schema import ApolloConfig, OptimizerConfig
from trainer.tokenizer import byte_tokenizer

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "shakespeare.txt"
OLD = ("columns", "after_correction")  # this project's conventions before issue 25
REFERENCE = ("rows", "before_correction")  # apollo-torch 1.0.3's


def token_splits(held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte ids of the Shakespeare test file: byte value = token id in the byte tokenizer."""
    ids = torch.frombuffer(bytearray(DATA.read_bytes()), dtype=torch.uint8).long()
    cut = int(len(ids) * (1 - held_out))
    return ids[:cut], ids[cut:]


def model_of(args: argparse.Namespace, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(byte_tokenizer()), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def optimizer_config(args: argparse.Namespace, name: str) -> OptimizerConfig:
    apollo = ApolloConfig(rank=args.rank) if name == "apollo_adamw" else ApolloConfig()  # mini: rank 1
    return OptimizerConfig(name=name, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
                           apollo=apollo)


def optimizer_of(model: LlamaForCausalLM, cfg: OptimizerConfig, square_channels: str | None,
                 limiter_measures: str | None) -> torch.optim.Optimizer:
    """The trainer's optimizer for cfg (AdamW: torch's, as the trainer builds it), with the conventions given."""
    if cfg.name == "adamw":
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas),
                                 eps=cfg.eps)
    groups, names = lowrank_param_groups(model, cfg, announce=False)
    opt = ApolloAdamW(groups, **lowrank_defaults(cfg), square_channels=square_channels,
                      limiter_measures=limiter_measures)
    opt.param_names = names
    return opt


def held_out_loss(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int, batch: int) -> float:
    """Mean next-token loss over every whole window of seq_len tokens of `ids` (side by side)."""
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch):
            loss = model(input_ids=chunk, labels=chunk).loss  # transformers shifts the labels
            total += float(loss) * len(chunk)
            count += len(chunk)
    model.train()
    return total / count


def train_once(args: argparse.Namespace, name: str, seed: int, square_channels: str | None,
               limiter_measures: str | None, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Held-out loss after args.steps steps of one run."""
    train, held = data
    model = model_of(args, seed)
    cfg = optimizer_config(args, name)
    opt = optimizer_of(model, cfg, square_channels, limiter_measures)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, args.steps))
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq_len, (args.batch,), generator=gen)
        batch = torch.stack([train[s: s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    return held_out_loss(model, held, args.seq_len, args.batch)


def runs(args: argparse.Namespace) -> list[tuple[str, str | None, str | None]]:
    """(optimizer, square channels, limiter point) of every row: each APOLLO under each pair, then AdamW."""
    pairs = [OLD, ("columns", "before_correction"), ("rows", "after_correction"), REFERENCE]
    out: list[tuple[str, str | None, str | None]] = [(name, *pair) for name in args.optimizers for pair in pairs]
    if not args.no_adamw:
        out.append(("adamw", None, None))
    return out


def print_table(results: dict[tuple[str, str | None, str | None], list[float]], seeds: list[int]) -> None:
    print(f"\n| optimizer | square matrices scaled per | limiter measures | {' | '.join(f'seed {s}' for s in seeds)} "
          "| mean | vs old (lower in) |")
    print("|---|---|---|" + "---:|" * (len(seeds) + 2))
    for (name, square, point), losses in results.items():
        old = results.get((name, *OLD))
        if old is None or (square, point) == OLD:
            versus = "-"
        else:
            diffs = [a - b for a, b in zip(losses, old)]
            versus = f"{statistics.mean(diffs):+.4f} ({sum(d < 0 for d in diffs)} of {len(diffs)})"
        label = f"{square[:-1] if square else '-'} | {point.replace('_', ' ') if point else '-'}"
        cells = " | ".join(f"{x:.4f}" for x in losses)
        print(f"| {name} | {label} | {cells} | {statistics.mean(losses):.4f} | {versus} |")
    print(f"\nold: {OLD[0]}, limiter {OLD[1]} (this project before issue 25); apollo-torch 1.0.3: {REFERENCE[0]}, "
          f"limiter {REFERENCE[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--optimizers", nargs="+", default=["apollo_adamw", "apollo_mini"],
                    choices=["apollo_adamw", "apollo_mini"])
    ap.add_argument("--no-adamw", action="store_true", help="leave out the AdamW rows")
    ap.add_argument("--rank", type=int, default=16, help="APOLLO's rank (APOLLO-Mini: 1)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=176)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = token_splits()
    print(f"tiny Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} "
          f"heads; {args.steps} steps of {args.batch} x {args.seq_len} bytes of {DATA.name}, lr {args.lr} cosine, "
          f"warmup {args.warmup}, betas {tuple(OptimizerConfig().betas)}; held-out: {len(data[1])} bytes; "
          f"{args.threads} thread(s)")
    results: dict[tuple[str, str | None, str | None], list[float]] = {}
    for name, square, point in runs(args):
        losses = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            losses.append(train_once(args, name, seed, square, point, data))
            print(f"{name} {square or '-'} {point or '-'} seed {seed}: {losses[-1]:.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        results[(name, square, point)] = losses
    print_table(results, args.seeds)


if __name__ == "__main__":
    main()
