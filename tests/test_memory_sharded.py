"""Planned model states against the real tensors, counted on each of 2 ranks: DeepSpeed (bf16, ZeRO 1-3,
offload), QLoRA under DeepSpeed ZeRO-2 and ZeRO-3 (with offload), and the native engine (DDP, zero_stage 1 with
plain, 8-bit and GaLore optimizers, per-layer updates).

tests/deepspeed_probe.py trains each recipe with the real loop under torchrun (one launch for all of them) and
counts, on every rank, the bytes of the parameters, gradients and optimizer state (DeepSpeed: fp32 master
partitions and Adam moments) held in the middle of a step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import deepspeed_probe
from tests.helpers import QUICKSTART, TEST_DATA, tiny
from tests.helpers import recipe_args
from trainer.plan.optimizer_state import sharded_state_loads
from trainer.plan.peak import plan
from trainer.plan.shapes import shapes
from trainer.recipe.resolve import resolve
from trainer.recipe.resolved import ResolvedRun

RUNS = {"z1": ["distributed.zero_stage=1"], "z2": ["distributed.zero_stage=2"],
        "z2_offload": ["distributed.zero_stage=2", "distributed.offload_optimizer=cpu"],
        "z3": ["distributed.zero_stage=3"]}
BASE = ["precision.dtype=bf16", "distributed.engine=deepspeed", "train.micro_batch_size=2",
        "checkpoint.save_final=false", "checkpoint.resume=never", "model.config.hidden_size=512",
        "model.config.intermediate_size=1376", "model.config.num_hidden_layers=2", "model.config.num_attention_heads=8",
        "model.config.num_key_value_heads=8"]  # matrices above ZeRO-3's persistence threshold (1e5 elements)


# Native engine under 2 processes: DDP (gradients are bucket views), zero_stage 1 (each rank keeps the state of
# the whole parameters it owns; GaLore balanced by state bytes) and per-layer GaLore updates (gradients in flight).
NATIVE_SIZE = ["model.config.hidden_size=128", "model.config.intermediate_size=352", "model.config.num_hidden_layers=2",
               "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",
               "checkpoint.save_final=false", "checkpoint.resume=never"]
NATIVE = {
    "ddp_adamw": ["optimizer.name=adamw"],
    "z1_adamw": ["distributed.zero_stage=1", "optimizer.name=adamw"],
    "z1_bf16_adamw8bit": ["distributed.zero_stage=1", "precision.dtype=bf16", "optimizer.name=adamw8bit"],
    "z1_sgd": ["distributed.zero_stage=1", "optimizer.name=sgd", "optimizer.momentum=0.9", "optimizer.lr=0.01"],
    "z1_galore": ["distributed.zero_stage=1", "optimizer.name=galore_adamw", "optimizer.galore.rank=16"],
    "z1_bf16_galore8bit": ["distributed.zero_stage=1", "precision.dtype=bf16", "optimizer.name=galore_adamw8bit",
                           "optimizer.galore.rank=16"],
    "z1_apollo": ["distributed.zero_stage=1", "optimizer.name=apollo_adamw", "optimizer.apollo.rank=16"],
    "per_layer_apollo_mini": ["optimizer.name=apollo_mini", "optimizer.apollo.per_layer=true",
                              "model.config.tie_word_embeddings=false"],
    # a refresh every step: the reductions carry full-size gradients (the plan's worst case)
    "per_layer_galore": ["optimizer.name=galore_adamw", "optimizer.galore.rank=16", "optimizer.galore.per_layer=true",
                         "optimizer.galore.update_gap=1", "model.config.tie_word_embeddings=false"],
}


def planned(overrides: list[str]) -> dict[str, int]:
    """Plan per rank; with optimizer offload the probe sees no GPU gradient buffers (DeepSpeed reduces into the
    CPU fp32 partitions, which the plan lists as CPU memory), so those compare as GPU gradients = 0."""
    p = plan(resolve(QUICKSTART, overrides, world_size=2))
    get = lambda *names: sum(i.bytes for i in p.items if i.name.startswith(names) and  # noqa: E731
                             (i.where == "gpu" or not i.name.startswith("gradients")))
    return {"params": get("weights"), "grads": get("gradients"), "state": get("fp32 master", "optimizer state")}


# QLoRA under DeepSpeed over the adapter tests' tiny Llama: at ZeRO-3 every tensor partitioned (the tiny model's are all
# under DeepSpeed's persistence threshold; the plan reads the override), once with both offloads.
ALL_PARTITIONED = "distributed.deepspeed_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"
ADAPTER = {"z2_qlora": ["distributed.zero_stage=2"], "z3_qlora": ["distributed.zero_stage=3", ALL_PARTITIONED],
           "z3_qlora_offload": ["distributed.zero_stage=3", ALL_PARTITIONED, "distributed.offload_optimizer=cpu",
                                "distributed.offload_params=cpu"]}


def adapter_overrides(out: Path, base: Path, extra: list[str]) -> list[str]:
    return recipe_args(out, base, TEST_DATA, "distributed.engine=deepspeed", "optimizer.name=adamw",
                       "train.micro_batch_size=1", "checkpoint.save_final=false", "checkpoint.resume=never", *extra,
                       steps=2)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_states_per_rank_match_plan(tmp_path: Path, llama_base: Path) -> None:
    native = [{"name": n, "overrides": tiny(tmp_path / n, *NATIVE_SIZE, *o, steps=2), "inspect": True}
              for n, o in NATIVE.items()]
    adapter = [{"name": n, "overrides": adapter_overrides(tmp_path / n, llama_base, o), "inspect": True}
               for n, o in ADAPTER.items()]
    deepspeed = [{"name": n, "overrides": tiny(tmp_path / n, *BASE, *o, steps=2), "inspect": True}
                 for n, o in RUNS.items()]
    runs = native + deepspeed + adapter
    got = deepspeed_probe.launch(tmp_path, runs, QUICKSTART)["facts"]
    facts = [got[0], got[1]]
    for name, overrides in NATIVE.items():
        check_native(name, resolve(QUICKSTART, tiny(tmp_path / name, *NATIVE_SIZE, *overrides, steps=2), world_size=2),
                     [f[name]["bytes"] for f in facts])
    for name, overrides in RUNS.items():
        want = planned(tiny(tmp_path / name, *BASE, *overrides, steps=2))
        per_rank = [{"params": f[name]["bytes"]["params"], "grads": f[name]["bytes"]["grads"],
                     "state": f[name]["bytes"]["master"] + f[name]["bytes"]["moments"]} for f in facts]
        worst = max(per_rank, key=lambda r: sum(r.values()))  # the plan is the peak rank's
        print(f"{name}: planned {want} real per rank {per_rank}")
        assert sum(want.values()) == pytest.approx(sum(worst.values()), rel=0.02), (name, want, per_rank)
        assert want["state"] == pytest.approx(worst["state"], rel=0.02)
    for name, overrides in ADAPTER.items():
        check_adapter(name, resolve(QUICKSTART, adapter_overrides(tmp_path / name, llama_base, overrides),
                                    world_size=2), [f[name]["bytes"] for f in facts])


def check_adapter(name: str, run: ResolvedRun, per_rank: list[dict[str, int]]) -> None:
    """Each rank's frozen base (partitions, or the whole base, with the 4-bit constants), LoRA weights, gradients
    and DeepSpeed's fp32 master copy with the AdamW moments, on GPU and CPU alike, against the plan. Tolerance:
    DeepSpeed pads flat partitions for alignment (measured within 0.3%), and the plan's AdamW step counter."""
    p = plan(run)
    # ZeRO-2's whole gradient of a tensor straddling a partition boundary is the plan's worst case, not always held
    get = lambda *names: sum(i.bytes for i in p.items if i.name.startswith(names)  # noqa: E731
                             and "straddling" not in i.name)
    want = {"frozen": get("base weights", "quantization constants"), "params": get("LoRA parameters"),
            "grads": get("LoRA gradients"), "state": get("LoRA fp32 master", "LoRA optimizer state")}
    for rank, real in enumerate(per_rank):
        got = {"frozen": real["frozen"], "params": real["params"], "grads": real["grads"],
               "state": real["master"] + real["moments"]}
        print(f"{name} rank {rank}: planned {want} real {got}")
        assert got["frozen"] == want["frozen"], (name, rank, got, want)  # exact: same tensors, same padding
        for key in ("params", "grads", "state"):
            assert got[key] == pytest.approx(want[key], rel=0.02, abs=1024), (name, rank, key, got, want)


def check_native(name: str, run: ResolvedRun, per_rank: list[dict[str, int]]) -> None:
    """Every rank holds the planned weights and gradients; rank r holds the state the plan's partition gives
    it (the same partition function over the same parameter groups), and the plan's peak is the worst rank's."""
    p = plan(run)
    get = lambda *names: sum(i.bytes for i in p.items if i.name.startswith(names))  # noqa: E731
    print(f"{name}: planned weights {get('weights'):,} grads {get('gradients'):,} state {get('optimizer state'):,}; "
          f"real per rank {per_rank}")
    for rank, real in enumerate(per_rank):
        assert get("weights") == real["weights"], (name, rank)
        assert get("gradients") == pytest.approx(real["grads"], rel=0.02), (name, rank)
    if run.recipe.distributed.zero_stage == 1:
        loads = sharded_state_loads(run, shapes(run))
        for rank, real in enumerate(per_rank):
            assert loads[rank] == pytest.approx(real["optimizer"], rel=0.02, abs=4096), (name, rank, loads)
        assert min(loads) > 0, "a rank owns no optimizer state"
    assert get("optimizer state") == pytest.approx(max(r["optimizer"] for r in per_rank), rel=0.02, abs=4096)
