"""The tests' forked trainer processes (tests/forked_cli.py) behave as fresh ones: same results, same exit status
for a signal, and forking really happens inside a test (pytest's own variables do not count as a change)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import forked_cli
from tests.helpers import QUICKSTART, read_metrics, run_cli, tiny


def test_a_call_inside_a_test_is_forked() -> None:
    if not forked_cli.enabled():
        pytest.skip("TRAINER_FORKED_CLI=0: every call starts a fresh interpreter")
    started = forked_cli.server().env  # the session's environment when the server started
    during = {**started, "PYTEST_CURRENT_TEST": os.environ["PYTEST_CURRENT_TEST"]}
    changes = forked_cli.import_time_changes
    assert changes({**during, "OMP_NUM_THREADS": "2", "TRAINER_FAULT": "crash@3"}) == set()
    assert changes({**during, "CROSS_RANK": "0", "MASTER_PORT": "29500"}) == set()  # set while running
    assert changes({**during, "HF_HUB_OFFLINE": "0"}) == {"HF_HUB_OFFLINE"}  # read at import: a fresh process
    set_by_imports = set(forked_cli.server().imported_env()) - set(started)
    assert changes({k: v for k, v in during.items() if k not in set_by_imports}) == set()


@pytest.mark.slow
def test_forked_and_fresh_runs_agree_and_a_signal_is_the_exit_status(tmp_path: Path) -> None:
    losses = {}
    for fresh in (False, True):
        out = tmp_path / f"fresh-{fresh}"
        proc = run_cli(["train", str(QUICKSTART), *tiny(out, steps=4)], fresh=fresh)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "trained to step 4" in proc.stdout
        losses[fresh] = [r["loss"] for r in read_metrics(out)]
    assert losses[False] == losses[True]
    killed = run_cli(["train", str(QUICKSTART), *tiny(tmp_path / "killed", steps=8)],
                     env={"TRAINER_FAULT": "sigkill@2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "SIGKILL after step 2" in killed.stderr
