"""Optimizer step time on CPU for the whole menu: AdamW, 8-bit AdamW, GaLore, 8-bit GaLore, APOLLO and
APOLLO-Mini (ours), and the APOLLO authors' apollo-torch (APOLLOAdamW) at the same settings, on one Llama shape.

Each optimizer updates its own copy of the same model (default: the GaLore paper's 60M shape) from the same
seeded gradients; only `optimizer.step()` is timed (forward and backward are the same for all). The optimizers
take turns in rounds (each creates its model, steps --steps times, and is freed, so one model's memory at a
time), and the median over all rounds of the steps after the first two is reported. GaLore's and APOLLO's
refreshes are kept out of the measured steps (update_gap 200): GaLore's amortized refresh is in
benchmarks/galore_speed.py; APOLLO's projection is regenerated from its seed at every step, which is timed here.
Settings: lr 1e-3; GaLore rank 128, scale 0.25; APOLLO rank 128, channel-wise, scale 1; APOLLO-Mini rank 1,
tensor-wise, scale sqrt(128); both APOLLOs with the norm-growth limiter.

apollo-torch is not a dependency of this project: install it into the benchmark's environment only, with the
torch pin as a constraint (`PIP_CONSTRAINT=... pip install apollo-torch==1.0.3`). Without it its rows are skipped.

    PYTHONPATH=. python benchmarks/apollo_speed.py [--threads 1] [--rounds 2 --steps 6]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Callable

import torch
from llama_shape import add_shape_args, llama_of

from trainer.optim.apollo import ApolloAdamW
from trainer.optim.galore import GaLoreAdamW
from trainer.optim.lowrank_groups import select_targets

GALORE_RANK, APOLLO_RANK = 128, 128


def split(model: torch.nn.Module, rank: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    targets, _ = select_targets(model, None, rank)
    return list(targets), [p for p in model.parameters() if p not in targets]


def ours_galore(model: torch.nn.Module, bits: int) -> torch.optim.Optimizer:
    targets, rest = split(model, GALORE_RANK)
    return GaLoreAdamW([{"params": targets, "rank": GALORE_RANK}, {"params": rest}], lr=1e-3, bits=bits)


def ours_apollo(model: torch.nn.Module, rank: int, scale_type: str, scale: float) -> torch.optim.Optimizer:
    targets, rest = split(model, rank)
    opt = ApolloAdamW([{"params": targets, "rank": rank}, {"params": rest}], lr=1e-3, scale=scale,
                      scale_type=scale_type)
    opt.param_names = {p: n for n, p in model.named_parameters()}
    return opt


def peer_apollo(model: torch.nn.Module, rank: int, scale_type: str, scale: float) -> torch.optim.Optimizer:
    from apollo_torch import APOLLOAdamW

    targets, rest = split(model, rank)
    return APOLLOAdamW([{"params": rest}, {"params": targets, "rank": rank, "proj": "random", "scale_type": scale_type,
                                           "scale": scale ** 2, "update_proj_gap": 200, "proj_type": "std"}], lr=1e-3)


def makers() -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    """Every optimizer of the table that can run here."""
    import bitsandbytes as bnb

    out: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
        "AdamW (torch)": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        "8-bit AdamW (bitsandbytes)": lambda m: bnb.optim.AdamW8bit(m.parameters(), lr=1e-3),
        "GaLore (ours)": lambda m: ours_galore(m, 32),
        "8-bit GaLore (ours)": lambda m: ours_galore(m, 8),
        "APOLLO (ours)": lambda m: ours_apollo(m, APOLLO_RANK, "channel", 1.0),
        "APOLLO-Mini (ours)": lambda m: ours_apollo(m, 1, "tensor", math.sqrt(128)),
    }
    try:
        import apollo_torch  # noqa: F401
    except ImportError:
        print("apollo-torch is not installed: its rows are skipped (see the module docstring)")
        return out
    out["APOLLO (apollo-torch)"] = lambda m: peer_apollo(m, APOLLO_RANK, "channel", 1.0)
    out["APOLLO-Mini (apollo-torch)"] = lambda m: peer_apollo(m, 1, "tensor", math.sqrt(128))
    return out


def set_grads(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


def one_round(args: argparse.Namespace, name: str, make: Callable[[torch.nn.Module], Any]) -> list[float]:
    """Step times of one optimizer on a fresh model, after its first two steps."""
    model = llama_of(args)
    opt = make(model)
    times = []
    for step in range(args.steps):
        set_grads(model, step)
        t0 = time.perf_counter()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_shape_args(ap, hidden=512, intermediate=1376, layers=8, heads=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Llama shape hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
          f"{args.vocab}; {args.threads} threads; torch {torch.__version__}")
    options = makers()
    times: dict[str, list[float]] = {name: [] for name in options}
    for r in range(args.rounds):
        for name, make in options.items():
            times[name] += one_round(args, name, make)
            print(f"round {r + 1}: {name} {statistics.median(times[name]) * 1e3:.1f} ms", flush=True)
    base = statistics.median(times["AdamW (torch)"])
    print("\n| optimizer | step (median) | vs AdamW |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1e3:.1f} ms | {statistics.median(t) / base:.2f}x |")


if __name__ == "__main__":
    main()
