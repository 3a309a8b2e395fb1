"""The resolve stage: derived values computed once, every shipped recipe planned as its header says, plan
suggestions that keep the global batch, paths and files a user can get wrong, and the generated reference."""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import QUICKSTART, ROOT, prerequisite_overrides
from trainer.__main__ import main
from trainer.errors import ConfigError
from trainer.plan.shapes import shapes
from trainer.plan.suggest import apply_overrides, changes, combined
from trainer.recipe.reference import README_END, README_START, markdown, readme_section
from trainer.recipe.resolve import resolve
from trainer.recipe.resolved import ResolvedRun
from trainer.recipe.schema import resume_rules

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def header_gpus(recipe: Path) -> int:
    for line in recipe.read_text().splitlines():
        if line.startswith("# plan: "):
            return int(line.split()[2])
    return 1


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_plans_with_and_without_world_size(recipe: Path, llama_base: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`plan RECIPE` alone (one GPU) used to end in a TypeError for a recipe giving train.global_batch_size."""
    needs = prerequisite_overrides(recipe, llama_base)
    assert main(["plan", str(recipe), *needs]) == 0, capsys.readouterr().err
    assert "predicted peak" in capsys.readouterr().out
    assert main(["plan", str(recipe), *needs, "--world-size", str(header_gpus(recipe))]) == 0
    assert "predicted peak" in capsys.readouterr().out


def test_per_layer_galore_plans_with_accumulation_from_the_global_batch(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", str(QUICKSTART), "optimizer.name=galore_adamw", "optimizer.galore.rank=8",
            "optimizer.galore.per_layer=true", "train.grad_accum_steps=null", "train.global_batch_size=16"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "accumulated at full size on refresh steps" in out  # accumulation 2 at one rank, from the global batch


def test_accumulation_is_resolved_once_for_every_consumer() -> None:
    run = resolve(QUICKSTART, ["train.grad_accum_steps=null", "train.global_batch_size=64",
                               "train.micro_batch_size=8"], world_size=4)
    assert (run.grad_accum_steps, run.global_batch_size) == (2, 64)
    ds = resolve(QUICKSTART, ["train.grad_accum_steps=null", "train.global_batch_size=64",
                              "distributed.engine=deepspeed", "distributed.zero_stage=2"], world_size=4)
    from trainer.engine.ds_config import build_ds_config

    config = build_ds_config(ds)
    assert (config["gradient_accumulation_steps"], config["train_batch_size"]) == (2, 64)


def test_a_batch_size_on_the_command_line_replaces_the_other_one_in_the_recipe() -> None:
    """The quickstart says grad_accum_steps: 1; a global batch given on the command line (as a resume on another
    number of ranks needs) takes its place instead of contradicting it. Both given on the command line still
    contradict."""
    run = resolve(QUICKSTART, ["train.global_batch_size=32"], world_size=2)
    assert (run.grad_accum_steps, run.global_batch_size) == (2, 32)
    accum_only = resolve(QUICKSTART, ["train.grad_accum_steps=3"], world_size=2)
    assert (accum_only.grad_accum_steps, accum_only.global_batch_size) == (3, 48)
    with pytest.raises(ConfigError, match="give only one"):
        resolve(QUICKSTART, ["train.global_batch_size=32", "train.grad_accum_steps=4"], world_size=2)


def _run_for(micro: int, accum: int | None, global_batch: int | None, world: int) -> ResolvedRun:
    return resolve(QUICKSTART, [f"train.micro_batch_size={micro}", "model.config.hidden_size=256", "data.seq_len=256",
                                f"train.grad_accum_steps={accum if accum else 'null'}",
                                f"train.global_batch_size={global_batch if global_batch else 'null'}"],
                   world_size=world)


@settings(max_examples=15, deadline=None)
@given(micro=st.sampled_from([2, 4, 8, 16]), accum=st.sampled_from([None, 1, 3]), world=st.sampled_from([1, 2, 4]),
       multiple=st.sampled_from([1, 2, 5]), by_global=st.booleans())
def test_suggestions_never_change_the_global_batch(micro: int, accum: int | None, world: int, multiple: int,
                                                   by_global: bool) -> None:
    """Whichever of grad_accum_steps and global_batch_size a recipe gives, every change the plan may suggest, alone
    and in every combination it tries, keeps micro x accumulation x world size. The old suggestion turned global
    64 at micro 8 into 8."""
    run = _run_for(micro, None if by_global else accum, micro * world * multiple if by_global else None, world)
    sh = shapes(run)
    tried = 0
    for n in (1, 2, 3):
        for combo in itertools.combinations(changes(run), n):
            overrides = combined(combo)
            after = apply_overrides(run, overrides, sh) if overrides else None
            if after is not None:
                tried += 1
                assert after.global_batch_size == run.global_batch_size, overrides
    assert tried > 5


def test_the_micro_batch_suggestion_of_the_issue_keeps_64() -> None:
    run = _run_for(8, None, 64, 1)
    (smaller,) = [c for c in changes(run) if c.label.startswith("micro-batch")]
    assert smaller.overrides == ("train.micro_batch_size=4",)  # no train.global_batch_size=null: 64 stays
    assert apply_overrides(run, list(smaller.overrides), shapes(run)).global_batch_size == 64


def test_the_plan_finds_the_combination_that_fits(capsys: pytest.CaptureFixture[str]) -> None:
    """An 8B full fine-tune on 2 GPUs of 12 GiB: ZeRO-3 with both offloads fits (it used to suggest only single
    changes and end at QLoRA); the plan says what CPU memory per node that needs. A combination that only adds to
    one that already fits is not shown."""
    recipe = ROOT / "recipes" / "24gb" / "llama3-8b-zero3-multinode.yaml"
    assert main(["plan", str(recipe), "--world-size", "2", "--gpu-memory", "12GiB"]) == 0
    out = capsys.readouterr().out
    assert "changes that make it fit, cheapest first:" in out
    assert "distributed.offload_optimizer=cpu" in out and "distributed.offload_params=cpu" in out
    assert "GiB per node of 2 GPUs" in out


# ------------------------------------------------------------------------------------------- user mistakes

def test_output_dir_problems_are_one_screen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for value, fragment in ((afile, "exists and is not a directory"),
                            (afile / "below", f"cannot be created: {afile} is a file, not a directory")):
        assert main(["validate", str(QUICKSTART), f"output_dir={value}"]) == 2
        err = capsys.readouterr().err
        assert f"output_dir = '{value}' (command line): {fragment}" in err and "Traceback" not in err


def test_train_refuses_an_output_dir_it_cannot_create(capsys: pytest.CaptureFixture[str]) -> None:
    """/proc refuses new folders even to root: resolving for training creates and probes output_dir first."""
    assert main(["train", str(QUICKSTART), "output_dir=/proc/forbidden/out"]) == 2
    err = capsys.readouterr().err
    assert "output_dir = '/proc/forbidden/out' (command line): cannot be created or written" in err
    assert "Traceback" not in err and len(err.splitlines()) <= 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: the permission check cannot fail")
def test_unreadable_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(QUICKSTART.read_text())
    recipe.chmod(0)
    assert main(["validate", str(recipe)]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_recipe_file_problems_stand_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe that cannot be read is the only problem reported: no 'no model' or 'no training data' after it."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  max_steps: [1, 2\n")
    for recipe, fragment in ((latin1, "is not UTF-8 text (byte 0xe9 on line 1)"), (broken, "not valid YAML"),
                             (tmp_path / "missing.yaml", "file not found"), (tmp_path, "is a directory")):
        assert main(["validate", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "1 problem:" in err and "Traceback" not in err, err


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\noutput_dir: *a11\n")
    assert main(["validate", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert "YAML aliases" in err and len(err) < 2000


def _nested_bomb(levels: int, width: int) -> list[str]:
    """Lines of a YAML alias bomb under model.config: `levels` lists, each holding the previous one `width` times
    (levels x width aliases, width**levels values once expanded)."""
    lines = [f"    l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return lines


def validate_limited(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`validate` in a child limited to 2 GiB of address space (validate needs about 0.4) and 120 s."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    return subprocess.run([sys.executable, "-m", "trainer", "validate", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, preexec_fn=limit)


@pytest.mark.slow  # a fresh interpreter (what it imports, or its memory limit, is checked)
def test_an_alias_bomb_with_few_aliases_nested_in_a_valid_key_is_refused(tmp_path: Path) -> None:
    """72 aliases (under MAX_ALIASES) under model.config, which takes any mapping: 9**9 values once expanded.
    It validated, then dumping the recipe ran past 60 s and 3.6 GB; the same in an override."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(QUICKSTART.read_text().replace("    model_type: llama\n", "    model_type: llama\n"
                                                   + "\n".join(_nested_bomb(9, 9)) + "\n"))
    in_file = validate_limited([str(bomb)])
    assert in_file.returncode == 2, in_file.stderr[-3000:]
    assert "its YAML aliases expand the" in in_file.stderr and "Traceback" not in in_file.stderr
    flow = "{" + ", ".join(line.strip() for line in _nested_bomb(8, 9)) + "}"
    override = validate_limited([str(QUICKSTART), f"model.config.extra={flow}"])
    assert override.returncode == 2, override.stderr[-3000:]
    assert "model.config.extra = " in override.stderr and "its YAML aliases expand the" in override.stderr
    endless = validate_limited([str(QUICKSTART), "model.config.extra=&a [1, *a]"])
    assert endless.returncode == 2 and "refers to a value that contains it" in endless.stderr, endless.stderr


