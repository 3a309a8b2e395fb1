"""Resume on another number of ranks (native engine): a run checkpointed on 2 ranks continues on 1 and on 4 with the
losses and weights of the uninterrupted run, for DDP, `zero_stage: 1` with AdamW and with GaLore (the optimizer
state is resharded), and QLoRA; 4 -> 2 -> 4 equals 4 -> 4; rank 0 reads no file another rank wrote.

Tolerance: the same recipe trained without interruption on 1 rank and on 2 ranks differs by the order in which
gradients are summed (one process accumulating versus DDP's all-reduce). That difference, measured per variant in
the same test, times 4 (at least 1e-6), bounds how far an elastic resume may drift: resharding itself adds
nothing (the optimizer state moves bit for bit), only the new reduction order does. Dropout is 0 in these models,
so the match is to that tolerance, not statistical (the RNG streams of new ranks are derived, not replayed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import QUICKSTART, ROOT, TEST_DATA, read_metrics, run_cli, tiny
from tests.test_adapters import recipe_args
from tests.test_checkpoint import ok
from trainer.checkpoint import complete_checkpoints, writer_of

FP32 = ["precision.dtype=fp32", "optimizer.warmup_steps=0", "logging.every_steps=1", "checkpoint.keep_last=3"]
BATCH = ["train.micro_batch_size=2", "train.global_batch_size=8", "checkpoint.every_steps=4"]
GALORE = ["optimizer.name=galore_adamw", "optimizer.galore.rank=16", "optimizer.galore.update_gap=4"]
VARIANTS = {
    "ddp": [],
    "zero1-adamw": ["distributed.zero_stage=1"],
    "zero1-galore": ["distributed.zero_stage=1", *GALORE],
}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def args(variant: str, out: Path, *extra: str, steps: int = 12, base: Path | None = None) -> list[str]:
    if variant == "qlora":
        assert base is not None
        return ["train", str(QUICKSTART), *recipe_args(out, base, TEST_DATA, "logging.every_steps=1",
                                                       "checkpoint.keep_last=3", "data.max_documents=64", *BATCH,
                                                       *extra, steps=steps)]
    return ["train", str(QUICKSTART), *tiny(out, *FP32, *BATCH, *VARIANTS[variant], *extra, steps=steps)]


def losses(out: Path, steps: range) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in read_metrics(out)}
    return [by_step[s] for s in steps]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of the newest checkpoint: the model, or the adapter of a QLoRA run."""
    _, path = complete_checkpoints(out)[-1]
    if (path / "adapter").is_dir():
        return load_file(str(path / "adapter" / "adapter_model.safetensors"))
    return load_file(str(path / "model.safetensors"))


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def max_loss_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def checkpoint_at(out: Path, step: int) -> Path:
    return dict(complete_checkpoints(out))[step]


@dataclass
class Elastic:
    """One variant: the uninterrupted 2-rank run, the 1-rank run that gives the noise floor, and the resumes from
    step 8 of the 2-rank run on 1 and on 4 ranks."""

    ref: Path
    single: Path
    resumed: dict[int, Path]
    log: dict[int, str]


def run_variant(variant: str, root: Path, base: Path | None = None) -> Elastic:
    ref, single = root / "ref2", root / "single"
    ok(run_cli(args(variant, ref, base=base), nproc=2, env=ONE_THREAD, timeout=600))
    ok(run_cli(args(variant, single, base=base), nproc=1, env=ONE_THREAD, timeout=600))
    resumed, log = {}, {}
    for world in (1, 4):
        out = root / f"resumed-on-{world}"
        proc = ok(run_cli(args(variant, out, f"checkpoint.resume={checkpoint_at(ref, 8)}", base=base), nproc=world,
                          env=ONE_THREAD, timeout=900, torchrun=True))
        resumed[world], log[world] = out, proc.stderr
    return Elastic(ref, single, resumed, log)


