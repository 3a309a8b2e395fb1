"""The recipe: every shipped recipe validates; bad recipes and overrides give one clear screen, exit 2."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import prerequisite_overrides, run_cli
from trainer.__main__ import main
from trainer.errors import ConfigError
from trainer.recipe.read import load_recipe
from trainer.recipe.resolve import accumulation, resolve
from trainer.recipe.schema import Recipe, SourceEntry, walk_keys

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_are_found() -> None:
    assert RECIPES and QUICKSTART in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_validates(recipe: Path, llama_base: Path) -> None:
    needs = prerequisite_overrides(recipe, llama_base)
    try:
        run = resolve(recipe, needs)
    except ConfigError:  # a sequence-parallel recipe needs its ranks: resolved as `validate` does, on them
        from trainer.recipe.read import load_recipe

        run = resolve(recipe, needs, world_size=load_recipe(recipe, needs)[0].distributed.sequence_parallel)
    assert isinstance(run.recipe, Recipe)
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("#"), "each recipe starts with a comment giving its launch command"
    assert "python -m trainer" in recipe.read_text() or "torchrun" in recipe.read_text()


# (overrides, the dotted key the message must name, a fragment of the advice)
BAD = [
    (["foo=1"], "foo", "unknown key"),
    (["optimizer.lrr=0.1"], "optimizer.lrr", "did you mean 'optimizer.lr'"),
    (["train.max_step=10"], "train.max_step", "did you mean 'train.max_steps'"),
    (["train.max_steps=abc"], "train.max_steps", "must be an integer"),
    (["train.max_steps=0"], "train.max_steps", "must be >= 1"),
    (["precision.dtype=bf32"], "precision.dtype", "must be one of: fp32, bf16, fp16"),
    (["precision.dtype=float16"], "precision.dtype", "did you mean 'fp16'"),  # torch's spelling
    (["precision.dtype=BF16"], "precision.dtype", "did you mean 'bf16'"),
    (["distributed.engine=ddp"], "distributed.engine", "did you mean 'native'"),
    (["optimizer.lr=-1"], "optimizer.lr", "must be > 0"),
    (["train.micro_batch_size=2.5"], "train.micro_batch_size", "must be an integer"),
    (["data.seq_len=4"], "data.seq_len", "must be >= 8"),
    (["model.config=null"], "model.name_or_path", "no model"),
    (["model.name_or_path=gpt2"], "model.config", "not both"),
    (["model.config={hidden_size: 8}"], "model.config.model_type", "needs a model_type"),
    (["model.config=null", "model.name_or_path=./no/such/dir"], "model.name_or_path", "not found"),
    (["data.source=null"], "data.source", "no training data"),
    (["data.source=./missing.jsonl"], "data.source", "not found"),
    (["data.source=builtin:nope"], "data.source", "unknown built-in"),
    (["data.eval_fraction=0"], "train.eval_every_steps", "data.eval_fraction"),
    (["optimizer.betas=[0.9]"], "optimizer.betas", "two numbers"),
    (["optimizer.min_lr_ratio=2"], "optimizer.min_lr_ratio", "must be <= 1"),
    (["distributed.zero_stage=2"], "distributed.zero_stage", "engine: deepspeed"),
    (["distributed.offload_optimizer=cpu"], "distributed.offload_optimizer", "engine: deepspeed"),
    (["train.max_steps"], "train.max_steps", "section.key=value"),
    (["data.format=alpaca"], "data.format", "use format: text"),
    (["logging.wandb.mode=offlin"], "logging.wandb.mode", "did you mean 'offline'"),
    (["train=5"], "train", "must be a section"),
    (["precision.initial_loss_scale=0"], "precision.initial_loss_scale", "must be > 0"),
    (["model.tokenizer=null"], "model.tokenizer", "needs a tokenizer"),
    (["optimizer.schedule=cosin"], "optimizer.schedule", "did you mean 'cosine'"),
    (["data.packing=maybe"], "data.packing", "isolated"),
    (["train.global_batch_size=12"], "train.global_batch_size", "multiple of micro_batch_size"),
    (["train.global_batch_size=16", "train.grad_accum_steps=4"], "train.grad_accum_steps", "give only one"),
    (["checkpoint.resume=/no/such/run"], "checkpoint.resume", "existing checkpoint folder"),
    (["distributed.deepspeed_overrides={a: 1}"], "distributed.deepspeed_overrides", "only used with"),
]


@pytest.mark.parametrize("overrides,key,advice", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_override_gives_one_screen(overrides: list[str], key: str, advice: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(QUICKSTART), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: recipe")
    assert f"  - {key} = " in err, err
    assert advice in err, err
    assert "Traceback" not in err
    assert len(err.splitlines()) <= 25


def test_all_problems_reported_at_once() -> None:
    overrides = ["optimizer.lrr=1", "train.max_steps=0", "precision.dtype=x", "data.seq_len=1",
                 "distributed.zero_stage=3"]
    with pytest.raises(ConfigError) as info:
        resolve(QUICKSTART, overrides)
    keys = {p.key for p in info.value.problems}
    assert keys == {"optimizer.lrr", "train.max_steps", "precision.dtype", "data.seq_len", "distributed.zero_stage"}
    assert "5 problems" in str(info.value)
    assert all(p.source == "command line" for p in info.value.problems)


def test_problem_in_the_recipe_file_names_its_source(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(QUICKSTART.read_text().replace("max_steps: 150", "max_steps: -3"))
    with pytest.raises(ConfigError) as info:
        resolve(recipe)
    (problem,) = info.value.problems
    assert (problem.key, problem.value, problem.source) == ("train.max_steps", -3, "recipe")


def test_bad_yaml_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  max_steps: [1, 2\n")
    assert main(["validate", str(broken)]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_a_missing_recipe_path_gets_the_recipe_it_probably_meant(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A shipped recipe named without its path, a file of the same folder misspelled, a shipped recipe misspelled."""
    (tmp_path / "my-run.yaml").write_text("train: {max_steps: 1}\n")
    cases = {"quickstart": "'quickstart' is a shipped recipe: give its path, recipes/quickstart.yaml",
             "llama3-8b-qlora": "python -m trainer recipes copy 24gb/llama3-8b-qlora .",
             str(tmp_path / "my-rnu.yaml"): f"did you mean {tmp_path / 'my-run.yaml'}?",
             "24gb/llama3-8b-qlroa": "did you mean the shipped recipe 24gb/llama3-8b-qlora",
             str(tmp_path / "unrelated.yaml"): "`python -m trainer recipes` lists the shipped ones"}
    for given, hint in cases.items():
        assert main(["validate", given]) == 2
        error = capsys.readouterr().err
        assert f"recipe = '{given}'" in error and "file not found" in error and hint in error, error


