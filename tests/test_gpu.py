"""GPU-only checks (skipped on machines without CUDA): bf16 autocast on CUDA, nccl with one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import QUICKSTART, gpu_available, read_metrics, run_cli, tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")]


def test_bf16_autocast_on_cuda(tmp_path: Path) -> None:
    proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "precision.dtype=bf16", steps=10)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["peak_mem_bytes"] > 0


def test_nccl_single_process(tmp_path: Path) -> None:
    proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "distributed.backend=nccl", steps=5)], torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_metrics(tmp_path)) == 5
