"""Every command in a ```bash block of the README runs as written, in order, in a fresh copy of the repository.

Only two things are changed, as the README says: `pip install` is not run again (this environment is the one it
made; the test command itself is what is running), and training commands get `train.max_steps` lowered (an override
added at the end, which wins) so the suite stays short. A command that fails, or takes longer than COMMAND_TIMEOUT_S,
fails the test with its output. As in the rest of the suite, `python -m trainer` and torchrun's processes are forked
from a server that imported the copy's trainer once, in the commands' environment (tests/forked_cli.py; `python` and
`torchrun` on PATH are its shims, and `python -c ...` is the interpreter itself); TRAINER_FORKED_CLI=0 runs each
command in a fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import forked_cli
from tests.helpers import ROOT, read_metrics, run_cli
from trainer.plan.items import GiB, Plan
from trainer.plan.peak import plan
from trainer.recipe.resolve import resolve

README = ROOT / "README.md"
QUICK_STEPS = "train.max_steps=12"
COMMAND_TIMEOUT_S = 900  # measured: the slowest (DeepSpeed on 2 ranks, op compiled) under 100 s on 2 cores
SKIP_COPYING = {".git", ".venv", "runs", ".pytest_cache", "__pycache__", ".torch_extensions", "wandb"}
# A figure the README states agrees with the program within this much plus half a unit of its last digit (9.17 GiB:
# 0.025; 89.7 GiB: 0.07): a refinement of a formula needs no README edit, a changed result does.
PLAN_TOLERANCE_GIB = 0.02


def readme_commands() -> list[str]:
    """The README's bash commands, in order, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def as_tested(command: str) -> str | None:
    """The command the test runs, or None for an install command."""
    if command.startswith("pip install"):
        rest = command.split("&&", 1)
        if len(rest) == 1 or "pytest" in rest[1]:
            return None  # installing, or the test command itself
        command = rest[1].strip()
    if re.search(r"(-m trainer train|launch/local\.sh) ", command):
        command += f" {QUICK_STEPS}"
    return command


def test_the_readme_has_the_two_commands_and_the_path_after_them() -> None:
    commands = readme_commands()
    assert commands[0] == "pip install -e . && python -m trainer train recipes/quickstart.yaml"
    assert commands[1] == "pip install -e '.[dev]' && python -m pytest"
    assert any(c.startswith("python -m trainer chat") or "trainer chat" in c for c in commands)
    assert as_tested(commands[1]) is None
    assert as_tested(commands[0]) == f"python -m trainer train recipes/quickstart.yaml {QUICK_STEPS}"


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(3600)
def test_every_readme_command_runs_in_a_fresh_copy(tmp_path: Path) -> None:
    fresh = tmp_path / "trainer"
    shutil.copytree(ROOT, fresh, symlinks=True, ignore=lambda folder, names: [n for n in names if n in SKIP_COPYING])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    server = None
    if forked_cli.enabled():  # the copy's trainer, imported once by a server of its own
        shims = forked_cli.write_shims(tmp_path / "bin")
        env.update(PATH=f"{shims}{os.pathsep}{env['PATH']}", PYTHON=str(shims / "python"))
        server = forked_cli.Server(root=fresh, env=env)
        server.wait_ready()
        env[forked_cli.SERVER_ENV] = server.socket
    try:
        ran = run_every_command(fresh, env)
    finally:
        if server:
            server.stop()
    assert ran >= 15
    assert (fresh / "runs" / "chat-merged" / "config.json").is_file()


def run_every_command(folder: Path, env: dict[str, str]) -> int:
    """Each README command in `folder`, in order, as the test runs it; how many ran (all succeeded)."""
    ran = 0
    for command in map(as_tested, readme_commands()):
        if command is None:
            continue
        proc = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        assert proc.returncode == 0, f"{command}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        ran += 1
    return ran


def tolerance_of(text: str) -> float:
    decimals = len(text.split(".")[1]) if "." in text else 0
    return PLAN_TOLERANCE_GIB + 0.5 * 10 ** -decimals


def stated(pattern: str) -> tuple[float, float]:
    """The number the README states where `pattern` (a regex with one group around it) matches, with its tolerance."""
    found = re.search(pattern, " ".join(README.read_text(encoding="utf-8").split()))
    assert found, f"the README no longer says {pattern!r}: update this test with it"
    return float(found.group(1)), tolerance_of(found.group(1))


def planned(recipe: str, *overrides: str, world_size: int) -> Plan:
    return plan(resolve(ROOT / "recipes" / recipe, list(overrides), world_size=world_size))


def test_the_24gb_recipe_table_states_the_plans_peaks() -> None:
    rows = re.findall(r"^\| `recipes/(24gb/[\w.-]+\.yaml)` \|.*\| (\d+) x 24 GB \| ([\d.]+) GiB \|$",
                      README.read_text(encoding="utf-8"), flags=re.M)
    assert len(rows) >= 9
    for recipe, gpus, peak in rows:
        p = planned(recipe, world_size=int(gpus))
        assert abs(p.peak_bytes / GiB - float(peak)) <= tolerance_of(peak), (recipe, p.peak_bytes / GiB, peak)
        assert p.fits


