"""The memory plan against a real GPU: each 24 GB recipe trained for a few steps on one GPU capped at 24 GiB
(`torch.cuda.set_per_process_memory_fraction`), with the plan's numbers beside CUDA's peak allocated and peak
reserved bytes.

What is changed in each recipe, and why it does not change the memory: random weights of the recipe's exact
architecture (saved once to a local directory: no download; adapters need a model directory), the byte-level
tokenizer (its ids fit in every vocabulary, and the embeddings keep the model's size), the built-in text corpus
packed into full blocks of `data.seq_len` tokens (the plan's assumption; Alpaca rows are packed too in these
recipes), a few steps with two micro-batches per step, no checkpoints. Multi-GPU recipes run at one rank, and
are planned at one rank.

Compared: the plan's peak without its CUDA-context allowance (context memory is not in CUDA's counters) against
`max_memory_allocated`, and the plan's peak with the 8% fragmentation allowance against `max_memory_reserved`.

    python benchmarks/plan_vs_measured.py                       # on a GPU: the single-GPU recipes + 1B ZeRO-2
    python benchmarks/plan_vs_measured.py --tiny                # the same code on CPU, tiny shapes (smoke test;
                                                                # measured = peak RSS, not comparable)

Run it from the repository root; with --models DIR the random base models are kept between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["llama3-8b-qlora", "llama3-8b-lora", "llama-7b-galore-pretrain", "llama-1b-zero2"]
GIB = 2**30
COMMON = ["model.tokenizer=byte", "data.source=builtin:python_stdlib", "data.format=text", "data.packing=true",
          "data.max_bytes=4000000", "data.eval_fraction=0", "train.max_steps=3", "train.global_batch_size=null",
          "train.grad_accum_steps=2", "train.eval_every_steps=0", "checkpoint.every_steps=0",
          "checkpoint.save_final=false", "checkpoint.resume=never", "logging.progress_bar=false",
          "logging.plot=false", "logging.wandb.project=null"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}
TINY_RUN = ["data.seq_len=64", "data.max_bytes=200000", "train.micro_batch_size=2"]


def recipe_path(name: str) -> Path:
    return ROOT / "recipes" / "24gb" / f"{name}.yaml"


def base_model(name_or_path: str, directory: Path, tiny: bool) -> Path:
    """Random weights of the recipe's architecture (bf16), saved once per architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.recipe.known_models import KNOWN

    target = directory / name_or_path.replace("/", "--")
    if (target / "config.json").exists():
        return target
    arch = {**KNOWN[name_or_path], **(TINY if tiny else {})}
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    del model
    return target


def overrides_for(name: str, models: Path, tiny: bool, out: Path) -> list[str]:
    from trainer.recipe.read import load_recipe

    cfg = load_recipe(recipe_path(name), [])[0]
    extra = [*COMMON, f"output_dir={out}"]
    if cfg.model.name_or_path:
        extra.append(f"model.name_or_path={base_model(cfg.model.name_or_path, models, tiny)}")
    elif tiny:
        extra += [f"model.config.{k}={v}" for k, v in TINY.items()]
    if tiny:
        extra += TINY_RUN
        if cfg.optimizer.name.startswith("galore"):
            extra.append("optimizer.galore.rank=16")
    return extra


def measure_one(name: str, overrides: list[str], cap_gib: float) -> dict[str, float]:
    """In this process: plan, cap, train, read CUDA's peaks."""
    import torch

    from trainer.logs import setup_console
    from trainer.distributed import distributed_context
    from trainer.run.loop import run_loop, setup
    from trainer.run.metrics import peak_memory_bytes
    from trainer.plan.peak import CUDA_CONTEXT, plan
    from trainer.recipe.resolve import resolve

    setup_console(0, 1)
    cfg = resolve(recipe_path(name), overrides, world_size=1)
    p = plan(cfg, gpu_bytes=int(cap_gib * GIB))
    allowance = next(i.bytes for i in p.items if i.name.startswith("CUDA context"))
    result = {"planned_peak": p.peak_bytes / GIB, "planned_allocated": (p.peak_bytes - allowance) / GIB,
              "planned_reserved": (p.peak_bytes - CUDA_CONTEXT) / GIB}
    cuda = torch.cuda.is_available()
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    with distributed_context() as dist:
        run = setup(cfg, dist)
        try:
            run_loop(run)
        finally:
            run.metrics.close()
    if cuda:
        result.update(allocated=torch.cuda.max_memory_allocated() / GIB,
                      reserved=torch.cuda.max_memory_reserved() / GIB)
    else:
        result.update(allocated=peak_memory_bytes(torch.device("cpu")) / GIB, reserved=float("nan"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=RECIPES, choices=RECIPES)
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, not the plan")
    parser.add_argument("--models", type=Path, default=None, help="where the random base models are saved")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one recipe in a fresh process (fresh CUDA peaks and cap)
        result = measure_one(args.one, json.loads(args.overrides), args.cap_gib)
        Path(args.out).write_text(json.dumps(result))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or Path(tmp, "models")
        for name in args.recipes:
            overrides = overrides_for(name, models, args.tiny, Path(tmp, "runs", name))
            out = Path(tmp, f"{name}.json")
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--overrides", json.dumps(overrides),
                                   "--out", str(out), "--cap-gib", str(args.cap_gib)], cwd=ROOT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append((name, None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"))
                continue
            rows.append((name, json.loads(out.read_text()), ""))
    unit = "GiB; CPU smoke test: measured = peak RSS" if args.tiny else "GiB"
    print(f"\nplanned vs measured, one GPU capped at {args.cap_gib:g} GiB ({unit}; planned allocated = plan peak "
          "without the context and fragmentation allowance)\n")
    print(f"{'recipe':26} {'plan peak':>9} {'plan alloc':>10} {'max alloc':>10} {'error':>7} "
          f"{'plan resv':>10} {'max resv':>9} {'error':>7}")
    for name, r, why in rows:
        if r is None:
            print(f"{name:26} failed: {why}")
            continue
        err_a = (r["planned_allocated"] - r["allocated"]) / r["allocated"]
        err_r = (r["planned_reserved"] - r["reserved"]) / r["reserved"] if r["reserved"] == r["reserved"] else 0.0
        print(f"{name:26} {r['planned_peak']:9.2f} {r['planned_allocated']:10.2f} {r['allocated']:10.2f} "
              f"{err_a:+7.1%} {r['planned_reserved']:10.2f} {r['reserved']:9.2f} {err_r:+7.1%}")


if __name__ == "__main__":
    main()
