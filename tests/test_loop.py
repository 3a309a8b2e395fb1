"""The loop: accumulation weighting, fp16 loss scaling, precisions, checkpointing, end to end through the CLI."""

from __future__ import annotations

import faulthandler
import io
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import QUICKSTART, read_metrics, run_cli, tiny
from trainer.__main__ import enable_faulthandler
from trainer.distributed import distributed_context
from trainer.run.loop import Training, run_loop, setup, token_loss_sum
from trainer.recipe.resolve import resolve


def build(overrides: list[str]) -> tuple[Training, object]:
    run = resolve(QUICKSTART, overrides)
    ctx = distributed_context()
    return setup(run, ctx.__enter__()), ctx


def params_after(overrides: list[str]) -> dict[str, torch.Tensor]:
    run, ctx = build(overrides)
    try:
        run_loop(run)
        return {k: v.detach().clone() for k, v in run.engine.module.state_dict().items()}
    finally:
        run.metrics.close()
        ctx.__exit__(None, None, None)


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"max parameter difference {worst:.3g} > {tol}"


def test_token_loss_sum_ignores_masked_and_shifts() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, -100, 5, 6, 0]])
    expected = sum(torch.nn.functional.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum")
                   for b in range(2) for t in range(1, 5) if labels[b, t] != -100)
    assert torch.allclose(token_loss_sum(logits, labels), expected)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("data", ["text", "alpaca", "alpaca-isolated"])
def test_grad_accumulation_matches_big_batch(tmp_path: Path, data: str, optimizer: str,
                                             data_dir: Path) -> None:
    """micro 1 x accum 4 == micro 4 x accum 1 after one step: the loss is the mean over all tokens of the
    step, not a mean of micro-batch means (which would differ for alpaca rows of different lengths).
    SGD makes the update proportional to the gradient, so a wrong weighting cannot hide behind Adam's
    normalization; AdamW at lr 1e-4 keeps float noise in near-zero gradients under the tolerance."""
    lr = "1e-4" if optimizer == "adamw" else "0.5"
    extra = ["precision.dtype=fp32", f"optimizer.name={optimizer}", f"optimizer.lr={lr}", "optimizer.grad_clip=null"]
    if data.startswith("alpaca"):  # padded rows, or packed blocks with attention kept inside each example
        packing = "isolated" if data.endswith("isolated") else "none"
        extra += [f"data.source={data_dir / 'alpaca_tasks.json'}", "data.format=alpaca",
                  f"data.packing={packing}", "data.seq_len=256", "data.max_documents=48"]
    big = params_after(tiny(tmp_path / "big", *extra, "train.micro_batch_size=4", "train.grad_accum_steps=1",
                            steps=1))
    small = params_after(tiny(tmp_path / "small", *extra, "train.micro_batch_size=1", "train.grad_accum_steps=4",
                              steps=1))
    start = params_after(tiny(tmp_path / "start", *extra, "optimizer.lr=1e-30", steps=1))
    assert_same_params(big, small, 1e-5)
    moved = max((big[k] - start[k]).abs().max().item() for k in big)
    assert moved > 5e-5, "the step must actually move the weights for the comparison to mean anything"


def test_fp16_overflow_skips_step_halves_scale_and_continues(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_FAULT", "inf_grad@3")
    run, ctx = build(tiny(tmp_path, "precision.dtype=fp16", "precision.initial_loss_scale=1024", steps=5))
    try:
        snapshots = []
        for stop in range(1, 6):
            run_loop(run, until_step=stop)
            snapshots.append({k: v.clone() for k, v in run.engine.module.state_dict().items()})
    finally:
        run.metrics.close()
        ctx.__exit__(None, None, None)
    rows = read_metrics(tmp_path)
    assert [r["loss_scale"] for r in rows] == [1024.0, 1024.0, 1024.0, 512.0, 512.0]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert_same_params(snapshots[1], snapshots[2], 0.0)  # step 3 was skipped: weights untouched
    assert max((snapshots[3][k] - snapshots[2][k]).abs().max().item() for k in snapshots[2]) > 0
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_fp16_collapse_stops_with_advice(tmp_path: Path) -> None:
    faults = ",".join(f"inf_grad@{s}" for s in range(1, 7))
    proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, "precision.dtype=fp16",
                                                    "precision.max_consecutive_skips=4", steps=6)],
                   env={"TRAINER_FAULT": faults})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "loss scale collapsed" in proc.stderr and "bf16" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_native_crash_prints_the_python_stack(tmp_path: Path) -> None:
    """A rank killed by SIGABRT (what a crash in a CUDA kernel, gloo/NCCL or a compiled op looks like) says where
    in the Python code it was: the CLI enables faulthandler."""
    proc = run_cli(["train", str(QUICKSTART), *tiny(tmp_path, steps=3)], env={"TRAINER_FAULT": "abort@2"})
    assert proc.returncode == -6, proc.stderr[-2000:]
    assert "Fatal Python error: Aborted" in proc.stderr
    stack = proc.stderr[proc.stderr.index("Fatal Python error"):]
    assert 'trainer/faults.py", line' in stack and 'trainer/run/loop.py", line' in stack, stack[-2000:]
    assert not list((tmp_path / "checkpoints").glob("*"))


