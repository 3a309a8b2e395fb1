"""Planned model states against DeepSpeed's real tensors, counted on each of 2 ranks (bf16, ZeRO 1-3, offload).

tests/deepspeed_probe.py trains each recipe with the real loop under torchrun and counts, on every rank, the bytes
of the parameters, gradients, fp32 master partitions and Adam moments DeepSpeed holds in the middle of a step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
import pytest

from tests.conftest import QUICKSTART, ROOT, tiny
from trainer.config import load_recipe
from trainer.memory import plan

RUNS = {"z1": ["distributed.zero_stage=1"], "z2": ["distributed.zero_stage=2"],
        "z2_offload": ["distributed.zero_stage=2", "distributed.offload_optimizer=cpu"],
        "z3": ["distributed.zero_stage=3"]}
BASE = ["precision.dtype=bf16", "distributed.engine=deepspeed", "train.micro_batch_size=2",
        "checkpoint.save_final=false", "checkpoint.resume=never", "model.config.hidden_size=512",
        "model.config.intermediate_size=1376", "model.config.num_hidden_layers=2", "model.config.num_attention_heads=8",
        "model.config.num_key_value_heads=8"]  # matrices above ZeRO-3's persistence threshold (1e5 elements)


def planned(overrides: list[str]) -> dict[str, int]:
    """Plan per rank; with optimizer offload the probe sees no GPU gradient buffers (DeepSpeed reduces into the
    CPU fp32 partitions, which the plan lists as CPU memory), so those compare as GPU gradients = 0."""
    p = plan(load_recipe(QUICKSTART, overrides), world_size=2)
    get = lambda *names: sum(i.bytes for i in p.items if i.name.startswith(names) and  # noqa: E731
                             (i.where == "gpu" or not i.name.startswith("gradients")))
    return {"params": get("weights"), "grads": get("gradients"), "state": get("fp32 master", "optimizer state")}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_zero_states_per_rank_match_plan(tmp_path: Path) -> None:
    runs = [{"name": n, "overrides": tiny(tmp_path / n, *BASE, *o, steps=2), "inspect": True} for n, o in RUNS.items()]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"recipe": str(QUICKSTART), "runs": runs}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "deepspeed_probe.py"), str(spec), str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for name, overrides in RUNS.items():
        want = planned(tiny(tmp_path / name, *BASE, *overrides, steps=2))
        per_rank = [{"params": f[name]["bytes"]["params"], "grads": f[name]["bytes"]["grads"],
                     "state": f[name]["bytes"]["master"] + f[name]["bytes"]["moments"]} for f in facts]
        worst = max(per_rank, key=lambda r: sum(r.values()))  # the plan is the peak rank's
        print(f"{name}: planned {want} real per rank {per_rank}")
        assert sum(want.values()) == pytest.approx(sum(worst.values()), rel=0.02), (name, want, per_rank)
        assert want["state"] == pytest.approx(worst["state"], rel=0.02)