def assert_elastic_matches(e: Elastic) -> None:
    floor_loss = max_loss_diff(losses(e.ref, range(1, 13)), losses(e.single, range(1, 13)))
    floor_weights = max_weight_diff(final_weights(e.ref), final_weights(e.single))
    loss_tol, weight_tol = max(4 * floor_loss, 1e-6), max(4 * floor_weights, 1e-6)
    for world, out in e.resumed.items():
        assert f"written by 2 ranks, now {world} ranks" in e.log[world], e.log[world][-2000:]
        got = losses(out, range(9, 13))
        assert max_loss_diff(got, losses(e.ref, range(9, 13))) <= loss_tol, (world, got, loss_tol)
        assert max_weight_diff(final_weights(out), final_weights(e.ref)) <= weight_tol, (world, weight_tol)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_resume_on_one_and_on_four(tmp_path: Path, variant: str) -> None:
    e = run_variant(variant, tmp_path)
    assert "accumulation 2 -> 4, global batch 8 unchanged" in e.log[1]
    assert "accumulation 2 -> 1, global batch 8 unchanged" in e.log[4]
    assert_elastic_matches(e)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1800)
def test_qlora_resumes_on_one_and_on_four(tmp_path: Path, llama_base: Path) -> None:
    assert_elastic_matches(run_variant("qlora", tmp_path, base=llama_base))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1800)
def test_four_to_two_to_four_equals_four_to_four(tmp_path: Path) -> None:
    """zero_stage 1 (sharded AdamW state): 4 ranks to step 4, 2 ranks to step 8, 4 ranks to step 12, against 4
    ranks throughout; the noise floor is 4 ranks against 2 ranks without interruption."""
    ref4, ref2 = tmp_path / "ref4", tmp_path / "ref2"
    ok(run_cli(args("zero1-adamw", ref4), nproc=4, env=ONE_THREAD, timeout=900))
    ok(run_cli(args("zero1-adamw", ref2), nproc=2, env=ONE_THREAD, timeout=900))
    middle, last = tmp_path / "on-2", tmp_path / "back-on-4"
    # the middle run goes on to step 12 too (max_steps shapes the LR schedule); the last one starts from its step 8
    ok(run_cli(args("zero1-adamw", middle, f"checkpoint.resume={checkpoint_at(ref4, 4)}"), nproc=2,
               env=ONE_THREAD, timeout=900))
    ok(run_cli(args("zero1-adamw", last, f"checkpoint.resume={checkpoint_at(middle, 8)}"), nproc=4,
               env=ONE_THREAD, timeout=900))
    floor = max(4 * max_loss_diff(losses(ref4, range(1, 13)), losses(ref2, range(1, 13))), 1e-6)
    weight_floor = max(4 * max_weight_diff(final_weights(ref4), final_weights(ref2)), 1e-6)
    assert max_loss_diff(losses(middle, range(5, 9)), losses(ref4, range(5, 9))) <= floor
    assert max_loss_diff(losses(last, range(9, 13)), losses(ref4, range(9, 13))) <= floor
    assert max_weight_diff(final_weights(last), final_weights(ref4)) <= weight_floor


AUDIT = '''
import os, sys
rank, log = os.environ.get("RANK", "0"), os.environ["OPEN_AUDIT"]
watched = os.path.realpath(sys.argv[1])
opened = open(f"{log}-rank{rank}.txt", "a", buffering=1)

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(watched):
            opened.write(path + "\\n")

sys.addaudithook(hook)
sys.argv = ["trainer", *sys.argv[2:]]
from trainer.__main__ import entry
entry()
'''


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_rank0_opens_no_file_another_rank_wrote(tmp_path: Path) -> None:
    """Every Python-level open of a file under the checkpoints folder is recorded per rank (an audit hook) while 2
    ranks save (zero_stage 1: rank 1 writes its optimizer shard and RNG file) and then resume and save again:
    rank 0 never opens what rank 1 wrote, neither to hash it at save nor to verify it at resume."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    script = tmp_path / "audit.py"
    script.write_text(AUDIT, encoding="utf-8")
    for steps in (4, 8):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(checkpoints), *args("zero1-adamw", out, steps=steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, **ONE_THREAD, "OPEN_AUDIT": str(tmp_path / "opened")})
        assert proc.returncode == 0, proc.stderr[-3000:]
    opened = {r: set((tmp_path / f"opened-rank{r}.txt").read_text().split()) for r in (0, 1)}
    rank1_files = [p for p in checkpoints.rglob("*") if p.is_file() and writer_of(p.name, 2) == 1]
    assert rank1_files and any(str(p.resolve()) in opened[1] for p in rank1_files)  # rank 1 did read its own
    assert not [p for p in rank1_files if str(p.resolve()) in opened[0]]
    manifest = json.loads((checkpoint_at(out, 8) / "manifest.json").read_text())
    assert {name for name in manifest["files"] if writer_of(name, 2) == 1} >= {"rng-rank1.pt",
                                                                                "optimizer-rank00001.pt"}
