"""Optimizer step time on CPU: our GaLoreAdamW against galore-torch's GaLoreAdamW on the same model and seed, and
the projector refresh alone (exact SVD, randomized SVD, subspace iteration from the previous projector, and
galore-torch's) on real gradients.

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

The refresh table needs gradients with the structure of training, not random ones (a random matrix has no
dominant subspace to keep): the model trains with AdamW on tests/data/shakespeare.txt (bytes as tokens) for
--warm steps, the gradient then gives each target's previous projector (full SVD), and --refresh-gap steps later
the next gradient is refreshed by every method, matrix by matrix, each timed alone. The subspace column includes
the full SVDs it falls back to (when the previous projector held too little of the gradient's energy), and
"energy" is the share of the gradient's energy the new projector captures, relative to the exact SVD's (1 = as
good).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import torch
from llama_shape import add_shape_args, llama_of
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.optim.galore import (
    SUBSPACE_ITERS,
    SUBSPACE_MIN_KEPT,
    GaLoreAdamW,
    projection_side,
    subspace_iteration,
    top_singular_vectors,
)
from trainer.optim.lowrank_groups import select_targets

RANK, SCALE, GAP = 128, 0.25, 200


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
    base = llama_of(args)
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


def report(times: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Prints the step table; returns the median plain step of each optimizer."""
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
    return {name: p for name, (_, p, _) in rows.items()}


def shakespeare_batches(args: argparse.Namespace) -> Any:
    """Batches of --batch x 128 byte tokens from the test data, forever."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "tests" / "data" / "shakespeare.txt").read_bytes()
    ids = torch.tensor(list(text[:2_000_000]), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    while True:
        starts = torch.randint(0, len(ids) - 129, (args.batch,), generator=gen)
        yield torch.stack([ids[s:s + 128] for s in starts.tolist()])


def training_gradients(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gradient at step --warm, gradient --refresh-gap steps later) of every GaLore target, from AdamW training."""
    model = llama_of(args)
    targets, _ = split(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = shakespeare_batches(args)
    grads: list[list[torch.Tensor]] = []
    for step in range(args.warm + args.refresh_gap + 1):
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if step in (args.warm, args.warm + args.refresh_gap):
            grads.append([p.grad.detach().clone() for p in targets])
            print(f"gradients at step {step}: loss {loss.item():.3f}", flush=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return list(zip(grads[0], grads[1]))


def clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def refresh_one(old: torch.Tensor, new: torch.Tensor, peer: Any) -> dict[str, tuple[float, float]]:
    """{method: (seconds, energy relative to the exact SVD)} for one target's refresh."""
    side = projection_side(new.shape, "std")
    g = new if side == "left" else new.T  # the projected side's basis is a left basis of g
    prev, _ = top_singular_vectors(old if side == "left" else old.T, RANK, "full", 0)
    energy = lambda basis: float((basis.T @ g).norm() ** 2)  # noqa: E731
    t_full, (exact, _) = clock(lambda: top_singular_vectors(g, RANK, "full", 0))
    best = energy(exact)
    t_rand, (fast, _) = clock(lambda: top_singular_vectors(g, RANK, "randomized", 1))
    t_sub, (warm, held) = clock(lambda: subspace_iteration(g, prev))
    kept = held >= SUBSPACE_MIN_KEPT
    if not kept:  # what the optimizer does then: a full SVD as well
        t_more, (warm, _) = clock(lambda: top_singular_vectors(g, RANK, "full", 0))
        t_sub += t_more
    out = {"ours (exact SVD)": (t_full, 1.0), "ours (randomized SVD)": (t_rand, energy(fast) / best),
           "ours (subspace)": (t_sub, energy(warm) / best), "kept": (float(kept), 0.0)}
    if peer is not None:
        t_peer, basis = clock(lambda: peer.get_orthogonal_matrix(new, RANK, "left" if side == "left" else "right"))
        basis = basis if side == "left" else basis.T
        out["galore-torch"] = (t_peer, energy(basis) / best)
    return out


def refresh_report(args: argparse.Namespace, plain: dict[str, float]) -> None:
    """The refresh table: all targets' refresh time per method, speed-up against the exact SVD, and the step
    amortized over update_gap 200 with each method's refresh (plain step times from the step benchmark)."""
    try:
        from galore_torch.galore_projector import GaLoreProjector

        peer: Any = GaLoreProjector(RANK, proj_type="std")
    except ImportError:
        peer = None
    pairs = training_gradients(args)
    rows = [refresh_one(a, b, peer) for a, b in pairs]
    kept = int(sum(r.pop("kept")[0] for r in rows))
    full = sum(r["ours (exact SVD)"][0] for r in rows)
    print(f"\nrefresh of {len(rows)} matrices at rank {RANK} from real gradients {args.refresh_gap} steps apart; "
          f"subspace iteration ({SUBSPACE_ITERS} power step) kept the warm start for {kept} of {len(rows)} (the "
          f"previous projector held >= {SUBSPACE_MIN_KEPT:.0%} of the energy), the rest fell back to a full SVD\n")
    print("| method | refresh, all matrices | vs exact SVD | energy vs exact (mean, min) | per step, update_gap 200 |")
    print("|---|---:|---:|---:|---:|")
    for name in rows[0]:
        seconds = sum(r[name][0] for r in rows)
        energies = [r[name][1] for r in rows]
        base = plain.get("galore-torch" if name == "galore-torch" else "ours (exact SVD)")
        step = f"{(seconds + (GAP - 1) * base) / GAP * 1e3:.1f} ms" if base is not None else "-"
        print(f"| {name} | {seconds:.3f} s | {full / seconds:.1f}x | {statistics.mean(energies):.4f}, "
              f"{min(energies):.4f} | {step} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--gap", type=int, default=6, help="refresh every this many steps while measuring")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_shape_args(ap, hidden=512, intermediate=1376, layers=8, heads=8)
    ap.add_argument("--warm", type=int, default=10, help="AdamW steps before the first gradient (refresh table)")
    ap.add_argument("--refresh-gap", type=int, default=10, help="steps between the two gradients (refresh table)")
    ap.add_argument("--batch", type=int, default=4, help="sequences of 128 tokens per step (refresh table)")
    ap.add_argument("--skip-steps", action="store_true", help="only the refresh table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Llama shape hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
          f"{args.vocab}; rank {RANK}; {args.threads} threads; torch {torch.__version__}")
    plain = {} if args.skip_steps else report(measure(args))
    refresh_report(args, plain)


if __name__ == "__main__":
    main()
