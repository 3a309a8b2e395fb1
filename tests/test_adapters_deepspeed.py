"""LoRA and QLoRA on DeepSpeed ZeRO-2 and ZeRO-3, 2 gloo ranks on CPU, on the real libraries (DeepSpeed,
bitsandbytes NF4, peft) and the tiny Llama and Alpaca data the adapter tests use (tests/test_adapters.py).

One torchrun launch of tests/deepspeed_probe.py trains every DeepSpeed run (module fixture `zero`); two
single-process runs are the references (`single`). Tolerances:
- DeepSpeed (2 ranks x micro-batch 1) vs one process (micro-batch 2), same global batch. LoRA runs in fp32, where
  the engines must agree up to the order of float sums: 1e-5 on the loss (measured over 6 steps: at most 5.3e-7 at
  ZeRO-2). QLoRA computes in bf16 (fp32 LoRA weights under bf16 autocast on every engine, DeepSpeed's
  torch_autocast), where bf16 matmuls over other batch shapes round differently: 5e-4, the tolerance of the DDP
  adapter test (tests/test_adapters_train.py); measured 1.4e-4 to 3.5e-4 (ZeRO-2, ZeRO-3, ZeRO-3 with both
  offloads). For scale: the same LoRA run in bf16 differs from itself in fp32 by up to 5.9e-4, and bf16 LoRA on
  ZeRO-2 from one process by up to 8.6e-4 (one step; the others under 2.4e-4), which is why LoRA is checked in
  fp32.
- resume after SIGKILL: bitwise (== on floats), on both stages.
- export: the peft adapter over the base as trained gives the logits the ZeRO-3 engine gave (same bf16
  autocast): measured identical, asserted within 1e-5; the merged model within the merged-export tolerance of
  tests/test_adapters_train.py (max 0.08, rms 0.005; measured max 0.0078, rms 0.0013).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from tests import deepspeed_probe
from tests.helpers import LLAMA, QUICKSTART, TEST_DATA, read_metrics, run_cli, save_base
from tests.helpers import adapter_run, fixed_ids, logits_of, qlora, recipe_args
from tests.helpers import losses, ok
from trainer import adapters
from trainer.adapters import streamed
from trainer.adapters.footprint import held_frozen_bytes
from trainer.adapters.quant import bnb_config, quant_state_bytes
from trainer.adapters.merge import load_base
from trainer.checkpoint.layout import complete_checkpoints
from trainer.use.export import export
from trainer.model.build import build_model
from trainer.recipe.schema import ModelConfig
from trainer.model.tokenizer import byte_tokenizer

STEPS = 6
IDS = fixed_ids().tolist()
ALL_PARTITIONED = "distributed.deepspeed_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"
LORA = ["adapter.type=lora", "precision.dtype=fp32"]  # exact up to float sums: see the module docstring
LORA_TOLERANCE, QLORA_TOLERANCE = 1e-5, 5e-4
OFFLOAD = ["distributed.offload_optimizer=cpu", "distributed.offload_params=cpu"]
# QLoRA DPO: the rewards are beta x differences of bf16 log-prob sums over whole responses, each rounded in other
# batch shapes; measured over 6 steps: loss 4.6e-4, rewards 1.2e-3 (of rewards up to 0.18); about 2x headroom
DPO_TOLERANCE = {"loss": 1e-3, "rewards_chosen": 2.5e-3, "rewards_rejected": 2.5e-3}
DPO = ["data.format=preference", f"data.source={TEST_DATA / 'preference_pairs.json'}", "data.chat_template=chatml",
       "data.seq_len=128", "objective.name=dpo"]  # QLoRA DPO, its reference the base with the adapters disabled


# ------------------------------------------------------------------------------- loading module by module

@pytest.mark.parametrize("tied", [False, True])
def test_module_by_module_loading_equals_from_pretrained(tmp_path: Path, tied: bool) -> None:
    """What ZeRO-3 adapter runs load (one module at a time, no partitioning here) is what from_pretrained loads:
    the same layers, the same 4-bit codes and quantization constants bit for bit, the same buffers, the same
    tying, and (both prepared alike) the same logits."""
    base = save_base(tmp_path / "base", {**LLAMA, "tie_word_embeddings": tied})
    adapter = qlora()
    expected = load_base(ModelConfig(name_or_path=str(base)), adapter, "bf16", torch.device("cpu"))
    model = streamed.skeleton(AutoConfig.from_pretrained(base), torch.bfloat16, bnb_config(adapter.quant), False)
    streamed.load_streamed(model, streamed.checkpoint_files(base), torch.bfloat16, torch.device("cpu"), None)
    for m in (expected, model):
        adapters.prepare_frozen(m, gradient_checkpointing=False)
    want, got = dict(expected.named_parameters()), dict(model.named_parameters())
    assert want.keys() == got.keys() and len(want) >= 20
    for name, p in want.items():
        q = got[name]
        assert type(p) is type(q) and p.dtype == q.dtype and p.device == q.device, name
        assert torch.equal(p.data.view(torch.uint8), q.data.view(torch.uint8)), name
        if type(p).__name__ == "Params4bit":
            assert torch.equal(p.quant_state.absmax, q.quant_state.absmax), name
            assert torch.equal(p.quant_state.state2.absmax, q.quant_state.state2.absmax), name
    assert [(n, b.dtype) for n, b in expected.named_buffers()] == [(n, b.dtype) for n, b in model.named_buffers()]
    assert all(torch.equal(a, b) for a, b in zip(expected.buffers(), model.buffers()))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert torch.equal(logits_of(expected), logits_of(model))


def test_a_checkpoint_with_other_tensor_names_is_refused(tmp_path: Path, llama_base: Path) -> None:
    from safetensors.torch import save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    tensors = load_file(str(llama_base / "model.safetensors"))
    save_file({k.replace("model.layers.", "model.blocks."): v for k, v in tensors.items()},
              str(renamed / "model.safetensors"))
    model = streamed.skeleton(AutoConfig.from_pretrained(llama_base), torch.bfloat16, None, False)
    with pytest.raises(ValueError, match="no tensor named model.layers.0.self_attn.q_proj.weight .* save_pretrained"):
        streamed.load_streamed(model, streamed.checkpoint_files(renamed), torch.bfloat16, torch.device("cpu"), None)


# --------------------------------------------------------------------------------------------- on 2 ranks

def zero(stage: int, *extra: str) -> list[str]:
    """DeepSpeed at a stage; at stage 3 every tensor partitioned (DeepSpeed keeps tensors under 1e5 elements whole,
    which in the tiny model is all of them)."""
    return ["distributed.engine=deepspeed", f"distributed.zero_stage={stage}",
            *([ALL_PARTITIONED] if stage == 3 else []), *extra]


def args(out: Path, base: Path, *extra: str) -> list[str]:
    """Six steps of the adapter tests' QLoRA recipe, AdamW, a checkpoint every 2 steps."""
    return recipe_args(out, base, TEST_DATA, "optimizer.name=adamw", "checkpoint.every_steps=2", *extra, steps=STEPS)


