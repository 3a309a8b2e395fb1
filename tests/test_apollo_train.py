"""APOLLO, APOLLO-Mini and INT8 weights through the real loop: per-layer updates equal standard ones (with
accumulation; under 2-process DDP and sharded: tests/test_lowrank_ddp.py), bitwise resume between two projection
renewals with INT8 weights, and the losses on Shakespeare: APOLLO and APOLLO-Mini against
AdamW, GaLore with INT8 weights against GaLore in bf16, GaLore's subspace refresh against the full SVD."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import APOLLO, killed_at_8_resumes_bitwise, max_diff, train_in_process
from trainer.checkpoint.layout import complete_checkpoints


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["apollo_adamw", "apollo_mini"])
@pytest.mark.parametrize("batch", [["train.micro_batch_size=4", "train.grad_accum_steps=1"],
                                   ["train.micro_batch_size=1", "train.grad_accum_steps=4"]], ids=["accum1", "accum4"])
def test_per_layer_equals_standard_apollo(tmp_path: Path, batch: list[str], name: str) -> None:
    """fp32, 10 steps: updates inside backward (the full gradient accumulated between micro-steps) give the
    same parameters as one optimizer step after backward, within 1e-5."""
    common = [*APOLLO, f"optimizer.name={name}", "optimizer.grad_clip=null", *batch]
    std, std_rows, start = train_in_process([*common, f"output_dir={tmp_path / 'std'}"])
    per, per_rows, _ = train_in_process([*common, "optimizer.apollo.per_layer=true", f"output_dir={tmp_path / 'pl'}"])
    assert max_diff(std, per) <= 1e-5
    assert max_diff(std, start) > 1e-2  # the runs trained
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 for a, b in zip(std_rows, per_rows))


# --- resume with INT8 weights (the 2-process tests of the family: tests/test_lowrank_ddp.py) ------------------

@pytest.mark.slow
def test_resume_int8_apollo_mini_per_layer_is_bitwise_exact(tmp_path: Path) -> None:
    """APOLLO-Mini with per-layer updates, accumulation, clipping and INT8 weights in bf16: killed after step
    8, resumed from step 6 (between the renewals of steps 5 and 9), the same losses, norms and weights bit
    for bit; the checkpoint holds the INT8 values and the dequantized weights."""
    extra = ["optimizer.name=apollo_mini", "optimizer.apollo.per_layer=true", "optimizer.grad_clip=0.5",
             "precision.dtype=bf16", "precision.weights=int8", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
    out = killed_at_8_resumes_bitwise(tmp_path, [*APOLLO, *extra])
    int8 = load_file(str(complete_checkpoints(out)[-1][1] / "int8-weights.safetensors"))
    assert len(int8) == 2 * 14
    assert all(t.dtype == torch.int8 for k, t in int8.items() if k.endswith(".int_data"))


# --- losses on Shakespeare ---------------------------------------------------------------------------------

SHAKESPEARE = ["data.max_bytes=10000000", "data.seq_len=128", "train.micro_batch_size=8",
               "model.config.intermediate_size=176", "optimizer.lr=3e-3", "optimizer.warmup_steps=5",
               "optimizer.galore.update_gap=20", "optimizer.galore.rank=16"]
STEPS = 60


def final_loss(tmp_path: Path, data_dir: Path, name: str, *extra: str) -> tuple[float, list[dict]]:
    """Mean loss of the last 5 of 60 steps (train.seed 0: the same initial weights and batches for all)."""
    _, rows, _ = train_in_process([f"data.source={data_dir / 'shakespeare.txt'}", *SHAKESPEARE, *extra,
                                   f"output_dir={tmp_path / name}"], steps=STEPS)
    return sum(r["loss"] for r in rows[-5:]) / 5, rows


@pytest.mark.slow
def test_apollo_and_apollo_mini_within_5_percent_of_adamw(tmp_path: Path, data_dir: Path) -> None:
    """The papers' claim at small scale: same model, data, seed, steps and learning rate; APOLLO at rank 16 of
    hidden 64, APOLLO-Mini at rank 1 with the tensor-wise scale."""
    runs = {"adamw": [], "apollo_adamw": ["optimizer.apollo.rank=16"], "apollo_mini": []}  # mini: rank 1
    final = {name: final_loss(tmp_path, data_dir, name, f"optimizer.name={name}", *extra)[0]
             for name, extra in runs.items()}
    print(final)
    assert final["adamw"] < 3.6  # learned (chance is 5.6)
    assert final["apollo_adamw"] <= 1.05 * final["adamw"], final
    assert final["apollo_mini"] <= 1.05 * final["adamw"], final


@pytest.mark.slow
def test_galore_int8_within_5_percent_of_galore_bf16(tmp_path: Path, data_dir: Path) -> None:
    """GaLore rank 16 in bf16, with fp32 master weights against INT8 weights with stochastic rounding."""
    galore = ["optimizer.name=galore_adamw", "precision.dtype=bf16"]
    bf16, _ = final_loss(tmp_path, data_dir, "bf16", *galore)
    int8, _ = final_loss(tmp_path, data_dir, "int8", *galore, "precision.weights=int8")
    print({"bf16": bf16, "int8": int8})
    assert bf16 < 3.6
    assert int8 <= 1.05 * bf16, (int8, bf16)


@pytest.mark.slow
def test_subspace_refresh_same_loss_as_full_svd(tmp_path: Path, data_dir: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Refreshes at steps 1, 21, 41: the first by a full SVD, the later ones by subspace iteration unless the
    subspace moved too much (counted in the log). The loss stays within 1% of the full SVD's (the noise of a
    changed projector: different seeds of the same run differ by more)."""
    galore = ["optimizer.name=galore_adamw"]
    full, _ = final_loss(tmp_path, data_dir, "full", *galore)
    with caplog.at_level(logging.INFO, logger="trainer.optim.galore"):
        sub, _ = final_loss(tmp_path, data_dir, "subspace", *galore, "optimizer.galore.svd=subspace")
    rounds = [r.getMessage() for r in caplog.records if "GaLore subspace refresh" in r.getMessage()]
    print({"full": full, "subspace": sub}, rounds)
    assert len(rounds) == 3  # one line per round of 14 refreshes
    warm, total, cold = map(int, re.search(r"(\d+) of (\d+) refreshes so far by subspace iteration, (\d+) by a "
                                            r"full SVD", rounds[-1]).groups())  # type: ignore[union-attr]
    assert total == 42 and warm + cold == 42 and cold >= 14  # the first round is always a full SVD
    assert sub == pytest.approx(full, rel=0.01)
