"""LoRA / QLoRA on the real libraries: bitsandbytes' CPU backend (NF4, double quant, LLM.int8, 8-bit optimizers)
and peft, on a tiny Llama and a tiny Qwen2 saved to disk with the byte tokenizer, trained on the generated Alpaca-style
data (prompt masked). Nothing is mocked; no test needs a GPU except the one marked `gpu`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import (LLAMA, QUICKSTART, QWEN2, adapter_run, fixed_ids, linear_weights, logits_of, lora_formula,
                           qlora, recipe_args, same_shape_other_base, save_base)
from trainer import adapters
from trainer.__main__ import main
from trainer.adapters.base_identity import differences, identify, mismatch
from trainer.adapters.footprint import measured, predicted
from trainer.adapters.merge import load_base, merged_model
from trainer.adapters.quant import bits_per_param, expected_4bit_bytes
from trainer.adapters.targets import find_targets, lora_param_count, meta_model
from trainer.model.build import build_model
from trainer.optim import build_optimizer
from trainer.recipe.schema import (
    AdapterConfig,
    ModelConfig,
    OptimizerConfig,
    QuantConfig,
)
from trainer.model.tokenizer import byte_tokenizer


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero (a no-op adapter); give it values so that a round trip has something to lose."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# ---------------------------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("double_quant,bits", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)])
def test_nf4_base_is_4bit_with_expected_bytes_and_error(llama_base: Path, double_quant: bool, bits: float) -> None:
    """Every linear layer but the head is a bitsandbytes Linear4bit; the codes and absmax constants take
    4 + 8/64 + 32/(64*256) = 4.127 bits/param with double quant, 4 + 32/64 = 4.5 without (0.373 saved); the
    dequantized weights are within NF4's error of the fp32 originals (0.092 relative for Gaussian weights)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    original = load_file(str(llama_base / "model.safetensors"))
    model = load_base(ModelConfig(name_or_path=str(llama_base)), qlora(double_quant=double_quant), "bf16",
                      torch.device("cpu"))
    layers = linear_weights(model)
    assert len(layers) == 14 and not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    numel = stored = 0
    for name, layer in layers.items():
        assert isinstance(layer, bnb.nn.Linear4bit) and type(layer.weight).__name__ == "Params4bit", name
        state = layer.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, double_quant)
        n = layer.in_features * layer.out_features
        nbytes = layer.weight.data.numel() + state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            assert state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
            nbytes += state.state2.absmax.numel() * 4
        assert nbytes == expected_4bit_bytes(n, double_quant)
        numel, stored = numel + n, stored + nbytes
        deq = dequantize_4bit(layer.weight.data, state).float()
        ref = original[f"{name}.weight"]
        rel = ((deq - ref).norm() / ref.norm()).item()
        assert 0.07 < rel < 0.11, (name, rel)
    assert 8 * stored / numel == pytest.approx(bits, abs=1e-9) == bits_per_param(double_quant)
    assert adapters.quantized_weight_bytes(model) > stored  # plus the per-tensor code tables


def test_int8_base_is_llm_int8(llama_base: Path) -> None:
    """quant.type=int8: LLM.int8 layers, one int8 per weight plus an fp32 scale per row, ~0.5% error."""
    import bitsandbytes as bnb

    original = load_file(str(llama_base / "model.safetensors"))
    model = load_base(ModelConfig(name_or_path=str(llama_base)), qlora(type="int8"), "bf16", torch.device("cpu"))
    for name, layer in linear_weights(model).items():
        assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
        scale = layer.weight.SCB
        assert scale.shape == (layer.out_features,) and scale.dtype == torch.float32
        deq = layer.weight.data.float() * scale[:, None] / 127
        ref = original[f"{name}.weight"]
        assert ((deq - ref).norm() / ref.norm()).item() < 0.012


# ------------------------------------------------------------------------------------------- adapter shapes


@pytest.mark.parametrize("family,targets", [("llama", "all-linear"), ("qwen2", "all-linear"),
                                            ("qwen2", ["q_proj", "v_proj"])])
