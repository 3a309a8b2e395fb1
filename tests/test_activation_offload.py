"""Activation offload (trainer/model/activation_offload.py, model.activation_offload): on this CPU machine the saved
tensors are copied to separate host buffers and brought back through the same hooks as on a GPU; the CUDA stream
and pinned-memory parts need a GPU and are not exercised here. What is checked: losses and gradients bitwise equal
with and without it (checkpointing on and off, LoRA, QLoRA, GaLore per-layer, through the real loop), and the bytes
the hooks move against what the memory plan says they move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import QUICKSTART, TEST_DATA, read_metrics, tiny
from tests.helpers import recipe_args
from trainer.model.activation_offload import ActivationOffload, decoder_layers
from trainer.distributed import distributed_context
from trainer.run.loop import Training, run_loop, setup, train_step
from trainer.plan.activations import offloaded_bytes
from trainer.plan.peak import plan
from trainer.plan.shapes import shapes
from trainer.recipe.resolve import resolve


Trained = tuple[list[float], dict[str, torch.Tensor], int]


def trained(overrides: list[str], recipe: Path = QUICKSTART) -> Trained:
    """Losses of each step, the final weights and the bytes the last forward offloaded, of a short run through the
    real loop."""
    run = resolve(recipe, overrides)
    with distributed_context() as dist:
        t = setup(run, dist)
        try:
            run_loop(t)
            weights = {k: v.detach().clone() for k, v in t.engine.module.state_dict().items()}
        finally:
            t.metrics.close()
    moved = t.offload.moved_bytes if t.offload else 0
    return [r["loss"] for r in read_metrics(run.output_dir)], weights, moved


def assert_bitwise_same(plain: Trained, offloaded: Trained) -> None:
    a, b = plain, offloaded
    assert a[2] == 0 and b[2] > 0  # the hooks did move tensors
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    different = [k for k in a[1] if not torch.equal(a[1][k], b[1][k])]
    assert not different, different[:5]


FULL = ["optimizer.warmup_steps=0"]
CASES = {
    "checkpointing": ["model.gradient_checkpointing=true"],
    "no-checkpointing": [],
    "bf16-checkpointing": ["precision.dtype=bf16", "model.gradient_checkpointing=true"],
    "galore-per-layer": ["optimizer.name=galore_adamw", "optimizer.galore.per_layer=true",
                         "optimizer.galore.rank=16", "optimizer.galore.update_gap=2",
                         "model.gradient_checkpointing=true"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_offload_changes_neither_losses_nor_weights(tmp_path: Path, case: str) -> None:
    extra = [*FULL, *CASES[case]]
    plain = trained(tiny(tmp_path / "plain", *extra, steps=3))
    offloaded = trained(tiny(tmp_path / "offload", *extra, "model.activation_offload=true", steps=3))
    assert_bitwise_same(plain, offloaded)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_offload_with_adapters_changes_nothing(tmp_path: Path, llama_base: Path, adapter: str) -> None:
    extra = [f"adapter.type={adapter}", "model.gradient_checkpointing=true", "data.max_documents=40"]
    if adapter == "lora":
        extra.append("precision.dtype=fp32")
    plain = trained(recipe_args(tmp_path / "plain", llama_base, TEST_DATA, *extra, steps=2))
    offloaded = trained(recipe_args(tmp_path / "offload", llama_base, TEST_DATA, *extra,
                                    "model.activation_offload=true", steps=2))
    assert_bitwise_same(plain, offloaded)


def one_step(overrides: list[str]) -> tuple[Training, Any]:
    run = resolve(QUICKSTART, overrides)
    ctx = distributed_context()
    t = setup(run, ctx.__enter__())
    batches, _ = t.data.step_batches(t.state.position)
    train_step(t, batches)
    return t, ctx


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_hooks_move_what_the_plan_says(tmp_path: Path, checkpointing: bool, dtype: str) -> None:
    """Counted by the hooks in one real training step of the quickstart model (4 layers, 8 x 256 tokens)."""
    overrides = [f"output_dir={tmp_path}", "train.max_steps=1", "data.max_bytes=400000", f"precision.dtype={dtype}",
                 f"model.gradient_checkpointing={str(checkpointing).lower()}", "model.activation_offload=true",
                 "logging.progress_bar=false", "train.eval_every_steps=0", "data.eval_fraction=0"]
    t, ctx = one_step(overrides)
    try:
        assert t.offload is not None
        moved, kept = t.offload.moved_bytes, t.offload.kept_bytes
        run = t.run
    finally:
        t.metrics.close()
        ctx.__exit__(None, None, None)
    predicted = offloaded_bytes(run, shapes(run))
    assert moved == pytest.approx(predicted, rel=0.05), (moved, predicted)
    assert kept < 0.01 * moved  # activations too small to be worth a copy (weights are never copied)
    p = plan(run)
    host = [i for i in p.items if i.where == "cpu" and "offloaded" in i.name]
    assert [i.bytes for i in host] == [predicted] and p.offloaded_activations == predicted


def test_the_plan_moves_activations_to_host_memory_and_suggests_offload(tmp_path: Path) -> None:
    base = [f"output_dir={tmp_path}", "model.gradient_checkpointing=true", "train.micro_batch_size=8",
            "data.seq_len=256"]
    without = plan(resolve(QUICKSTART, base))
    with_offload = plan(resolve(QUICKSTART, [*base, "model.activation_offload=true"]))
    moved = with_offload.offloaded_activations
    assert moved > 0 and without.offloaded_activations == 0
    on_gpu = [sum(i.bytes for i in p.items if i.where == "gpu" and i.name.startswith("activations"))
              for p in (without, with_offload)]
    assert on_gpu[1] < on_gpu[0]
    assert with_offload.peak_bytes < without.peak_bytes


def test_saved_tensors_are_grouped_by_decoder_layer() -> None:
    """Prefetching one layer ahead needs to know which layer saved what: the hooks tag tensors by the decoder
    layer running (forward pre-hooks on the longest ModuleList)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(config)
    assert len(decoder_layers(model)) == 4
    offload = ActivationOffload(model, torch.device("cpu"), min_bytes=1)
    ids = torch.randint(0, 64, (2, 16))
    with offload.saving():
        loss = model(input_ids=ids, labels=ids).loss
    assert set(offload.by_layer) >= {0, 1, 2, 3}
    layer_sizes = [sum(offload.moved[k].host.numel() for k in offload.by_layer[n]) for n in (1, 2)]
    assert layer_sizes[0] == layer_sizes[1] > 0  # identical layers save identical bytes
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