def test_aliases_that_repeat_a_few_values_are_fine() -> None:
    from trainer.recipe.read import load_yaml

    data = load_yaml("a: &src {source: x.jsonl, weight: 1.0}\nb: [*src, *src, *src]\n")
    assert data["b"] == [{"source": "x.jsonl", "weight": 1.0}] * 3


def test_a_huge_value_is_cut_before_it_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(QUICKSTART), f"output_dir=[{', '.join(['x'] * 20000)}]"]) == 2
    err = capsys.readouterr().err
    assert "must be a string, got list" in err and len(err) < 1000


def test_values_from_the_schema_default_say_so() -> None:
    with pytest.raises(ConfigError) as info:
        resolve(QUICKSTART, ["optimizer.name=galore_adamw"])  # the default rank 128 is the quickstart's width
    (problem,) = info.value.problems
    assert (problem.key, problem.source) == ("optimizer.galore.rank", "default")


# ------------------------------------------------------------------------------------------- the reference

def test_resume_rules_come_from_the_schema() -> None:
    rules = resume_rules()
    assert rules["train.seed"] == rules["data.seq_len"] == rules["adapter.quant.type"] == "must_match"
    assert rules["optimizer.lr"] == rules["train.max_steps"] == "allowed"
    assert rules["output_dir"] == rules["checkpoint.keep_last"] == "ignored"


def test_readme_reference_is_generated_from_the_schema() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_START in readme and README_END in readme
    assert readme_section(readme) == markdown(), "run `python -m trainer schema --markdown` and paste it"
    for key in resume_rules():
        assert f"| `{key}` |" in markdown()


def test_schema_command_prints_a_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    train = schema["$defs"]["TrainConfig"]["properties"]["max_steps"]
    assert train["minimum"] == 1 and train["default"] == 100 and "optimizer steps" in train["description"]