def test_trainable_count_is_r_times_in_plus_out(family: str, targets: Any, llama_base: Path,
                                                qwen_base: Path) -> None:
    base, arch = (llama_base, LLAMA) if family == "llama" else (qwen_base, QWEN2)
    adapter = AdapterConfig(type="qlora", rank=8, target_modules=targets)
    model = build_model(adapter_run(base, adapter, "bf16"), byte_tokenizer())
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} \
        if targets == "all-linear" else set(targets)
    trainable, total = adapters.parameter_counts(model)
    assert trainable == lora_formula(arch, 8, names)
    assert trainable == lora_param_count(find_targets(meta_model(AutoConfig.from_pretrained(base)), targets), 8)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters()) + trainable


# --------------------------------------------------------------------------------------------- validation

def _bad(base: Path, data: Path) -> list[tuple[list[str], str, str]]:
    return [
        (["adapter.rank=0"], "adapter.rank", "must be >= 1"),
        (["adapter.target_modules=[q_projj]"], "adapter.target_modules",
         "'q_projj' matches no module of this llama model; its linear layers are: q_proj, k_proj, v_proj, o_proj, "
         "gate_proj, up_proj, down_proj"),
        (["adapter.target_modules=[mlp]"], "adapter.target_modules",
         "'mlp' matches 2 module(s) of type LlamaMLP, which LoRA cannot adapt"),
        (["adapter.target_modules=q_proj"], "adapter.target_modules", "give a list of module names"),
        (["adapter.target_modules=[]"], "adapter.target_modules", "empty"),
        (["adapter.quant.compute_dtype=fp16"], "adapter.quant.compute_dtype", "set adapter.quant.compute_dtype=bf16"),
        (["adapter.quant.type=int8", "adapter.quant.storage_dtype=bf16"], "adapter.quant.storage_dtype",
         "applies to 4-bit weights"),
        (["adapter.type=lora", "adapter.quant.type=fp4"], "adapter.quant", "apply to adapter.type=qlora"),
        (["distributed.engine=deepspeed", "distributed.zero_stage=3", "adapter.quant.storage_dtype=uint8"],
         "adapter.quant.storage_dtype", "set adapter.quant.storage_dtype: bf16 (the compute dtype) or auto"),
        (["distributed.engine=deepspeed", "distributed.zero_stage=2", "precision.dtype=fp16",
          "adapter.quant.compute_dtype=fp16"], "precision.dtype", "use precision.dtype: bf16"),
        (["distributed.engine=deepspeed", "distributed.zero_stage=2", "adapter.quant.type=int8"],
         "adapter.quant.type", "use adapter.quant.type: nf4"),
        (["distributed.engine=deepspeed", "distributed.zero_stage=3", "adapter.use_dora=true"], "adapter.use_dora",
         "use distributed.zero_stage: 2"),
        (["model.name_or_path=null", "model.config={model_type: llama}", "model.tokenizer=byte"], "adapter.type",
         "give model.name_or_path"),
    ]


