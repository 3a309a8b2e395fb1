"""DDP under torchrun (gloo, 2 processes) matches one process on the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import QUICKSTART, read_metrics, run_cli, tiny

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(600)]


@pytest.mark.parametrize("ddp_batch", [["train.micro_batch_size=2", "train.grad_accum_steps=1"],
                                       ["train.micro_batch_size=1", "train.grad_accum_steps=2"]],
                         ids=["micro2", "micro1-accum2"])
def test_two_processes_match_one(tmp_path: Path, ddp_batch: list[str]) -> None:
    single = run_cli(["train", str(QUICKSTART), *tiny(tmp_path / "one", "train.micro_batch_size=4",
                                                      "train.grad_accum_steps=1")])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(["train", str(QUICKSTART), *tiny(tmp_path / "two", *ddp_batch)], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert a["tokens"] == b["tokens"]
    assert one[-1]["loss"] < one[0]["loss"]


def test_torchrun_single_process_initializes_group(tmp_path: Path) -> None:
    """Under torchrun a single process still gets a process group (gloo here), and tears it down."""
    proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, steps=2)], torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process group up: backend gloo, world size 1" in proc.stderr
    assert len(read_metrics(tmp_path)) == 2