def test_overrides_are_typed_and_null_clears() -> None:
    cfg = resolve(QUICKSTART, ["optimizer.lr=3e-4", "train.max_steps=50", "optimizer.grad_clip=null",
                               "model.config.hidden_size=64"]).recipe
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.max_steps == 50
    assert cfg.optimizer.grad_clip is None
    assert cfg.model.config is not None and cfg.model.config["hidden_size"] == 64
    assert cfg.model.config["num_hidden_layers"] == 4  # the rest of the dict is kept


def test_switch_from_scratch_recipe_to_saved_model(tmp_path: Path) -> None:
    cfg, _, problems = load_recipe(QUICKSTART, ["model.config=null", f"model.name_or_path={tmp_path}"])
    assert problems == []
    assert cfg.model.config is None and cfg.model.name_or_path == str(tmp_path)


def test_batch_resolution() -> None:
    overrides = ["train.grad_accum_steps=null", "train.global_batch_size=32"]
    train = load_recipe(QUICKSTART, overrides)[0].train
    assert accumulation(train, world_size=2) == (2, [])
    assert accumulation(train, world_size=4) == (1, [])
    assert resolve(QUICKSTART, overrides, world_size=2).global_batch_size == 32
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        resolve(QUICKSTART, overrides, world_size=3)