def test_validation_rejects_bad_adapter_settings(llama_base: Path, data_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    base_args = recipe_args(Path("unused"), llama_base, data_dir)
    for overrides, key, advice in _bad(llama_base, data_dir):
        code = main(["validate", str(QUICKSTART), *base_args, *overrides])
        err = capsys.readouterr().err
        assert code == 2, overrides
        assert f"  - {key} = " in err and advice in err, (overrides, err)
        assert "Traceback" not in err
    for ok in (["adapter.target_modules=[q_proj, v_proj]"], ["adapter.type=lora", "precision.dtype=fp32"],
               ["adapter.quant.type=int8"], ["precision.dtype=fp32", "adapter.quant.compute_dtype=fp32"],
               ["distributed.engine=deepspeed", "distributed.zero_stage=3"],  # storage auto: bf16 under ZeRO-3
               ["distributed.engine=deepspeed", "distributed.zero_stage=2", "adapter.quant.storage_dtype=uint8"]):
        assert main(["validate", str(QUICKSTART), *base_args, *ok]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------- state round trips

def test_adapter_save_load_gives_identical_logits(llama_base: Path, tmp_path: Path) -> None:
    """Our save -> load, and peft's own PeftModel.from_pretrained on the same prepared base: bitwise equal."""
    from peft import PeftModel

    mcfg = ModelConfig(name_or_path=str(llama_base))
    model = build_model(adapter_run(llama_base, qlora(), "bf16"), byte_tokenizer())
    randomize_lora_b(model)
    expected = logits_of(model)
    adapters.save_adapter(model, tmp_path / "adapter")
    fresh = build_model(adapter_run(llama_base, qlora(), "bf16", seed=123), byte_tokenizer())
    assert not torch.equal(logits_of(fresh), expected)
    adapters.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits_of(fresh), expected)
    base = load_base(mcfg, qlora(), "bf16", torch.device("cpu"))
    adapters.prepare_frozen(base, gradient_checkpointing=False)  # norms in fp32, as in training
    assert torch.equal(logits_of(PeftModel.from_pretrained(base, str(tmp_path / "adapter"))), expected)


def test_merge_matches_adapter_model_in_fp32(llama_base: Path, tmp_path: Path) -> None:
    """With compute dtype fp32 the merge is exact up to float rounding: dequantize, add (alpha/r) B A, save."""
    mcfg, adapter = ModelConfig(name_or_path=str(llama_base)), qlora(compute_dtype="fp32")
    model = build_model(adapter_run(llama_base, adapter, "fp32"), byte_tokenizer())
    randomize_lora_b(model)
    adapters.save_adapter(model, tmp_path / "adapter")
    merged = merged_model(tmp_path / "adapter", mcfg, adapter, "fp32", torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(type(m) is torch.nn.Linear for m in linear_weights(merged).values())
    diff = (logits_of(merged, autocast=False) - logits_of(model, autocast=False)).abs().max().item()
    assert diff < 1e-4, diff


def test_training_after_eval_keeps_correct_gradients(llama_base: Path) -> None:
    """bitsandbytes' CPU backend repacks 4-bit weights for an inference kernel at the first eval-mode forward
    without grad; training through that kernel gives wrong gradients. An evaluation in between must not
    change the next step's gradients (the adapters package turns the repacking off)."""
    def grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model = build_model(adapter_run(llama_base, qlora(), "bf16"), byte_tokenizer())
        randomize_lora_b(model)
        if evaluate_first:
            logits_of(model)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=fixed_ids(), labels=fixed_ids()).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    assert all(torch.equal(plain[n], after_eval[n]) for n in plain)


# ------------------------------------------------------------------------------------------- optimizers

def test_paged_adamw8bit_is_adamw8bit_on_cpu_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    def run(name: str) -> torch.Tensor:
        torch.manual_seed(0)
        layer = torch.nn.Linear(128, 64)  # 8192 elements: above bitsandbytes' 4096 minimum, so 8-bit state
        opt = build_optimizer(layer, OptimizerConfig(name=name, lr=1e-2))
        for step in range(3):
            layer.weight.grad = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(step))
            layer.bias.grad = torch.ones_like(layer.bias)
            opt.step()
        assert opt.state[layer.weight]["state1"].dtype == torch.uint8
        return layer.weight.detach().clone()

    with caplog.at_level(logging.WARNING, logger="trainer.optim"):
        paged = run("paged_adamw8bit")
    assert [r.getMessage() for r in caplog.records].count(
        "optimizer.name=paged_adamw8bit: paging needs CUDA unified memory; on cpu the state is not paged "
        "(same updates as adamw8bit)") == 1
    assert torch.equal(paged, run("adamw8bit"))