def test_faulthandler_is_skipped_without_a_real_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a notebook stderr has no file descriptor: the CLI's main() still runs (faulthandler stays off)."""
    was_on = faulthandler.is_enabled()
    faulthandler.disable()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    try:
        enable_faulthandler()
        assert not faulthandler.is_enabled()
    finally:
        if was_on:  # pytest's own handler
            faulthandler.enable(file=sys.__stderr__)


def precision_run(out: Path, dtype: str) -> float:
    """The last loss of 30 quickstart steps in this precision."""
    proc = run_cli(["train", str(QUICKSTART), *tiny(out, f"precision.dtype={dtype}", "optimizer.lr=3e-3",
                                                    "model.config.hidden_size=128", "data.seq_len=128", steps=30)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out)[-1]["loss"]


@pytest.fixture(scope="module")
def fp32_last_loss(tmp_path_factory: pytest.TempPathFactory) -> float:
    """The fp32 reference, run once for both low precisions."""
    return precision_run(tmp_path_factory.mktemp("fp32"), "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_tracks_fp32(tmp_path: Path, dtype: str, fp32_last_loss: float) -> None:
    """30 quickstart steps in bf16/fp16 autocast end within 5% of fp32's loss."""
    low = precision_run(tmp_path, dtype)
    assert abs(low - fp32_last_loss) / fp32_last_loss < 0.05, (low, fp32_last_loss)
    assert fp32_last_loss < 3.5


@pytest.mark.slow
def test_gradient_checkpointing_same_losses_less_memory(tmp_path: Path) -> None:
    """Same trajectory (1e-5) with recomputation, and a lower peak RSS on a model big enough to show it."""
    shape = ["model.config.hidden_size=256", "model.config.intermediate_size=688", "model.config.num_hidden_layers=6",
             "model.config.max_position_embeddings=1024", "data.seq_len=1024", "train.micro_batch_size=4"]
    # Large blocks straight from mmap, so freed memory leaves the RSS and the peak reflects live memory.
    malloc = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = {}
    for gc in ("false", "true"):
        out = tmp_path / f"gc-{gc}"
        proc = run_cli(["train", str(QUICKSTART), *tiny(out, *shape, f"model.gradient_checkpointing={gc}",
                                                        "data.max_bytes=400000", "checkpoint.save_final=false",
                                                        steps=2)], env=malloc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[gc] = read_metrics(out)
    for a, b in zip(rows["false"], rows["true"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    peak_off, peak_on = rows["false"][-1]["peak_mem_bytes"], rows["true"][-1]["peak_mem_bytes"]
    print(f"peak RSS without checkpointing {peak_off / 2**20:.0f} MiB, with {peak_on / 2**20:.0f} MiB")
    assert peak_on < 0.85 * peak_off


def test_bf16_weights_without_master_copy(tmp_path: Path) -> None:
    """precision.master_weights=false stores the model in bf16 (GaLore-7B-on-24GB setting) and still trains."""
    run, ctx = build(tiny(tmp_path, "precision.dtype=bf16", "precision.master_weights=false", steps=8))
    try:
        assert {p.dtype for p in run.engine.module.parameters()} == {torch.bfloat16}
        run_loop(run)
    finally:
        run.metrics.close()
        ctx.__exit__(None, None, None)
    rows = read_metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
