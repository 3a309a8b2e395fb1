"""LoRA / QLoRA training end to end on the real libraries (bitsandbytes' CPU backend, peft): a QLoRA run on the
generated Alpaca-style data (tests/data), its checkpoint and exports, SIGKILL resume, DDP, QDoRA on a second family,
and the paged optimizer on a GPU. The tiny models, the data and the helpers are tests/test_adapters.py's."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers import LLAMA, QUICKSTART, QWEN2, ROOT, TEST_DATA, read_metrics, run_cli, same_shape_other_base
from tests.helpers import linear_weights, logits_of, lora_formula, qlora, recipe_args
from trainer import adapters
from trainer.adapters.merge import load_base
from trainer.checkpoint.layout import complete_checkpoints
from trainer.data.batches import DataPosition
from trainer.distributed import distributed_context
from trainer.errors import CheckpointError
from trainer.use.export import export
from trainer.run.loop import run_loop, setup
from trainer.recipe.resolve import resolve
from trainer.safeio import sha256
from trainer.recipe.schema import ModelConfig

# ------------------------------------------------------------------------------------ end-to-end QLoRA run

def snapshot_frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen tensor of the model, 4-bit codes and their quantization constants included."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        out[name] = p.data.clone()
        state = getattr(p, "quant_state", None)
        if state is not None:
            out[name + ".absmax"] = state.absmax.clone()
            if state.nested:
                out[name + ".nested_absmax"] = state.state2.absmax.clone()
    out.update({n: b.clone() for n, b in model.named_buffers()})
    return out


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> dict[str, Any]:
    """8 QLoRA steps on Alpaca in this process, with the model's state before and after."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    cfg = resolve(QUICKSTART, recipe_args(out, llama_base, TEST_DATA, steps=8))
    with distributed_context() as dist:
        run = setup(cfg, dist)
        model = run.engine.module
        first = run.data.step_batches(DataPosition())[0][0]
        before = snapshot_frozen(model)
        lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        run_loop(run)
        run.metrics.close()
        lora_after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return {"out": out, "model": model, "first_batch": first, "frozen_before": before,
                "frozen_after": snapshot_frozen(model), "lora_before": lora_before, "lora_after": lora_after,
                "logits": logits_of(model)}