@pytest.mark.slow
@pytest.mark.parametrize("adapter,precision,optimizer", [
    (AdapterConfig(type="none"), "fp32", "adamw"),
    (AdapterConfig(type="lora", rank=16), "bf16", "adamw"),
    (AdapterConfig(type="qlora", rank=16, quant=QuantConfig(double_quant=False)), "bf16", "adamw8bit"),
    (AdapterConfig(type="qlora", rank=16, use_dora=True, target_modules=["q_proj", "v_proj"]), "bf16", "adamw"),
    (AdapterConfig(type="qlora", rank=16, quant=QuantConfig(type="int8")), "fp32", "paged_adamw8bit"),
], ids=["full-adamw", "lora-bf16", "qlora-nodq-8bit", "qdora-dq", "int8-fp32-paged"])
def test_model_state_formula_matches_real_tensors(tmp_path: Path, adapter: AdapterConfig, precision: str,
                                                  optimizer: str) -> None:
    """The benchmark's byte formula (from meta-device shapes) against the tensors of a built model after one
    step, exactly. hidden 256 makes LoRA A (16 x 256) big enough for 8-bit optimizer state."""
    base = save_base(tmp_path / "base", {**LLAMA, "hidden_size": 256, "intermediate_size": 512})
    model = build_model(adapter_run(base, adapter, precision), byte_tokenizer())
    opt = build_optimizer(model, OptimizerConfig(name=optimizer))
    weights = measured(model, opt)["weights"]  # before a forward: CPU kernels may repack at first use
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=fixed_ids(), labels=fixed_ids()).loss.backward()
    opt.step()
    after = measured(model, opt)
    expected = predicted(meta_model(AutoConfig.from_pretrained(base)), adapter, precision, optimizer)
    assert {**after, "weights": weights} == expected


# ------------------------------------------------------------------------------------------------ base identity

def header_bytes(f: Path) -> bytes:
    data = f.read_bytes()
    return data[:8 + int.from_bytes(data[:8], "little")]


def test_base_identity_tells_a_same_shape_base_apart_and_follows_a_moved_one(llama_base: Path,
                                                                             tmp_path: Path) -> None:
    """Two models of one shape differ only in their weights' bytes (the headers are byte-identical: checked here),
    which the sampled blocks catch; a base copied to another folder keeps its identity; another shape shows the
    config keys and the file that differ. The message shows both identities."""
    trained_on = identify(str(llama_base))
    moved = str(shutil.copytree(llama_base, tmp_path / "moved"))
    assert identify(moved) == {**trained_on, "name": moved, "path": moved}
    assert differences(trained_on, identify(str(tmp_path / "moved"))) == []
    other = same_shape_other_base(llama_base, tmp_path / "other")
    assert header_bytes(other / "model.safetensors") == header_bytes(llama_base / "model.safetensors")
    assert (other / "config.json").read_bytes() == (llama_base / "config.json").read_bytes()
    found = differences(trained_on, identify(str(other)))
    assert len(found) == 1 and found[0].startswith("file model.safetensors: same size and header, different "
                                                   "contents (sampled bytes "), found
    why = mismatch(trained_on, identify(str(other)))
    assert why is not None and f"trained on: {llama_base}, id " in why and f"found now:  {other}, id " in why
    wider = save_base(tmp_path / "wider", {**LLAMA, "intermediate_size": 384})
    found = differences(trained_on, identify(str(wider)))
    assert found[0] == "config key intermediate_size: 256 -> 384", found
    assert found[1].startswith("file model.safetensors: size "), found


def test_base_identity_of_a_hub_id_comes_from_the_local_cache(llama_base: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id is identified by its snapshot in the hub cache (nothing is downloaded); one that is not there is
    known by name and revision, and compared by those."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(llama_base, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = identify("org/tiny")
    assert cached["path"] == str(snapshot) and differences(identify(str(llama_base)), cached) == []
    absent = identify("org/absent")
    assert absent == {"name": "org/absent", "revision": None, "path": None, "config": None, "files": None}
    assert differences(absent, identify("org/absent")) == []
    assert differences(absent, identify("org/absent", "v2")) == ["revision: null -> 'v2'"]
