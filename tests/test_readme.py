"""Every command in a ```bash block of the README runs as written, in order, in a fresh copy of the repository.

Only two things are changed, as the README says: `pip install` is not run again (this environment is the one it
made; the test command itself is what is running), and training commands get `train.max_steps` lowered (an override
added at the end, which wins) so the suite stays short. A command that fails, or takes longer than COMMAND_TIMEOUT_S,
fails the test with its output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"
QUICK_STEPS = "train.max_steps=12"
COMMAND_TIMEOUT_S = 900  # measured: the slowest (DeepSpeed on 2 ranks, op compiled) under 100 s on 2 cores
SKIP_COPYING = {".git", ".venv", "runs", ".pytest_cache", "__pycache__", ".torch_extensions", "wandb"}


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
    ran = 0
    for command in map(as_tested, readme_commands()):
        if command is None:
            continue
        proc = subprocess.run(["bash", "-c", command], cwd=fresh, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        assert proc.returncode == 0, f"{command}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        ran += 1
    assert ran >= 15
    assert (fresh / "runs" / "chat-merged" / "config.json").is_file()
