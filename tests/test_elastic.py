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

from tests import deepspeed_probe
from tests.helpers import QUICKSTART, ROOT, TEST_DATA, read_metrics, tiny
from tests.helpers import recipe_args
from trainer.checkpoint.layout import complete_checkpoints, writer_of

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
    """Overrides of the quickstart recipe for one variant, writing into `out`."""
    if variant == "qlora":
        assert base is not None
        return recipe_args(out, base, TEST_DATA, "logging.every_steps=1", "checkpoint.keep_last=3",
                           "data.max_documents=64", *BATCH, *extra, steps=steps)
    return tiny(out, *FP32, *BATCH, *VARIANTS[variant], *extra, steps=steps)


def cli_args(variant: str, out: Path, *extra: str, steps: int = 12) -> list[str]:
    return ["train", str(QUICKSTART), *args(variant, out, *extra, steps=steps)]


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


ALL = [*VARIANTS, "qlora"]


@dataclass
class Launches:
    """Every run of this module, trained in one launch per world size (tests/deepspeed_probe.py): for each variant
    the uninterrupted 2-rank run, the 1-rank run that gives the noise floor and the resumes from step 8 of the
    2-rank run on 1 and on 4 ranks; and zero_stage 1 on 4 ranks throughout, resumed from its step 4 on 2 ranks,
    then from that run's step 8 on 4 ranks again."""

    root: Path
    logs: dict[str, str]  # run name -> rank 0's log lines of that run

    def out(self, name: str) -> Path:
        return self.root / name


def probe(root: Path, base: Path, runs: list[tuple[str, str, list[str]]], nproc: int) -> dict[str, str]:
    """(name, variant, extra overrides) runs in one launch of `nproc` ranks; their rank-0 logs by name."""
    spec = [{"name": name, "overrides": args(variant, root / name, *extra, base=base)} for name, variant, extra in runs]
    result = deepspeed_probe.launch(root, spec, QUICKSTART, timeout=1800, nproc=nproc)
    for name, facts in result["facts"][0].items():
        assert "error" not in facts, (name, facts["error"])
    return {name: facts["log"] for name, facts in result["facts"][0].items()}


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> Launches:
    root = tmp_path_factory.mktemp("elastic")
    logs = probe(root, llama_base, [(f"{v}-ref2", v, []) for v in ALL], nproc=2)

    def resumed(v: str, world: int) -> tuple[str, str, list[str]]:
        return f"{v}-on-{world}", v, [f"checkpoint.resume={checkpoint_at(root / f'{v}-ref2', 8)}"]

    logs |= probe(root, llama_base, [*((f"{v}-single", v, []) for v in ALL), *(resumed(v, 1) for v in ALL)],
                  nproc=1)
    logs |= probe(root, llama_base, [*(resumed(v, 4) for v in ALL), ("zero1-ref4", "zero1-adamw", [])], nproc=4)
    # 4 -> 2 -> 4: the middle run goes on to step 12 too (max_steps shapes the LR schedule); the last one starts
    # from its step 8
    logs |= probe(root, llama_base, [("zero1-4to2", "zero1-adamw",
                                      [f"checkpoint.resume={checkpoint_at(root / 'zero1-ref4', 4)}"])], nproc=2)
    logs |= probe(root, llama_base, [("zero1-4to2to4", "zero1-adamw",
                                      [f"checkpoint.resume={checkpoint_at(root / 'zero1-4to2', 8)}"])], nproc=4)
    return Launches(root, logs)


def assert_elastic_matches(e: Launches, variant: str) -> None:
    ref, single = e.out(f"{variant}-ref2"), e.out(f"{variant}-single")
    floor_loss = max_loss_diff(losses(ref, range(1, 13)), losses(single, range(1, 13)))
    floor_weights = max_weight_diff(final_weights(ref), final_weights(single))
    loss_tol, weight_tol = max(4 * floor_loss, 1e-6), max(4 * floor_weights, 1e-6)
    for world in (1, 4):
        name = f"{variant}-on-{world}"
        assert f"written by 2 ranks, now {world} ranks" in e.logs[name], e.logs[name][-2000:]
        got = losses(e.out(name), range(9, 13))
        assert max_loss_diff(got, losses(ref, range(9, 13))) <= loss_tol, (world, got, loss_tol)
        assert max_weight_diff(final_weights(e.out(name)), final_weights(ref)) <= weight_tol, (world, weight_tol)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_resume_on_one_and_on_four(launches: Launches, variant: str) -> None:
    assert "accumulation 2 -> 4, global batch 8 unchanged" in launches.logs[f"{variant}-on-1"]
    assert "accumulation 2 -> 1, global batch 8 unchanged" in launches.logs[f"{variant}-on-4"]
    assert_elastic_matches(launches, variant)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(3600)
def test_qlora_resumes_on_one_and_on_four(launches: Launches) -> None:
    assert_elastic_matches(launches, "qlora")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(3600)
def test_four_to_two_to_four_equals_four_to_four(launches: Launches) -> None:
    """zero_stage 1 (sharded AdamW state): 4 ranks to step 4, 2 ranks to step 8, 4 ranks to step 12, against 4
    ranks throughout; the noise floor is 4 ranks against 2 ranks without interruption."""
    ref4, ref2 = launches.out("zero1-ref4"), launches.out("zero1-adamw-ref2")
    middle, last = launches.out("zero1-4to2"), launches.out("zero1-4to2to4")
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
               str(checkpoints), *cli_args("zero1-adamw", out, steps=steps)]
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