RUNS = {  # name: overrides on top of `args`, 2 ranks x micro-batch 1
    "z2_qlora": zero(2), "z2_lora": [*zero(2), *LORA], "z3_qlora": zero(3), "z3_lora": [*zero(3), *LORA],
    "z3_qlora_offload": zero(3, *OFFLOAD),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> dict[str, Path]:
    """One process, micro-batch 2 (the same global batch of 2 sequences): the QLoRA and the LoRA reference."""
    base = tmp_path_factory.mktemp("single")
    for name, extra in (("qlora", []), ("lora", LORA)):
        ok(run_cli(["train", str(QUICKSTART), *args(base / name, llama_base, "checkpoint.resume=never", *extra)]))
    return {"qlora": base / "qlora", "lora": base / "lora"}


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> dict[str, Any]:
    """One launch: QLoRA and LoRA at ZeRO-2 and ZeRO-3, QLoRA at ZeRO-3 with both offloads, QLoRA DPO at ZeRO-3,
    and a ZeRO-3 QLoRA run whose base is loaded whole on every rank (the sharding check must stop it)."""
    base = tmp_path_factory.mktemp("zero")
    spec = [{"name": name, "overrides": args(base / name, llama_base, "train.micro_batch_size=1",
                                             "checkpoint.resume=never", *extra),
             "logits": IDS if name == "z3_qlora" else None} for name, extra in RUNS.items()]
    dpo = args(base / "z3_qlora_dpo", llama_base, "train.micro_batch_size=1", "checkpoint.resume=never", *zero(3), *DPO)
    spec.append({"name": "z3_qlora_dpo", "overrides": dpo})
    spec.append({"name": "z3_qlora_whole", "load_whole": True,
                 "overrides": args(base / "z3_qlora_whole", llama_base, "train.micro_batch_size=1", *zero(3))})
    return {"base": base, **deepspeed_probe.launch(base, spec, QUICKSTART)}


def by_step(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_zero2_and_zero3_match_one_process(zero_runs: dict[str, Any], single: dict[str, Path]) -> None:
    base = zero_runs["base"]
    for name in RUNS:
        assert zero_runs["facts"][0][name]["engine"] == "ZeroEngine", name
        ref = single["lora" if "lora" in name and "qlora" not in name else "qlora"]
        got, want = by_step(base / name), by_step(ref)
        assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), name
        worst = max(abs(got[s] - want[s]) for s in want)
        print(f"{name}: max loss difference to one process {worst:.2e}")
        assert worst < (QLORA_TOLERANCE if "qlora" in name else LORA_TOLERANCE), (name, worst, got, want)
    qlora_losses = list(by_step(single["qlora"]).values())
    assert qlora_losses[-1] < qlora_losses[0] - 0.3  # it learns
    offload_log = zero_runs["facts"][0]["z3_qlora_offload"]["log"]
    assert "optimizer state and parameters in CPU memory, qlora adapters: bf16, optimizer DeepSpeedCPUAdam" \
        in offload_log, offload_log


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_zero3_qlora_dpo_matches_one_process(zero_runs: dict[str, Any], tmp_path: Path, llama_base: Path) -> None:
    """QLoRA DPO on ZeRO-3 (2 ranks x 1 pair, the reference the 4-bit base with the adapters disabled, its weights
    gathered inside each forward) gives one process's losses and rewards (micro-batch 2), within DPO_TOLERANCE."""
    single = tmp_path / "single_dpo"
    ok(run_cli(["train", str(QUICKSTART), *args(single, llama_base, "checkpoint.resume=never", *DPO)]))
    got, want = read_metrics(zero_runs["base"] / "z3_qlora_dpo"), read_metrics(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert want[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("loss", "rewards_chosen", "rewards_rejected"):
        worst = max(abs(a[name] - b[name]) for a, b in zip(got, want))
        print(f"z3_qlora_dpo {name}: max difference to one process {worst:.2e}")
        assert worst < DPO_TOLERANCE[name], (name, worst)
    assert want[-1]["reward_margin"] > 0


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_zero3_holds_half_the_4bit_base_per_rank(zero_runs: dict[str, Any], llama_base: Path) -> None:
    """After the build, each rank holds 1/2 of every base tensor (partitions padded to an even number of elements)
    plus the 4-bit quantization constants, which bitsandbytes keeps whole beside each weight. One process holds
    the whole base. With everything offloaded the partitions live in CPU memory but are the same bytes."""
    model = build_model(adapter_run(llama_base, qlora(), "bf16"), byte_tokenizer())
    whole = held_frozen_bytes(model)
    constants = sum(sum(quant_state_bytes(p.quant_state).values())
                    for p in model.parameters() if type(p).__name__ == "Params4bit")
    tensors = len([p for p in model.parameters() if not p.requires_grad])
    for rank in (0, 1):
        for name in ("z3_qlora", "z3_qlora_offload"):
            held = zero_runs["facts"][rank][name]["base_held"]
            print(f"rank {rank} {name}: holds {held:,} B of the base; one process {whole:,} B "
                  f"(of which {constants:,} B quantization constants)")
            partitions = held - constants
            assert (whole - constants) / 2 <= partitions <= (whole - constants) / 2 + 2 * tensors, (rank, name, held)
        assert zero_runs["facts"][rank]["z2_qlora"]["base_held"] == whole  # ZeRO-2: the whole base on each rank


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_a_base_loaded_whole_is_stopped_with_the_numbers(zero_runs: dict[str, Any]) -> None:
    """The probe defeats the partitioned loading (the base loaded whole on every rank): every rank stops before
    the engine is built, with what it found, what the plan expected, and the likely causes."""
    for rank in (0, 1):
        error = zero_runs["facts"][rank]["z3_qlora_whole"]["error"]
        assert "the frozen base is not sharded as planned" in error, error
        assert "the plan expects" in error and "1/2 of every tensor" in error and "Likely causes" in error
        assert "loaded whole instead of module by module" in error
        ratio = float(error.split("GiB of it (")[1].split("x)")[0])
        print(f"rank {rank}: base loaded whole stopped at {ratio}x the planned share")
        assert 1.7 < ratio < 2.1, error  # a whole copy: about twice the planned share
    assert not (zero_runs["base"] / "z3_qlora_whole" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_adapter_checkpoints_hold_no_base_weights(zero_runs: dict[str, Any], llama_base: Path) -> None:
    """Every tensor in a ZeRO-2 and a ZeRO-3 checkpoint belongs to the adapter or its optimizer: no base weight,
    no quantization constant, and no model.safetensors; the files together are a small fraction of the base."""
    base_names = set(load_file(str(llama_base / "model.safetensors")))
    for name in ("z2_qlora", "z3_qlora"):
        (_, ckpt), *_ = reversed(complete_checkpoints(zero_runs["base"] / name))
        assert not (ckpt / "model.safetensors").exists()
        adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        assert adapter and all("lora_" in k for k in adapter)
        module_files = list((ckpt / "deepspeed").rglob("*model_states.pt"))
        assert module_files
        for f in module_files:
            module = torch.load(f, map_location="cpu", weights_only=False)["module"]
            assert all("lora_" in k for k in module), [k for k in module if "lora_" not in k][:3]
            assert not [k for k in module if k.split("base_model.model.")[-1] in base_names]
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        assert size < 0.5 * (llama_base / "model.safetensors").stat().st_size, (name, size)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_then_resume_is_bitwise_exact(stage: int, zero_runs: dict[str, Any], llama_base: Path,
                                              tmp_path: Path) -> None:
    """Killed after step 5 (checkpoints at 2 and 4), resumed with resume: auto: the same losses and the same
    adapter as the uninterrupted run of the probe."""
    out, ref = tmp_path / "run", zero_runs["base"] / f"z{stage}_qlora"
    cli = ["train", str(QUICKSTART), *args(out, llama_base, "train.micro_batch_size=1", *zero(stage))]
    killed = run_cli(cli, nproc=2, env={"TRAINER_FAULT": "sigkill@5"})
    assert killed.returncode != 0
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4]
    resumed = ok(run_cli(cli, nproc=2))
    assert "resume: auto picked step-000004" in resumed.stderr
    assert losses(out, range(1, STEPS + 1)) == losses(ref, range(1, STEPS + 1))  # bitwise: == on floats
    (_, mine), *_ = reversed(complete_checkpoints(out))
    (_, theirs), *_ = reversed(complete_checkpoints(ref))
    a, b = (load_file(str(c / "adapter" / "adapter_model.safetensors")) for c in (mine, theirs))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_export_from_a_zero3_run(zero_runs: dict[str, Any], llama_base: Path, tmp_path: Path) -> None:
    """In one process, without the training world size: --adapter-only loads with PeftModel.from_pretrained over
    the base as trained and gives the ZeRO-3 engine's logits; --merge gives a plain transformers model within the
    merged-export tolerance."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = zero_runs["base"] / "z3_qlora"
    trained = torch.tensor(zero_runs["facts"][0]["z3_qlora"]["logits"])
    adapter_dir = export(run, tmp_path / "adapter", adapter_only=True)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(llama_base)  # what chat/generate load the adapter over
    base = load_base(ModelConfig(name_or_path=str(llama_base)), qlora(), "bf16", torch.device("cpu"))
    adapters.prepare_frozen(base, gradient_checkpointing=False)
    peft_logits = logits_of(PeftModel.from_pretrained(base, str(adapter_dir)))
    print(f"adapter over the base vs the ZeRO-3 engine: max |logit difference| "
          f"{(peft_logits - trained).abs().max().item():.2e}")
    assert (peft_logits - trained).abs().max().item() < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(export(run, tmp_path / "merged", merge=True))
    assert getattr(merged.config, "quantization_config", None) is None
    diff = logits_of(merged) - trained
    rms = diff.pow(2).mean().sqrt().item()
    print(f"merged vs the ZeRO-3 engine: max {diff.abs().max().item():.4f}, rms {rms:.4f}")
    assert diff.abs().max().item() < 0.08 and rms < 0.005 and math.isfinite(rms), (diff.abs().max().item(), rms)
