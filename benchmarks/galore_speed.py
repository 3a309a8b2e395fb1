"""Optimizer step time on CPU: our GaLoreAdamW against galore-torch's GaLoreAdamW on the same model and seed.

Both optimizers update their own copy of the same Llama-shaped model (default: the GaLore paper's 60M shape)
from the same seeded gradients, the two alternating step by step so machine noise hits both alike; only
`optimizer.step()` is timed (forward and backward are the same for both). Both use rank 128, scale 0.25,
proj_type std, fp32. A projector refresh (SVD) is timed separately from a plain step, then both are
amortized over update_gap = 200 steps, the paper's setting: (refresh + 199 plain) / 200. Our randomized
SVD (`optimizer.galore.svd: randomized`) gets its own column.

galore-torch is not a dependency of this project. Install it into the benchmark's environment only, with a
constraint file so nothing of ours is upgraded (CPU-STACK.md: its 8-bit optimizer needs CUDA, so only its
32-bit GaLoreAdamW is timed):

    printf 'torch==2.13.0\\ntransformers==5.23.0\\nbitsandbytes==0.50.2\\n' > /tmp/c.txt
    pip install galore-torch -c /tmp/c.txt
    python benchmarks/galore_speed.py [--steps 14 --gap 6] [--threads 1] [--hidden 512 --intermediate 1376 --layers 8]

Without galore-torch the script times ours only and says so.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.optim.galore import GaLoreAdamW
from trainer.optim.lowrank_groups import select_targets

RANK, SCALE, GAP = 128, 0.25, 200


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                        num_attention_heads=args.heads, num_key_value_heads=args.heads))


def split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    targets, _ = select_targets(model, None, RANK)
    return list(targets), [p for p in model.parameters() if p not in targets]


def ours(model: torch.nn.Module, svd: str, gap: int) -> torch.optim.Optimizer:
    targets, rest = split(model)
    return GaLoreAdamW([{"params": targets, "rank": RANK}, {"params": rest}], lr=1e-3, update_gap=gap, scale=SCALE,
                       svd=svd)


def theirs(model: torch.nn.Module, gap: int) -> torch.optim.Optimizer | None:
    try:
        from galore_torch import GaLoreAdamW as PeerAdamW
    except ImportError:
        return None
    targets, rest = split(model)
    return PeerAdamW([{"params": rest}, {"params": targets, "rank": RANK, "update_proj_gap": gap, "scale": SCALE,
                                         "proj_type": "std"}], lr=1e-3, eps=1e-8, no_deprecation_warning=True)


def set_grads(models: list[torch.nn.Module], step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for params in zip(*(m.parameters() for m in models)):
        g = torch.randn(params[0].shape, generator=gen) * 1e-2
        for p in params:
            p.grad = g.clone()


def timed(opt: torch.optim.Optimizer) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Per optimizer: times of refresh steps and of plain steps (steps 0 and 1 warm up and are not counted)."""
    base = build(args)
    gap = args.gap  # refreshes at 0 (warm-up), gap, 2 gap, ...
    names: list[str] = ["ours (exact SVD)", "ours (randomized SVD)"]
    makers: list[Callable[[torch.nn.Module], Any]] = [lambda m: ours(m, "full", gap),
                                                      lambda m: ours(m, "randomized", gap)]
    if theirs(copy.deepcopy(base), gap) is not None:
        names.insert(1, "galore-torch")
        makers.insert(1, lambda m: theirs(m, gap))
    models = [copy.deepcopy(base) for _ in names]
    opts = [make(m) for make, m in zip(makers, models)]
    times: dict[str, dict[str, list[float]]] = {n: {"refresh": [], "plain": []} for n in names}
    for step in range(args.steps):
        set_grads(models, step)
        line = []
        for name, opt in zip(names, opts):
            t = timed(opt)
            line.append(f"{name} {t:.3f} s")
            if step % gap == 0 and step > 0:
                times[name]["refresh"].append(t)
            elif step > 1:
                times[name]["plain"].append(t)
        print(f"step {step}{' (refresh)' if step % gap == 0 else ''}: {', '.join(line)}", flush=True)
    if "galore-torch" in names:
        agreement()
    return times


def agreement() -> None:
    """Same math? Both optimizers with proj_type left (their std breaks the tie of square matrices the other
    way) on a small model for 5 steps of one projector period: the overlap of the projected subspaces, and the
    relative difference of the weight change. Adam's first steps are close to sign(gradient), so a near-zero
    projected element whose sign differs by rounding changes the update by a percent; the overlap shows the
    projectors are the same. (A singular vector's sign is arbitrary; within one period a flip cancels out.)"""
    from galore_torch import GaLoreAdamW as PeerAdamW

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))
    models = [copy.deepcopy(base) for _ in range(2)]
    split_a, split_b = split(models[0]), split(models[1])
    mine = GaLoreAdamW([{"params": split_a[0], "rank": 64}, {"params": split_a[1]}], lr=1e-3, scale=SCALE,
                       proj_type="left")
    peer = PeerAdamW([{"params": split_b[1]}, {"params": split_b[0], "rank": 64, "update_proj_gap": GAP,
                                               "scale": SCALE, "proj_type": "left"}], lr=1e-3, eps=1e-8,
                     no_deprecation_warning=True)
    for step in range(5):
        set_grads(models, step)
        mine.step()
        peer.step()
    overlap = min(torch.linalg.matrix_norm(mine.state[p]["proj_left"].T @ peer.state[q]["projector"].ortho_matrix)
                  .item() ** 2 / 64 for p, q in zip(split_a[0], split_b[0]))
    change = [((a - b).norm() / (a - w).norm()).item()
              for a, b, w in zip(models[0].parameters(), models[1].parameters(), base.parameters())]
    print(f"agreement with galore-torch (proj_type left, 5 steps): projected subspaces overlap {overlap:.6f} "
          f"(1 = same); weight change differs by at most {max(change):.1e} (median tensor "
          f"{statistics.median(change):.1e})")


def report(times: dict[str, dict[str, list[float]]]) -> None:
    rows = {}
    for name, t in times.items():
        refresh, plain = statistics.median(t["refresh"]), statistics.median(t["plain"])
        rows[name] = (refresh, plain, (refresh + (GAP - 1) * plain) / GAP)
    print("\n| optimizer | refresh step (SVD) | plain step | per step, update_gap 200 |")
    print("|---|---:|---:|---:|")
    for name, (r, p, a) in rows.items():
        print(f"| {name} | {r:.3f} s | {p * 1e3:.1f} ms | {a * 1e3:.1f} ms |")
    if "galore-torch" in rows:
        peer = rows["galore-torch"]
        for name in (n for n in rows if n.startswith("ours")):
            r, p, a = rows[name]
            print(f"{name}: galore-torch time / ours = refresh {peer[0] / r:.2f}x, plain {peer[1] / p:.2f}x, "
                  f"per step at update_gap 200 {peer[2] / a:.2f}x (> 1: ours faster)")
    else:
        print("galore-torch is not installed: its column is skipped (see the module docstring to install it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--gap", type=int, default=6, help="refresh every this many steps while measuring")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Llama shape hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
          f"{args.vocab}; rank {RANK}; {args.threads} threads; torch {torch.__version__}")
    report(measure(args))


if __name__ == "__main__":
    main()
