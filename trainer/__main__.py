"""Command line: `python -m trainer train|validate RECIPE [dotted.key=value ...]`. Thin: parse, then call."""

from __future__ import annotations

import argparse
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
    return p


def cmd_validate(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.checks import resolve_batch
    from trainer.distributed import env_world_size

    world = args.world_size or env_world_size()
    accum = resolve_batch(cfg, world)
    print(dump_recipe(cfg), end="")
    global_batch = cfg.train.micro_batch_size * accum * world
    print(f"# ok: {args.recipe} is valid; world size {world}: micro-batch {cfg.train.micro_batch_size} x "
          f"{accum} accumulation x {world} ranks = {global_batch} sequences per step", file=sys.stderr)
    return 0


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.loop import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary.steps} steps: loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}; "
              f"outputs in {summary.output_dir}")
    return 0


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {"train": cmd_train, "validate": cmd_validate}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verb is None:
        parser().print_help()
        return EXIT_CONFIG
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        return COMMANDS[args.verb](cfg, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: shown as one message, without a traceback."""
    from trainer.data import DataError
    from trainer.precision import LossScaleCollapsed

    return (DataError, LossScaleCollapsed)


if __name__ == "__main__":
    sys.exit(main())