@pytest.mark.slow
def test_qlora_on_alpaca_trains_only_the_adapter(qlora_run: dict[str, Any]) -> None:
    batch = qlora_run["first_batch"]
    assert 0 < batch.num_loss_tokens() < 0.9 * batch.num_tokens()  # the prompts are masked out of the loss
    losses = [r["loss"] for r in read_metrics(qlora_run["out"])]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    before, after = qlora_run["frozen_before"], qlora_run["frozen_after"]
    assert before.keys() == after.keys() and len(before) > 30
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    changed = [n for n in qlora_run["lora_before"] if not torch.equal(qlora_run["lora_before"][n],
                                                                      qlora_run["lora_after"][n])]
    assert changed == list(qlora_run["lora_before"])  # every A and every B moved
    assert len(changed) == 2 * 14 and lora_formula(LLAMA, 8, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"}) == \
        sum(p.numel() for p in qlora_run["lora_after"].values())


@pytest.mark.slow
def test_checkpoint_holds_only_adapter_and_its_optimizer(qlora_run: dict[str, Any], llama_base: Path) -> None:
    (_, ckpt), = complete_checkpoints(qlora_run["out"])
    assert not (ckpt / "model.safetensors").exists()
    tensors = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    trainable = sum(p.numel() for p in qlora_run["lora_after"].values())
    assert all("lora_" in k for k in tensors) and sum(t.numel() for t in tensors.values()) == trainable
    weights_and_state = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size + \
        (ckpt / "engine-state.pt").stat().st_size
    assert weights_and_state < 12 * trainable + 64_000  # fp32 adapter + two fp32 AdamW moments + headers
    everything = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert everything < 0.35 * (llama_base / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_exported_adapter_and_merged_model_reproduce_logits(qlora_run: dict[str, Any], llama_base: Path,
                                                            tmp_path: Path) -> None:
    """--adapter-only loads with PeftModel.from_pretrained(base, DIR): identical logits. --merge gives a plain
    transformers model (fp32 export). Tolerance from bf16's 8-bit mantissa: at logits of magnitude ~1.6 one bf16
    step is 0.008, and the merged model rounds W + BA once where the adapter model rounds W and BA x apart.
    Measured (two runs): under the same bf16 autocast max |diff| 0.027-0.043 (asserted < 0.08, ~10 steps), rms
    0.0019 (asserted < 0.005); merged model in plain fp32: rms 0.0015-0.003 (asserted < 0.005). peft's merge
    into the 4-bit weights re-quantizes them (peft#2321): rms 0.019, asserted at least 5x ours."""
    from peft import PeftModel

    expected = qlora_run["logits"]
    with pytest.raises(CheckpointError, match="holds a LoRA adapter, not a full model: export with --adapter-only"):
        export(qlora_run["out"], tmp_path / "plain")
    with pytest.raises(CheckpointError, match="exclude each other"):
        export(qlora_run["out"], tmp_path / "both", adapter_only=True, merge=True)
    adapter_dir = export(qlora_run["out"], tmp_path / "adapter", adapter_only=True)
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "tokenizer.json").is_file()
    mcfg = ModelConfig(name_or_path=str(llama_base))
    base = load_base(mcfg, qlora(), "bf16", torch.device("cpu"))
    adapters.prepare_frozen(base, gradient_checkpointing=False)
    assert torch.equal(logits_of(PeftModel.from_pretrained(base, str(adapter_dir))), expected)

    merged_dir = export(qlora_run["out"], tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float32 and getattr(merged.config, "quantization_config", None) is None
    ours = logits_of(merged) - expected  # the same bf16 autocast as the adapter model
    ours_rms = ours.pow(2).mean().sqrt().item()
    assert ours.abs().max().item() < 0.08 and ours_rms < 0.005, (ours.abs().max().item(), ours_rms)
    rms_fp32 = (logits_of(merged, autocast=False) - expected).pow(2).mean().sqrt().item()
    assert rms_fp32 < 0.005, rms_fp32

    requantized = PeftModel.from_pretrained(load_base(mcfg, qlora(), "bf16", torch.device("cpu")),
                                            str(adapter_dir)).merge_and_unload()
    naive_rms = (logits_of(requantized) - expected).pow(2).mean().sqrt().item()
    assert naive_rms > 5 * ours_rms, (ours_rms, naive_rms)


# ----------------------------------------------------------------------------- resume, DDP, second family

def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    (_, path), *_ = reversed(complete_checkpoints(out))
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def ok(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses_by_step(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def cli_args(out: Path, base: Path, data: Path, *extra: str) -> list[str]:
    """The CLI runs below: 6 steps, checkpoints every 2, the paged 8-bit optimizer (its state must resume)."""
    return ["train", str(QUICKSTART), *recipe_args(out, base, data, "checkpoint.every_steps=2",
                                                   "optimizer.name=paged_adamw8bit", *extra, steps=6)]


@pytest.fixture(scope="module")
def single_ref(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> Path:
    """One uninterrupted process, micro-batch 2: the reference of the resume and the DDP tests."""
    out = tmp_path_factory.mktemp("ref") / "run"
    ok(run_cli(cli_args(out, llama_base, TEST_DATA)))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_then_resume_is_exact_on_qlora(tmp_path: Path, llama_base: Path, data_dir: Path,
                                               single_ref: Path) -> None:
    """Adapter, paged_adamw8bit state, LR schedule and mid-epoch data position: all restored bitwise."""
    out = tmp_path / "run"
    killed = run_cli(cli_args(out, llama_base, data_dir), env={"TRAINER_FAULT": "sigkill@5"})
    assert killed.returncode != 0
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4]
    resumed = ok(run_cli(cli_args(out, llama_base, data_dir)))
    assert "resume: auto picked step-000004" in resumed.stderr
    assert resumed.stderr.count("paged_adamw8bit: paging needs CUDA") == 1
    assert losses_by_step(out) == losses_by_step(single_ref)  # bitwise: == on floats
    assert sorted(losses_by_step(out)) == list(range(1, 7))
    a, b = final_adapter(out), final_adapter(single_ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_ddp_qlora_matches_one_process_with_doubled_micro_batch(tmp_path: Path, llama_base: Path,
                                                                data_dir: Path, single_ref: Path) -> None:
    """2 ranks x micro-batch 1 == 1 rank x micro-batch 2 (the same global batch of 2 sequences). Not bitwise:
    bf16 matmuls over other batch shapes round differently. Measured: losses within 6e-5, LoRA B within 1% after
    6 steps (Adam amplifies tiny gradient differences in near-zero entries); asserted: 5e-4 and 3%."""
    ok(run_cli(cli_args(tmp_path, llama_base, data_dir, "train.micro_batch_size=1"), nproc=2))
    two, one = losses_by_step(tmp_path), losses_by_step(single_ref)
    assert sorted(two) == sorted(one) == list(range(1, 7))
    worst = max(abs(two[s] - one[s]) for s in one)
    assert worst < 5e-4, (two, one)
    a, b = final_adapter(tmp_path), final_adapter(single_ref)
    lora_b = [k for k in a if "lora_B" in k]
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in lora_b) ** 0.5 / sum((b[k] ** 2).sum() for k in lora_b) ** 0.5
    assert diff < 0.03, diff


@pytest.mark.slow
def test_qdora_on_qwen2_trains(tmp_path: Path, qwen_base: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second family (Qwen2: GQA, q/k/v biases) with DoRA on 4-bit weights and the 8-bit optimizer."""
    cfg = resolve(QUICKSTART, recipe_args(tmp_path, qwen_base, TEST_DATA, "adapter.use_dora=true",
                                              "adapter.target_modules=[q_proj, v_proj]", "optimizer.name=adamw8bit",
                                              "model.tokenizer=byte", steps=5))
    with caplog.at_level(logging.INFO, logger="trainer.model.build"), distributed_context() as dist:
        run = setup(cfg, dist)
        run_loop(run)
        run.metrics.close()
    dora = lora_formula(QWEN2, 8, {"q_proj", "v_proj"}) + 2 * (128 + 64)  # + a magnitude per output row
    assert f"{dora:,} trainable" in caplog.text
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert losses[-1] < losses[0] - 0.1 and all(math.isfinite(x) for x in losses)


# ------------------------------------------------------------------------------------ the base it was trained on

def forget_base_identity(ckpt: Path) -> None:
    """Make `ckpt` look like one written before base identities were recorded (its manifest updated to match)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["base_model"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"] = {"size": (ckpt / "trainer_state.json").stat().st_size,
                                               "sha256": sha256(ckpt / "trainer_state.json")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_replaced_base_is_refused_on_resume_and_merge_unless_forced(tmp_path: Path, llama_base: Path,
                                                                       caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA run over a local base given by a relative path; the base is then replaced by another of the same
    shape. Resume is refused before the base is loaded and `export --merge` is refused, both showing the two
    identities and what differs; --force goes on with a warning; generate/chat warn in one line. The adapter's
    config names the base by its absolute path, so an --adapter-only export loads from any working directory. A
    checkpoint that recorded no identity resumes with a warning."""
    from trainer.use.chat import load

    monkeypatch.chdir(ROOT)  # the recipe's relative path is read from here, as run_cli's subprocesses read it
    base = shutil.copytree(llama_base, tmp_path / "base")
    out, relative = tmp_path / "run", Path(os.path.relpath(base, ROOT))

    def train(steps: int, *flags: str) -> Any:
        return run_cli(["train", str(QUICKSTART), *recipe_args(out, relative, TEST_DATA, "adapter.type=lora",
                                                                 steps=steps), *flags])

    ok(train(2))
    (_, trained), = complete_checkpoints(out)
    adapter_config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)  # absolute, not the recipe's relative path

    same_shape_other_base(llama_base, base)
    refused = train(3)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "the base model is not the one the adapter was trained on" in refused.stderr
    assert f"trained on: {base}, id " in refused.stderr and f"found now:  {base}, id " in refused.stderr
    assert "file model.safetensors: same size and header, different contents" in refused.stderr
    assert "--force" in refused.stderr and "trainer.model.build" not in refused.stderr  # refused before loading

    with pytest.raises(CheckpointError, match="--merge refused: the base model found now is not the one"):
        export(out, tmp_path / "merged", merge=True)
    with caplog.at_level(logging.WARNING):
        export(out, tmp_path / "merged", merge=True, force=True)
        load(trained)
    assert "--force: merging the adapter of" in caplog.text
    (warning,) = [r.getMessage() for r in caplog.records if "is not the one the adapter" in r.getMessage()]
    assert "\n" not in warning and f"trained on {base}, id " in warning and f"; found {base}, id " in warning

    forced = ok(train(3, "--force"))
    assert "--force: resuming the adapter of" in forced.stderr and "different contents" in forced.stderr
    assert read_metrics(out)[-1]["step"] == 3

    adapter_only = export(out, tmp_path / "adapter", adapter_only=True)
    assert json.loads((adapter_only / "base_model.json").read_text())["path"] == str(base)
    monkeypatch.chdir(tmp_path)
    caplog.clear()
    assert load(adapter_only).model.peft_config["default"].base_model_name_or_path == str(base)
    assert "is not the one the adapter" not in caplog.text  # the forced resume recorded the base it went on with

    monkeypatch.chdir(ROOT)
    forget_base_identity(complete_checkpoints(out)[-1][1])
    cfg = resolve(QUICKSTART, recipe_args(out, relative, TEST_DATA, "adapter.type=lora", steps=4))
    with caplog.at_level(logging.WARNING), distributed_context() as dist:
        setup(cfg, dist).metrics.close()
    assert "records no identity of its base model (written before they were recorded)" in caplog.text


# ---------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: paging and CUDA 4-bit kernels")
def test_qlora_on_gpu_pages_the_optimizer(tmp_path: Path, llama_base: Path, data_dir: Path) -> None:
    """GPU only (paged optimizers need CUDA unified memory): the quantized base lives on the GPU, the 8-bit
    optimizer state is paged, and the loss falls."""
    cfg = resolve(QUICKSTART, recipe_args(tmp_path, llama_base, data_dir, "optimizer.name=paged_adamw8bit",
                                              steps=6))
    with distributed_context() as dist:
        run = setup(cfg, dist)
        run_loop(run)
        run.metrics.close()
        weights = [m.weight for m in linear_weights(run.engine.module).values() if hasattr(m.weight, "quant_state")]
        assert weights and all(w.device.type == "cuda" for w in weights)
        states = [s for s in run.engine.optimizer.state.values() if "state1" in s]
        assert states and all(getattr(s["state1"], "is_paged", False) for s in states)
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert losses[-1] < losses[0]
