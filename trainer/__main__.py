"""Command line: `python -m trainer VERB ...`. Thin: parse the arguments, resolve the recipe, call one room.

Each verb imports only the rooms it needs (inside its function), so `validate` and `schema` never load the
engines, DeepSpeed, bitsandbytes or peft. Every error a user can cause (`trainer.errors.TrainerError`) is shown as
one screen with its exit code (2: the recipe; 1: what the run met); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from trainer.errors import (EXIT_INTERRUPTED, EXIT_RECIPE, EXIT_RUNTIME, TrainerError, library_error_message,
                            os_error_message)
from trainer.logs import FILE_ONLY, keep_going_without_console, setup_console
from trainer.recipe.resolved import ResolvedRun

log = logging.getLogger("trainer")
RANK0_GRACE_S = 20.0  # how long another rank waits for rank 0 to report an error every rank met

EPILOG = """python -m trainer VERB --help shows a verb's arguments. Overrides are dotted keys after the recipe,
parsed as YAML scalars; `null` clears a value (back to its default):
  python -m trainer train recipes/quickstart.yaml train.max_steps=50 optimizer.lr=3e-4
  torchrun --nproc_per_node=2 -m trainer train recipes/quickstart.yaml output_dir=runs/quickstart-2ranks
"""


def _recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path of a YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=50")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Memory-efficient LLM training from a YAML "
                                "recipe.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    t = sub.add_parser("train", help="train with a recipe", description="Train with a recipe (one process, or one "
                       "of many under torchrun).")
    _recipe_arguments(t)
    t.add_argument("--force", action="store_true",
                   help="start even when the memory plan predicts more than the GPU's free memory; move unusable "
                   "checkpoints (every one damaged, or an earlier run's under checkpoint.resume=never) aside into "
                   "output_dir/previous-<time>/ and start over (nothing is deleted); resume an adapter over a base "
                   "model that differs from the one it was trained on (logged as a warning)")
    v = sub.add_parser("validate", help="check a recipe without building anything",
                       description="Check a recipe and its overrides without building anything; print the resolved "
                                   "recipe (and, for DeepSpeed, the generated DeepSpeed config).")
    _recipe_arguments(v)
    v.add_argument("--world-size", type=whole_number(1, MAX_WORLD_SIZE), default=None, help="ranks to check batch "
                   "sizes for (default: WORLD_SIZE or 1)")
    s = sub.add_parser("plan", help="predict memory per GPU", description="Predict the memory per GPU of a "
                       "recipe before launch (model shapes on the meta device; nothing is loaded).")
    _recipe_arguments(s)
    s.add_argument("--world-size", type=whole_number(1, MAX_WORLD_SIZE), default=None, help="number of GPUs "
                   "(default: WORLD_SIZE or 1)")
    s.add_argument("--gpu-memory", type=memory_size, default="24GiB", help="memory of one GPU, e.g. 24GiB, 80GB "
                   "(default 24GiB)")
    s.add_argument("--gpus-per-node", type=whole_number(1, 1024), default=8, help="GPUs per node, for the CPU "
                   "memory an offloaded plan needs per node (default 8, at most the world size)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.add_argument("--seq-len-max", action="store_true", help="print the longest data.seq_len this recipe fits at "
                   "on this GPU (everything else kept) instead of the plan")
    e = sub.add_parser("export", help="write a Hugging Face directory from a checkpoint",
                       description="Write a Hugging Face directory (config, safetensors, tokenizer) from a run's "
                                   "newest complete checkpoint or from a given checkpoint folder.")
    e.add_argument("source", help="OUTPUT_DIR of a run, or OUTPUT_DIR/checkpoints/step-N")
    e.add_argument("--out", required=True, help="directory to write")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the saved weights")
    e.add_argument("--adapter-only", action="store_true", help="adapter runs: write only the peft adapter")
    e.add_argument("--merge", action="store_true", help="adapter runs: write the base model with the adapter "
                   "merged in (the base itself is only read)")
    e.add_argument("--force", action="store_true", help="replace an earlier export in --out (only a folder this "
                   "command wrote); with --merge, merge even with a base model that differs from the one the adapter "
                   "was trained on (logged as a warning)")
    pr = sub.add_parser("prepare", help="build a recipe's token stores ahead of time", description="Tokenize the "
                        "recipe's data into its token stores (data.cache_dir) now, so training starts in seconds.")
    _recipe_arguments(pr)
    d = sub.add_parser("data", help="show what a recipe trains on", description="Build the recipe's tokenizer and "
                       "data as training would, and print samples with the tokens that carry the loss marked, with the "
                       "token counts and how full the samples are.")
    _recipe_arguments(d)
    d.add_argument("--show", type=whole_number(1), default=3, metavar="N", help="samples to print (default 3)")
    g = sub.add_parser("generate", help="continue a text with a trained model", description="Continue a prompt with "
                       "a run's newest checkpoint, a checkpoint folder or an export (adapter runs: base + adapter).")
    g.add_argument("source", help="OUTPUT_DIR of a run, a checkpoint folder, or an export directory")
    g.add_argument("--prompt", required=True, help="the text to continue")
    _generation_arguments(g, temperature=0.0, tokens=128)
    c = sub.add_parser("chat", help="chat with a trained model", description="Chat with a run's newest checkpoint, a "
                       "checkpoint folder or an export, using the chat template the run trained with.")
    c.add_argument("source", help="OUTPUT_DIR of a run, a checkpoint folder, or an export directory")
    c.add_argument("--system", default=None, help="a system prompt")
    _generation_arguments(c, temperature=0.7, tokens=256)
    rc = sub.add_parser("recipes", help="list the shipped recipes, or copy one", description="List the shipped "
                        "recipes with their GPUs and planned peak, or copy one to edit: recipes copy NAME DEST.")
    rc.add_argument("action", nargs="?", choices=["list", "copy"], default="list")
    rc.add_argument("name", nargs="?", help="copy: the recipe, e.g. quickstart or 24gb/llama3-8b-qlora")
    rc.add_argument("dest", nargs="?", help="copy: a file or folder to copy it to")
    rc.add_argument("--force", action="store_true", help="copy: replace an existing file")
    r = sub.add_parser("schema", help="print the recipe's JSON Schema", description="Print the JSON Schema of a "
                       "recipe (save it and point your editor's YAML language server at it), or the README's "
                       "table of every key.")
    r.add_argument("--markdown", action="store_true", help="print the table of keys (type, default, doc)")
    return p


def _generation_arguments(p: argparse.ArgumentParser, temperature: float, tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=whole_number(1, MAX_NEW_TOKENS), default=tokens,
                   help=f"tokens to generate, at most what fits in the model's context (default {tokens})")
    p.add_argument("--temperature", type=finite_number(0.0), default=temperature, help="0 is greedy; above 0 samples "
                   f"with top-p 0.9 (default {temperature})")


MAX_NEW_TOKENS = 1_000_000
MAX_WORLD_SIZE = 1_000_000


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]; argparse shows the message and exits 2 otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            wanted = f"at least {low}" if high is None else f"between {low} and {high:,}"
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text[:40]}")
        return value

    return parse


def finite_number(low: float) -> Callable[[str], float]:
    """An argparse type: a finite number >= low (no inf, no nan)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low:g}, not {text[:40]}")
        return value

    return parse