def test_cli_error_has_no_traceback_and_exits_2() -> None:
    proc = run_cli(["train", str(QUICKSTART), "optimizer.lrr=1", "train.max_steps=0"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "optimizer.lrr" in proc.stderr and "train.max_steps" in proc.stderr


def test_help_lists_verbs() -> None:
    proc = run_cli(["--help"], timeout=120)
    assert proc.returncode == 0
    assert "train" in proc.stdout and "validate" in proc.stdout


@pytest.mark.parametrize("overrides,fragment", [
    (["precision.master_weights=false", "precision.dtype=fp16"], "cannot be loss-scaled"),
    (["precision.master_weights=false"], "no effect with precision.dtype: fp32"),
])
def test_master_weights_rules(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        resolve(QUICKSTART, overrides)


# ------------------------------------------------------------------------------------------- numeric ranges

def _number_kind(annotation: Any) -> str | None:
    """'int', 'float', 'list of float' (or of int) for a numeric schema annotation; None for anything else."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _number_kind(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {_number_kind(a) for a in typing.get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is list:
        inner = _number_kind(typing.get_args(annotation)[0])
        return f"list of {inner}" if inner in ("int", "float") else None
    return {int: "int", float: "float"}.get(annotation)


def numeric_keys() -> list[tuple[str, str]]:
    """(override prefix, kind) for every numeric key of the schema, data.sources' entries included."""
    keys = [(key, kind) for key, info, _ in walk_keys() if (kind := _number_kind(info.annotation))]
    keys += [(f"data.sources.{name}", kind) for name, info in SourceEntry.model_fields.items()
             if (kind := _number_kind(info.annotation))]
    return keys


def numeric_override(key: str, kind: str, value: str) -> tuple[str, str]:
    """(the override that sets `key` to `value`, the key the problem is reported at)."""
    if key.startswith("data.sources."):
        return f"data.sources=[{{source: builtin:python_stdlib, {key.split('.')[-1]}: {value}}}]", "data.sources"
    if kind.startswith("list"):
        return f"{key}=[{value}, {value}]", key
    return f"{key}={value}", key


UNUSABLE = [".inf", "-.inf", ".nan", "nan", "1e999", "9" * 5000]  # for every numeric key
TOO_BIG_INTS = [str(2**64), str(10**30)]  # beyond what torch, numpy and C code hold
TOO_BIG_FOR_A_FLOAT = [str(10**400)]


def test_the_walk_finds_the_numeric_keys() -> None:
    kinds = dict(numeric_keys())
    assert kinds["train.seed"] == "int" and kinds["optimizer.lr"] == "float"
    assert kinds["optimizer.betas"] == "list of float" and kinds["data.sources.weight"] == "float"
    assert len(kinds) > 30


@pytest.mark.parametrize(("key", "kind"), numeric_keys(), ids=[k for k, _ in numeric_keys()])
def test_every_numeric_key_refuses_inf_nan_and_huge_numbers(key: str, kind: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """inf, nan, an int beyond 64 bits (train.seed=2**64 validated, then failed after the model was built), a
    number of 5000 digits (a ValueError traceback): one screen naming the key, exit 2, before anything is built."""
    values = UNUSABLE + (TOO_BIG_INTS if kind.endswith("int") else TOO_BIG_FOR_A_FLOAT)
    for value in values:
        override, reported_at = numeric_override(key, kind, value)
        code = main(["validate", str(QUICKSTART), override])
        err = capsys.readouterr().err
        assert code == 2, f"{override[:80]}: exit {code}\n{err[-2000:]}"
        assert f"  - {reported_at} = " in err and "Traceback" not in err, err[-2000:]
        assert len(err.splitlines()) <= 25 and len(err) < 3000


@pytest.mark.parametrize("free", ["model.config.rope_theta", "model.rope_scaling.factor",
                                  "distributed.deepspeed_overrides.gradient_predivide_factor"])
def test_free_mappings_hold_no_inf_nan_or_huge_numbers(free: str, capsys: pytest.CaptureFixture[str]) -> None:
    section = ".".join(free.split(".")[:2])
    for value in (".inf", ".nan", str(2**64)):
        assert main(["validate", str(QUICKSTART), f"{free}={value}"]) == 2
        err = capsys.readouterr().err
        assert f"  - {section} = " in err and f"{free.split('.')[-1]} is" in err and "Traceback" not in err, err


def test_a_wrong_value_inside_model_config_is_a_problem_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(QUICKSTART), "model.config.num_hidden_layers=1e999"]) == 2  # a string to YAML 1.1
    err = capsys.readouterr().err
    assert "  - model.config" in err and "num_hidden_layers" in err and "Traceback" not in err, err


BAD_OPTIONS = [
    (["generate", "RUN", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be between 1 and"),
    (["generate", "RUN", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens: must be between 1 and"),
    (["chat", "RUN", "--max-new-tokens", str(10**30)], "--max-new-tokens: must be between 1 and"),
    (["chat", "RUN", "--temperature", "-0.5"], "--temperature: must be a finite number >= 0"),
    (["generate", "RUN", "--prompt", "x", "--temperature", "nan"], "--temperature: must be a finite number >= 0"),
    (["chat", "RUN", "--temperature", "inf"], "--temperature: must be a finite number >= 0"),
    (["validate", str(QUICKSTART), "--world-size", "0"], "--world-size: must be between 1 and"),
    (["plan", str(QUICKSTART), "--world-size", "-2"], "--world-size: must be between 1 and"),
    (["plan", str(QUICKSTART), "--gpus-per-node", "0"], "--gpus-per-node: must be between 1 and"),
    (["plan", str(QUICKSTART), "--gpu-memory", "nanGiB"], "--gpu-memory: 'nanGiB' is not a size"),
    (["plan", str(QUICKSTART), "--gpu-memory", "infGiB"], "--gpu-memory: 'infGiB' is not a size"),
    (["plan", str(QUICKSTART), "--gpu-memory=-5GiB"], "--gpu-memory: must be more than 0 bytes"),
    (["data", str(QUICKSTART), "--show", "0"], "--show: must be at least 1"),
    (["data", str(QUICKSTART), "--show", "many"], "--show: 'many' is not a whole number"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS, ids=[" ".join(a[2:])[:40] for a, _ in BAD_OPTIONS])
def test_numeric_options_are_checked_by_argparse(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`generate --max-new-tokens 0` reached transformers (a traceback after the model loaded); a negative world
    size validated ("-16 sequences per step"); --gpu-memory nanGiB was a ValueError traceback."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"argument {message}" in err and "Traceback" not in err, err
