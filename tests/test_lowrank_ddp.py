"""The low-rank-state family on 2 processes, for GaLore and APOLLO alike: per-layer updates under DDP equal the
standard step, sharded state (`zero_stage: 1`) keeps the trajectory and splits the state between the ranks, and a
sharded run killed between two projection renewals resumes bit for bit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import deepspeed_probe
from tests.helpers import (APOLLO, GALORE, ONE_THREAD, QUICKSTART, assert_bitwise_equal, final_weights, losses,
                           max_diff, ok, run_cli, tensor_bytes, tiny)
from trainer.checkpoint.layout import complete_checkpoints
from trainer.safeio import load_tensors

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(600),
              pytest.mark.usefixtures("one_thread")]


@dataclass(frozen=True)
class Family:
    recipe: list[str]  # the optimizer, rank 16 = hidden 64 / 4, renewals at steps 1, 5, 9
    per_layer: str  # the override that turns per-layer updates on
    shard_share: tuple[float, float]  # bounds of each rank's share of the state: whole parameters cannot split finer
    seeds: int  # APOLLO's projection seeds, one per target, each on exactly one rank (0: GaLore keeps none)


FAMILIES = {
    "galore": Family(GALORE, "optimizer.galore.per_layer=true", (0.4, 0.6), 0),
    # the embedding's AdamW moments are a third of APOLLO's state
    "apollo": Family(APOLLO, "optimizer.apollo.per_layer=true", (0.3, 0.7), 14),
}


@dataclass(frozen=True)
class References:
    family: Family
    ddp: Path  # standard updates under DDP, 2 processes, micro-batch 1 x accumulation 2, 12 steps
    sharded: Path  # the same with zero_stage 1
    per_layer: Path  # the same with per-layer updates under DDP


def overrides(family: Family, out: Path, *extra: str) -> list[str]:
    return tiny(out, *family.recipe, "optimizer.grad_clip=null", "train.micro_batch_size=1",
                "train.grad_accum_steps=2", "checkpoint.every_steps=3", *extra, steps=12)


def ddp_args(family: Family, out: Path, *extra: str) -> list[str]:
    return ["train", str(QUICKSTART), *overrides(family, out, *extra)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, References]:
    """For both families, the DDP, sharded and per-layer runs, trained in one 2-rank launch."""
    root = tmp_path_factory.mktemp("lowrank-ddp")
    spec = []
    for name, family in FAMILIES.items():
        for kind, extra in (("ddp", []), ("sharded", ["distributed.zero_stage=1"]), ("per_layer", [family.per_layer])):
            spec.append({"name": f"{name}-{kind}", "overrides": overrides(family, root / f"{name}-{kind}", *extra)})
    deepspeed_probe.launch(root, spec, QUICKSTART, timeout=1200)
    return {name: References(family, root / f"{name}-ddp", root / f"{name}-sharded", root / f"{name}-per_layer")
            for name, family in FAMILIES.items()}


@pytest.fixture(params=list(FAMILIES))
def refs(request: pytest.FixtureRequest, runs: dict[str, References]) -> References:
    return runs[request.param]


def test_ddp_per_layer_equals_standard(refs: References) -> None:
    assert max_diff(final_weights(refs.ddp), final_weights(refs.per_layer)) <= 1e-5
    assert losses(refs.per_layer, range(1, 13)) == pytest.approx(losses(refs.ddp, range(1, 13)), abs=1e-5)


def test_sharded_state_same_trajectory_split_per_rank(refs: References) -> None:
    """zero_stage 1: the same losses and weights as DDP; each rank's checkpoint shard holds its own part of the
    same state (the two add up to the unsharded state)."""
    assert losses(refs.sharded, range(1, 13)) == pytest.approx(losses(refs.ddp, range(1, 13)), abs=1e-5)
    assert max_diff(final_weights(refs.ddp), final_weights(refs.sharded)) <= 1e-5
    (_, full_ckpt), (_, shard_ckpt) = complete_checkpoints(refs.ddp)[-1], complete_checkpoints(refs.sharded)[-1]
    total = tensor_bytes(load_tensors(full_ckpt / "engine-state.pt")["optimizer"]["state"])
    shards = [load_tensors(shard_ckpt / f"optimizer-rank{r:05d}.pt")["state"] for r in (0, 1)]
    sizes = [tensor_bytes(s) for s in shards]
    low, high = refs.family.shard_share
    assert sum(sizes) == total  # the same state tensors, split
    assert all(low * total <= s <= high * total for s in sizes), (sizes, total)
    seeds = [t for s in shards for st in s.values() for k, t in st.items() if k == "proj_seed"]
    assert len(seeds) == refs.family.seeds


def test_sharded_resume_between_renewals_is_bitwise_exact(tmp_path: Path, refs: References) -> None:
    out = tmp_path / "run"
    args = ddp_args(refs.family, out, "distributed.zero_stage=1")
    assert run_cli(args, nproc=2, env={**ONE_THREAD, "TRAINER_FAULT": "sigkill@8"}).returncode != 0
    assert [s for s, _ in complete_checkpoints(out)] == [3, 6]  # step 6: after the renewal of 5, before 9
    resumed = ok(run_cli(args, nproc=2, env=ONE_THREAD))
    assert "resume: auto picked step-000006" in resumed.stderr
    assert losses(out, range(1, 13)) == losses(refs.sharded, range(1, 13))
    assert_bitwise_equal(final_weights(out), final_weights(refs.sharded))