def memory_size(text: str) -> int:
    """An argparse type: a positive size such as 24GiB or 80GB, in bytes."""
    from trainer.plan.report import parse_size

    try:
        size = parse_size(text)
    except (ValueError, OverflowError):  # not a number; nan; inf
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a size such as 24GiB or 80GB") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, not {text[:40]}")
    return size


def _world_size(args: argparse.Namespace) -> int:
    from trainer.distributed import env_world_size

    return getattr(args, "world_size", None) or env_world_size()


def _planning_world_size(args: argparse.Namespace) -> int:
    """validate and plan: the ranks given (--world-size, WORLD_SIZE), else the fewest a sequence-parallel recipe
    runs on (its distributed.sequence_parallel), so that `plan RECIPE` alone shows it as it can launch."""
    from trainer.recipe.read import load_recipe

    given = _world_size(args)
    if given > 1:
        return given
    recipe, _, problems = load_recipe(args.recipe, args.overrides)
    return 1 if problems else recipe.distributed.sequence_parallel


def cmd_validate(args: argparse.Namespace) -> int:
    from trainer.data.sizes import shortfalls
    from trainer.errors import ConfigError
    from trainer.recipe.read import to_yaml
    from trainer.recipe.resolve import resolve

    run = resolve(args.recipe, args.overrides, _planning_world_size(args))
    too_little, uncounted = shortfalls(run)  # what train would find once the data is built
    if too_little:
        raise ConfigError(too_little, f"recipe {args.recipe}")
    print(to_yaml(run.recipe), end="")
    if run.execution.deepspeed or run.execution.deepspeed_stage0:  # what it generates, or why nothing
        print_deepspeed_config(run)
    for warning in run.warnings:
        print(f"# warning: {warning}", file=sys.stderr)
    for source in uncounted:
        print(f"# note: {source} was not counted (read only when its token store is built): train checks that it "
              "gives one global batch, and one eval micro-batch per rank", file=sys.stderr)
    unit = {"sft": "sequences", "kto": "completions"}.get(run.recipe.objective.name, "pairs")
    sp = run.execution.sequence_parallel
    groups = f"{run.data_parallel_size} group(s) of {sp} ranks sharing each sequence" if sp > 1 else \
        f"{run.world_size} ranks"
    print(f"# ok: {args.recipe} is valid; world size {run.world_size}: micro-batch {run.micro_batch_size} x "
          f"{run.grad_accum_steps} accumulation x {groups} = {run.global_batch_size} {unit} per step",
          file=sys.stderr)
    return 0


