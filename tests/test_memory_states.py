"""Planned model states (weights + gradients + optimizer state) against the real tensors after one step.

One process per combination (engine native x precision x optimizer x adapter); the multi-rank combinations
(DeepSpeed ZeRO stages, native ZeRO-1, per-layer updates under DDP) are in test_memory_sharded.py. Each run
takes one optimizer step, then its tensors are counted in the middle of the next (after backward, before the
step; with per-layer updates, the most gradient bytes alive at any gradient hook): tests/deepspeed_probe.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import LLAMA, QUICKSTART, save_base, tiny
from tests.deepspeed_probe import count_native_bytes
from trainer.distributed import distributed_context
from trainer.run.loop import setup, train_step
from trainer.optim.per_layer import record_first_use
from trainer.plan.peak import plan
from trainer.plan.per_layer import reduction_order
from trainer.plan.shapes import shapes
from trainer.recipe.resolve import resolve

PLAN_KEYS = {"weights": ("weights", "base weights", "LoRA parameters", "fp32 master"),
             "grads": ("gradients", "LoRA gradients"), "optimizer": ("optimizer state", "LoRA optimizer state")}

FULL = {
    "fp32-adamw": ["precision.dtype=fp32", "optimizer.name=adamw"],
    "bf16-adamw": ["precision.dtype=bf16", "optimizer.name=adamw"],
    "bf16-nomaster-adamw": ["precision.dtype=bf16", "precision.master_weights=false", "optimizer.name=adamw"],
    "fp16-adamw": ["precision.dtype=fp16", "optimizer.name=adamw"],
    "fp32-sgd-momentum": ["optimizer.name=sgd", "optimizer.momentum=0.9", "optimizer.lr=0.01"],
    "bf16-adamw8bit": ["precision.dtype=bf16", "optimizer.name=adamw8bit"],
    "fp32-paged-adamw8bit": ["optimizer.name=paged_adamw8bit"],
    "fp32-galore": ["optimizer.name=galore_adamw", "optimizer.galore.rank=16"],
    "bf16-galore8bit": ["precision.dtype=bf16", "optimizer.name=galore_adamw8bit", "optimizer.galore.rank=16"],
    "fp32-galore-left": ["optimizer.name=galore_adamw", "optimizer.galore.rank=8", "optimizer.galore.proj_type=left"],
    # per-layer updates: one gradient at a time; with accumulation on a refresh step (every step here), all of
    # them at full size. Untied embeddings: the head's share of a tied one waits inside autograd, where no
    # tensor count on CPU can see it (the plan adds it for tied models).
    "bf16-nomaster-galore8bit-per-layer": ["precision.dtype=bf16", "precision.master_weights=false",
                                           "optimizer.name=galore_adamw8bit", "optimizer.galore.rank=16",
                                           "optimizer.galore.per_layer=true", "model.config.tie_word_embeddings=false"],
    "fp32-galore-per-layer-accum2-refresh": ["optimizer.name=galore_adamw", "optimizer.galore.rank=16",
                                             "optimizer.galore.per_layer=true", "optimizer.galore.update_gap=1",
                                             "train.grad_accum_steps=2", "model.config.tie_word_embeddings=false"],
    # APOLLO: seed, limiter norm and projected moments per target (the projection is never stored)
    "fp32-apollo": ["optimizer.name=apollo_adamw", "optimizer.apollo.rank=16"],
    "bf16-apollo-mini-per-layer-accum2": ["precision.dtype=bf16", "optimizer.name=apollo_mini",
                                          "optimizer.apollo.per_layer=true", "train.grad_accum_steps=2",
                                          "model.config.tie_word_embeddings=false"],
    # INT8 weights: values and per-row scales (fp32 master: fp32 scales; bf16 without master: bf16 scales)
    "fp32-galore-int8": ["optimizer.name=galore_adamw", "optimizer.galore.rank=16", "precision.weights=int8"],
    "bf16-nomaster-apollo-mini-per-layer-int8": ["precision.dtype=bf16", "precision.master_weights=false",
                                                 "optimizer.name=apollo_mini", "optimizer.apollo.per_layer=true",
                                                 "precision.weights=int8", "model.config.tie_word_embeddings=false"],
}
ADAPTER = {
    "lora-fp32-adamw": ["adapter.type=lora", "optimizer.name=adamw"],
    "lora-bf16-adamw8bit": ["adapter.type=lora", "precision.dtype=bf16", "optimizer.name=adamw8bit"],
    "qlora-nf4-dq-bf16-paged": ["adapter.type=qlora", "precision.dtype=bf16", "optimizer.name=paged_adamw8bit"],
    "qlora-nf4-fp32": ["adapter.type=qlora", "adapter.quant.double_quant=false", "adapter.quant.compute_dtype=fp32",
                       "optimizer.name=adamw"],
}
SIZE = ["model.config.hidden_size=128", "model.config.intermediate_size=352", "model.config.num_hidden_layers=2",
        "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2"]


def planned(cfg: Any) -> dict[str, int]:
    p = plan(cfg)
    return {k: sum(i.bytes for i in p.items if i.name.startswith(names)) for k, names in PLAN_KEYS.items()}


def real_after_one_step(cfg: Any) -> dict[str, int]:
    """One optimizer step (the state exists), then the tensors counted in the middle of the next one."""
    with distributed_context() as dist:
        run = setup(cfg, dist)
        batches, run.state.position = run.data.step_batches(run.state.position)
        train_step(run, batches)
        run.metrics.close()
        return count_native_bytes(run)


def check(cfg: Any, label: str) -> None:
    plan_bytes, real = planned(cfg), real_after_one_step(cfg)
    for key in ("weights", "grads", "optimizer"):
        print(f"{label} {key}: planned {plan_bytes[key]:,} real {real[key]:,}")
        assert plan_bytes[key] == pytest.approx(real[key], rel=0.02, abs=4096), key
    assert sum(plan_bytes.values()) == pytest.approx(sum(real.values()), rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("combo", list(FULL))
def test_full_training_states_match_plan(tmp_path: Path, combo: str) -> None:
    cfg = resolve(QUICKSTART, tiny(tmp_path / "run", *SIZE, *FULL[combo], "checkpoint.save_final=false",
                                       steps=1))
    check(cfg, combo)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("base"), LLAMA)


@pytest.mark.slow
@pytest.mark.parametrize("combo", list(ADAPTER))
def test_adapter_states_match_plan(tmp_path: Path, combo: str, base: Path, data_dir: Path) -> None:
    cfg = resolve(QUICKSTART, tiny(tmp_path / "run", "model.config=null", f"model.name_or_path={base}",
                                       "model.tokenizer=null", f"data.source={data_dir / 'alpaca_tasks.json'}",
                                       "data.format=alpaca", "data.seq_len=256", "data.max_documents=40",
                                       *ADAPTER[combo], "checkpoint.save_final=false", steps=1))
    check(cfg, combo)


@pytest.mark.parametrize("tokenizer", ["byte", "model config ids"])
def test_planned_reduction_order_is_the_real_models_first_use_order(tmp_path: Path, tokenizer: str) -> None:
    """Per-layer updates under DDP reduce gradients in the reverse of the first forward's order of use; the plan
    takes that order from a narrow copy of the model. The byte tokenizer's pad id (256) is beyond the copy's
    vocabulary: the copy must still build (it once fell back to registration order, 5% under the real peak)."""
    extra = ["model.config.pad_token_id=3"] if tokenizer != "byte" else []
    run = resolve(QUICKSTART, tiny(tmp_path, "optimizer.name=apollo_mini", "optimizer.apollo.per_layer=true",
                                   "model.config.tie_word_embeddings=false", *extra, steps=2), world_size=2)
    sh = shapes(run)
    model = AutoModelForCausalLM.from_config(sh.meta.config)
    used: dict[Any, None] = {}
    record_first_use(model, used)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    names = {p: n for n, p in model.named_parameters()}
    assert reduction_order(sh) == [names[p] for p in used][::-1]
