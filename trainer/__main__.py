"""Command line: `python -m trainer train|validate RECIPE [dotted.key=value ...]`. Thin: parse, then call."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import warnings
from typing import Callable

from trainer.config import Config, ConfigError, dump_recipe, load_recipe

EXIT_CONFIG = 2
EXIT_RUNTIME = 1

USAGE = """python -m trainer VERB RECIPE [key=value ...]

verbs:
  train      train with a recipe (one process, or one of many under torchrun)
  validate   check a recipe and its overrides without building anything; print the resolved recipe
  plan       predict the memory per GPU before launch, and what to change if it does not fit:
             python -m trainer plan RECIPE [key=value ...] [--world-size N] [--gpu-memory 24GiB] [--json]
  export     write a Hugging Face model directory from a run or checkpoint:
             python -m trainer export RUN_OR_CHECKPOINT --out DIR [--dtype bf16] [--adapter-only | --merge]

overrides are dotted keys after the recipe, parsed as YAML scalars; `null` clears a value:
  python -m trainer train recipes/quickstart.yaml train.max_steps=50 optimizer.lr=3e-4
  torchrun --nproc_per_node=2 -m trainer train recipes/quickstart.yaml
"""


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere; quiet the libraries' chatter."""
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank{rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format=f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("datasets", "transformers", "torch.distributed", "bitsandbytes", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", usage=USAGE, add_help=True,
                                description="Memory-efficient LLM training from a YAML recipe.")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, text in (("train", "train with a recipe"), ("validate", "check a recipe without building anything")):
        s = sub.add_parser(verb, help=text, description=text)
        s.add_argument("recipe", help="path of a YAML recipe")
        s.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
        if verb == "validate":
            s.add_argument("--world-size", type=int, default=None, help="ranks to check batch sizes for")
        if verb == "train":
            s.add_argument("--force", action="store_true",
                           help="start even when the memory plan predicts more than the GPU's free memory")
    s = sub.add_parser("plan", help="predict memory per GPU", description="Predict the memory per GPU of a "
                       "recipe before launch (model shapes on the meta device; nothing is loaded).")
    s.add_argument("recipe", help="path of a YAML recipe")
    s.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    s.add_argument("--world-size", type=int, default=None, help="number of GPUs (default: WORLD_SIZE or 1)")
    s.add_argument("--gpu-memory", default="24GiB", help="memory of one GPU, e.g. 24GiB, 80GB (default 24GiB)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    e = sub.add_parser("export", help="write a Hugging Face directory from a checkpoint",
                       description="Write a Hugging Face directory (config, safetensors, tokenizer) from a run's "
                                   "newest complete checkpoint or from a given checkpoint folder.")
    e.add_argument("source", help="OUTPUT_DIR of a run, or OUTPUT_DIR/checkpoints/step-N")
    e.add_argument("--out", required=True, help="directory to write")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the saved weights")
    e.add_argument("--adapter-only", action="store_true", help="adapter runs: write only the peft adapter")
    e.add_argument("--merge", action="store_true", help="adapter runs: merge the adapter into the base model")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def cmd_validate(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.checks import resolve_batch
    from trainer.distributed import env_world_size

    world = args.world_size or env_world_size()
    accum = resolve_batch(cfg, world)
    print(dump_recipe(cfg), end="")
    if cfg.distributed.engine == "deepspeed":
        print_deepspeed_config(cfg, accum, world)
    global_batch = cfg.train.micro_batch_size * accum * world
    print(f"# ok: {args.recipe} is valid; world size {world}: micro-batch {cfg.train.micro_batch_size} x "
          f"{accum} accumulation x {world} ranks = {global_batch} sequences per step", file=sys.stderr)
    return 0


def print_deepspeed_config(cfg: Config, accum: int, world: int) -> None:
    """The DeepSpeed config a launch with this world size would generate, as JSON after a `---` line (what
    DeepSpeed reads; the lines before it stay the YAML recipe). Needs neither torch.distributed nor DeepSpeed."""
    import json

    from trainer.engine.ds_config import final_ds_config

    if cfg.distributed.zero_stage == 0:
        print("# distributed.zero_stage=0 runs on the native engine (DDP): no DeepSpeed config", file=sys.stderr)
        return
    config, changes = final_ds_config(cfg.precision, cfg.optimizer, cfg.distributed,
                                      micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=accum,
                                      world_size=world)
    print(f"---\n# generated DeepSpeed config (world size {world})"
          + "".join(f"\n# changed by distributed.deepspeed_overrides: {c}" for c in changes))
    print(json.dumps(config, indent=2))


def cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.distributed import env_world_size
    from trainer.memory_report import as_json, full_plan, parse_size, render

    p = full_plan(cfg, args.world_size or env_world_size(), parse_size(args.gpu_memory))
    print(as_json(p) if args.json else render(p, cfg, args.recipe))
    return 0


def check_fits_gpu(cfg: Config, force: bool) -> bool:
    """On a GPU machine, plan before building anything; False (after printing why) when it will not fit."""
    import torch

    if not torch.cuda.is_available():
        return True
    from trainer.distributed import env_world_size
    from trainer.memory_report import full_plan, render

    local = int(os.environ.get("LOCAL_RANK", "0"))
    free, _ = torch.cuda.mem_get_info(local)
    p = full_plan(cfg, env_world_size(), free)
    if p.fits or force:
        if not p.fits:
            logging.getLogger("trainer").warning("the plan predicts %.1f GiB > %.1f GiB free; starting anyway "
                                                 "(--force)", p.peak_bytes / 2**30, free / 2**30)
        return True
    if int(os.environ.get("RANK", "0")) == 0:
        print(render(p, cfg, f"{cfg.output_dir} on this GPU ({free / 2**30:.1f} GiB free)"), file=sys.stderr)
        print("error: the recipe will not fit this GPU; apply a suggestion above or pass --force",
              file=sys.stderr)
    return False


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.loop import train

    if not check_fits_gpu(cfg, args.force):
        return EXIT_CONFIG

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if summary.preempted:
        print(f"preempted at step {summary.steps}: checkpoint saved in {summary.output_dir}/checkpoints; run the "
              "same command again to continue (checkpoint.resume: auto)")
    else:
        print(f"trained to step {summary.steps}: loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}; "
              f"outputs in {summary.output_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.export import export

    out = export(Path(args.source), Path(args.out), dtype=args.dtype, adapter_only=args.adapter_only,
                 merge=args.merge, force=args.force)
    how = "PeftModel.from_pretrained(base_model, {!r})" if args.adapter_only else \
        "AutoModelForCausalLM.from_pretrained({!r})"
    print(f"exported to {out}: load it with {how.format(str(out))}")
    return 0


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {"train": cmd_train, "validate": cmd_validate,
                                                                     "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verb is None:
        parser().print_help()
        return EXIT_CONFIG
    setup_logging(int(os.environ.get("RANK", "0")))
    enable_faulthandler()
    try:
        if args.verb == "export":
            return cmd_export(args)
        cfg = load_recipe(args.recipe, args.overrides)
        return COMMANDS[args.verb](cfg, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME


def enable_faulthandler() -> None:
    """A crash in native code (a CUDA kernel, NCCL/gloo, a compiled op) kills a rank without a Python traceback;
    with this, every thread's Python stack is printed on SIGSEGV/SIGABRT/SIGBUS/SIGFPE/SIGILL first. Left as is
    when already on (python -X faulthandler, pytest) or when stderr is not a real file (a notebook)."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        pass


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: shown as one message, without a traceback."""
    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError
    from trainer.precision import LossScaleCollapsed
    from trainer.safeio import UnsafeFileError

    return (DataError, LossScaleCollapsed, CheckpointError, UnsafeFileError)


if __name__ == "__main__":
    sys.exit(main())