def test_the_plan_figures_in_the_text_are_the_plans() -> None:
    """Each sentence of the README quoting the plan, against the plan it describes."""
    multinode = "24gb/llama3-8b-zero3-multinode.yaml"
    on_8 = planned(multinode, world_size=8).checkpoint
    full = planned(multinode, "checkpoint.full_weights=true", world_size=8).checkpoint
    offload_on_2 = planned("24gb/llama3-8b-zero3-offload.yaml", world_size=2)
    qlora_70b = "24gb/llama3-70b-qlora-2gpu.yaml"
    zero3 = planned(qlora_70b, "distributed.offload_params=none", world_size=2)
    partitions_on_cpu = planned(qlora_70b, world_size=2)
    dpo = planned("24gb/llama3-8b-qlora-dpo.yaml", world_size=1)
    claims = {
        r"llama3-8b-qlora-dpo.yaml`, [^)]*\) is \*\*planned\*\* at ([\d.]+) GiB": dpo.peak_bytes,
        r"it plans ([\d.]+) GiB per checkpoint": on_8.total,
        r"checkpoint \(([\d.]+) GiB per rank on 8 ranks\)": on_8.rank0,
        r"and ([\d.]+) GiB with `checkpoint.full_weights: true`": full.total,
        r"`checkpoint.full_weights: true`, ([\d.]+) GiB of it on rank 0": full.rank0,
        r"both offloads at ([\d.]+) GiB per GPU": offload_on_2.peak_bytes,
        r"both offloads at [\d.]+ GiB per GPU, with ([\d.]+) GiB of CPU memory on the node":
            2 * offload_on_2.cpu_bytes,
        r"needs ([\d.]+) GiB per GPU under ZeRO-3": zero3.peak_bytes,
        r"under ZeRO-3 and ([\d.]+) GiB with its partitions in CPU memory": partitions_on_cpu.peak_bytes,
        r"with its partitions in CPU memory \(([\d.]+) GiB per rank\)": partitions_on_cpu.cpu_bytes,
        r"base's partitions in CPU memory \(([\d.]+) GiB of host RAM for the two ranks\)":
            2 * partitions_on_cpu.cpu_bytes,
    }
    for pattern, program in claims.items():
        value, tolerance = stated(pattern)
        assert abs(program / GiB - value) <= tolerance, (pattern, program / GiB, value)


# ------------------------------------------------------------------------- the quickstart and the chat example

QUICKSTART_LOSS_BAND = 0.05  # float rounding differs between CPUs (vector widths) and thread counts
QUICKSTART_PERPLEXITY_BAND = 0.3
FACTS = ROOT / "recipes" / "examples" / "data" / "chat_facts.json"


def chat_replies(run: Path, questions: list[str]) -> list[str]:
    """One `chat` session, each question asked fresh (/reset between them), greedy; the replies in order."""
    session = "".join(f"{q}\n/reset\n" for q in questions)
    proc = subprocess.run([sys.executable, "-m", "trainer", "chat", str(run), "--temperature", "0"], input=session,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [part.split("\n", 1)[0].strip() for part in proc.stdout.split("model> ")[1:]]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_quickstart_and_the_chat_example_do_what_the_readme_says(tmp_path: Path) -> None:
    """The quickstart as shipped (150 steps) gives the README's loss and perplexity within the stated bands, with its
    metrics, plot and resolved recipe written; the chat
    example as shipped (600 steps over the quickstart's export) answers every one of its 40 facts, each reply ending
    at the end of its turn. Measured: loss 5.5550 -> 2.2426, perplexity 14.98 / 9.03; 40 of 40 answered; about 25 s
    and 100-140 s of training on 2 cores."""
    quickstart, export, chat = tmp_path / "quickstart", tmp_path / "quickstart-export", tmp_path / "chat"
    proc = run_cli(["train", "recipes/quickstart.yaml", f"output_dir={quickstart}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = " ".join(README.read_text(encoding="utf-8").split())
    first, last = map(float, re.search(r"train loss \*\*([\d.]+) -> ([\d.]+)\*\*", text).groups())  # type: ignore
    at_50, at_150 = map(float, re.search(r"eval perplexity ([\d.]+) at step 50 -> ([\d.]+) at step 150",
                                         text).groups())  # type: ignore[union-attr]
    evals = {r["step"]: r["perplexity"] for r in read_metrics(quickstart, "eval")}
    assert sorted(evals) == [50, 100, 150]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes"):  # what it logs
        assert key in read_metrics(quickstart)[-1], key
    assert (quickstart / "loss.png").stat().st_size > 1000
    assert (quickstart / "config.yaml").read_text().startswith("output_dir:")
    summary = re.search(r"trained to step 150: loss ([\d.]+) -> ([\d.]+)", proc.stdout)  # steps 1 and 150
    assert summary, proc.stdout
    got = {"first loss": (float(summary.group(1)), first), "last loss": (float(summary.group(2)), last)}
    for name, (measured, stated_value) in got.items():
        assert abs(measured - stated_value) <= QUICKSTART_LOSS_BAND, (name, measured, stated_value)
    for step, stated_value in ((50, at_50), (150, at_150)):
        assert abs(evals[step] - stated_value) <= QUICKSTART_PERPLEXITY_BAND, (step, evals[step], stated_value)

    proc = run_cli(["export", str(quickstart), "--out", str(export)], fresh=True)  # imports in this process
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Setting accelerator" not in proc.stderr  # DeepSpeed's import notice (transformers imports it)
    proc = run_cli(["train", "recipes/examples/chat-qlora-local.yaml", f"output_dir={chat}",
                    f"model.name_or_path={export}"], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = dict((r["instruction"], r["output"]) for r in json.loads(FACTS.read_text(encoding="utf-8")))
    assert len(facts) == 40
    replies = chat_replies(chat, list(facts))
    wrong = [(q, a, r) for (q, a), r in zip(facts.items(), replies) if r != a]
    assert len(replies) == 40 and not wrong, wrong