def print_deepspeed_config(run: ResolvedRun) -> None:
    """The DeepSpeed config this launch would generate, as JSON after a `---` line (what DeepSpeed reads; the lines
    before it stay the YAML recipe). Needs neither torch.distributed nor DeepSpeed."""
    import json

    from trainer.engine.ds_config import final_ds_config

    if not run.execution.deepspeed:
        print("# distributed.zero_stage=0 runs on the native engine (DDP): no DeepSpeed config", file=sys.stderr)
        return
    config, changes = final_ds_config(run)
    print(f"---\n# generated DeepSpeed config (world size {run.world_size})"
          + "".join(f"\n# changed by distributed.deepspeed_overrides: {c}" for c in changes))
    print(json.dumps(config, indent=2))


def cmd_plan(args: argparse.Namespace) -> int:
    from trainer.plan.report import as_json, render
    from trainer.plan.suggest import full_plan
    from trainer.recipe.resolve import resolve

    run = resolve(args.recipe, args.overrides, _planning_world_size(args))
    if args.seq_len_max:
        from trainer.plan.longest import longest_seq_len, render_longest

        print(render_longest(longest_seq_len(run, args.gpu_memory), args.gpu_memory, args.recipe))
        return 0
    p = full_plan(run, args.gpu_memory)
    print(as_json(p) if args.json else render(p, args.recipe, args.gpus_per_node))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.distributed import env_rank
    from trainer.run.loop import train
    from trainer.recipe.resolve import resolve

    run = resolve(args.recipe, args.overrides, _world_size(args), make_output=True)
    summary = train(run, force=args.force)
    if env_rank() != 0:
        return 0
    if summary.already_done:
        print(f"already at step {summary.steps} of {run.recipe.train.max_steps} in {summary.output_dir}: nothing "
              "to do; raise train.max_steps to continue")
    elif summary.preempted:
        print(f"stopped at step {summary.steps} (Ctrl-C, SIGTERM or SIGUSR1); checkpoint saved in "
              f"{summary.output_dir}/checkpoints; run the same command to continue")
    else:
        print(f"trained to step {summary.steps}: {summary.losses()}; outputs in {summary.output_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.use.export import export

    out = export(Path(args.source), Path(args.out), dtype=args.dtype, adapter_only=args.adapter_only,
                 merge=args.merge, force=args.force)
    how = "PeftModel.from_pretrained(base_model, {!r})" if args.adapter_only else \
        "AutoModelForCausalLM.from_pretrained({!r})"
    what = "the base with the adapter merged in (the base itself is unchanged) " if args.merge else ""
    print(f"exported {what}to {out}: load it with {how.format(str(out))}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from trainer.data.prepare import prepare
    from trainer.recipe.resolve import resolve

    prepare(resolve(args.recipe, args.overrides, 1), sys.stdout, progress=sys.stderr.isatty())
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from trainer.data.preview import show
    from trainer.recipe.resolve import resolve

    run = resolve(args.recipe, args.overrides, 1)
    show(run, args.show, sys.stdout, colour=sys.stdout.isatty())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from trainer.use.chat import generate, load

    loaded = load(Path(args.source))
    print(args.prompt + generate(loaded, args.prompt, args.max_new_tokens, args.temperature))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from trainer.use.chat import chat_loop, load

    chat_loop(load(Path(args.source)), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              system=args.system)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from trainer.plan import catalog

    if args.action == "list":
        print(catalog.table())
        return 0
    if not args.name or not args.dest:
        print("error: usage: python -m trainer recipes copy NAME DEST", file=sys.stderr)
        return EXIT_RECIPE
    target = catalog.copy(args.name, Path(args.dest), force=args.force)
    print(f"copied to {target}; edit it, then: python -m trainer validate {target}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from trainer.recipe.reference import json_schema, markdown

    print(markdown() if args.markdown else json_schema())
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "validate": cmd_validate, "plan": cmd_plan, "export": cmd_export, "prepare": cmd_prepare,
    "data": cmd_data,
    "generate": cmd_generate, "chat": cmd_chat, "recipes": cmd_recipes, "schema": cmd_schema}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; overrides may also come after options (`data RECIPE --show 2 key=value`), which argparse alone
    does not take."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    keep_going_without_console()  # before anything takes sys.stderr: a closed pipe or terminal never ends a run
    args = parse(argv)
    if args.verb is None:
        parser().print_help()
        return EXIT_RECIPE
    from trainer.distributed import env_rank, env_world_size

    setup_console(env_rank(), env_world_size())
    enable_faulthandler()
    try:
        return COMMANDS[args.verb](args)
    except TrainerError as e:
        return fail(str(e), e.exit_code, on_every_rank=e.on_every_rank)
    except KeyboardInterrupt:
        return fail("interrupted (Ctrl-C) before training started; nothing was saved", EXIT_INTERRUPTED)
    except OSError as e:  # a path, permission, full disk: the user's to fix, with the path in the message
        return fail(os_error_message(e), EXIT_RUNTIME)
    except Exception as e:
        message = library_error_message(e)  # a full disk seen by safetensors, a hub that cannot be reached
        if message is None:
            raise
        return fail(message, EXIT_RUNTIME)


def fail(message: str, code: int, on_every_rank: bool = False) -> int:
    """One screen on the console (under torchrun, an error every rank raised is shown by rank 0 only); the
    traceback behind it goes to the run's log file, for bug reports; torchrun's own failure summary gets the
    message (its error file), not a traceback."""
    from trainer.distributed import elastic_error_file, env_rank, let_rank0_report_first

    if env_rank() == 0 or not on_every_rank:
        print(f"error: {message}", file=sys.stderr)
    if sys.exc_info()[0] is not None:
        log.error("traceback of: %s", message.splitlines()[0], exc_info=True, extra=FILE_ONLY)
    error_file = elastic_error_file()
    if error_file:
        # torchrun names the failure with the earliest timestamp (whole seconds) as the root cause: the other ranks
        # of an error every rank raised date theirs after rank 0's grace, so the summary names rank 0, which printed
        # the message (under load rank 0 could write a second later and rank 1 was named)
        later = RANK0_GRACE_S if on_every_rank and env_rank() != 0 else 0
        summary = {"message": f"exit {code}: {message}", "extraInfo": {"py_callstack": message,
                                                                       "timestamp": str(int(time.time() + later))}}
        Path(error_file).write_text(json.dumps({"message": summary}), encoding="utf-8")
        if on_every_rank and env_rank() != 0:
            let_rank0_report_first(code, RANK0_GRACE_S)
    return code


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


def entry() -> None:
    """The console command: main(), then exit with its code. A rank that failed alone while its peers sat in a
    collective leaves at once after reporting (trainer.distributed.exit_process); torchrun then stops the others,
    instead of every rank waiting out the process group's timeout."""
    from trainer.distributed import exit_process, process_group_abandoned

    try:
        code = main()
    except BaseException as e:
        if not process_group_abandoned():
            raise
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else EXIT_RUNTIME
        if not isinstance(e, SystemExit):
            traceback.print_exc()
    exit_process(code)


if __name__ == "__main__":
    entry()
