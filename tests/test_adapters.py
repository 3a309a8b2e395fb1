"""LoRA / QLoRA on the real libraries: bitsandbytes' CPU backend (NF4, double quant, LLM.int8, 8-bit optimizers)
and peft, on a tiny Llama and a tiny Qwen2 saved to disk with the byte tokenizer, trained on the shared Alpaca
data (prompt masked). Nothing is mocked; no test needs a GPU except the one marked `gpu`."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import QUICKSTART, SHARED_DATA, read_metrics, run_cli
from trainer import adapters
from trainer.__main__ import main
from trainer.adapters.footprint import measured, predicted
from trainer.adapters.merge import load_base, merged_model
from trainer.adapters.quant import bits_per_param, expected_4bit_bytes
from trainer.adapters.targets import find_targets, lora_param_count, meta_model
from trainer.checkpoint import CheckpointError, complete_checkpoints
from trainer.config import AdapterConfig, ModelConfig, OptimizerConfig, QuantConfig, load_recipe
from trainer.data import DataPosition
from trainer.distributed import distributed_context
from trainer.export import export
from trainer.loop import run_loop, setup
from trainer.model import build_model
from trainer.optim import build_optimizer
from trainer.tokenizer import byte_tokenizer

# kv heads = heads, so every linear weight is a multiple of 64 x 256 elements: bits/param come out exact.
LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}
QWEN2 = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def save_base(directory: Path, arch: dict[str, Any]) -> Path:
    """A randomly initialized model saved like a hub checkpoint (safetensors + config + tokenizer)."""
    tok = byte_tokenizer()
    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **arch)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("llama"), LLAMA)


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("qwen2"), QWEN2)


def recipe_args(out: Path, base: Path, data: Path, *extra: str, steps: int = 8) -> list[str]:
    """QLoRA on Alpaca over a saved base, as overrides of the quickstart recipe."""
    return [f"output_dir={out}", "model.config=null", f"model.name_or_path={base}", "model.tokenizer=null",
            f"data.source={data / 'alpaca_en_demo.json'}", "data.format=alpaca", "data.seq_len=256",
            "data.max_documents=200",
            "data.eval_fraction=0", "train.eval_every_steps=0", f"train.max_steps={steps}",
            "train.micro_batch_size=2", "precision.dtype=bf16", "adapter.type=qlora", "adapter.rank=8",
            "optimizer.lr=3e-3", "optimizer.warmup_steps=0", "optimizer.schedule=constant", "logging.every_steps=1",
            "logging.progress_bar=false", "logging.plot=false", "checkpoint.every_steps=0", *extra]


def qlora(**quant: Any) -> AdapterConfig:
    return AdapterConfig(type="qlora", rank=8, quant=QuantConfig(**quant))


def fixed_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits_of(model: torch.nn.Module, autocast: bool = True) -> torch.Tensor:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=fixed_ids()).logits.float()


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero (a no-op adapter); give it values so that a round trip has something to lose."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


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

def lora_formula(arch: dict[str, Any], rank: int, targets: set[str]) -> int:
    """r*(in+out) summed over adapted linear layers, written out from the architecture's sizes."""
    h, f, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    hd = h // arch["num_attention_heads"]
    q, kv = arch["num_attention_heads"] * hd, arch["num_key_value_heads"] * hd
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, f),
              "up_proj": (h, f), "down_proj": (f, h)}
    return layers * sum(rank * (i + o) for name, (i, o) in shapes.items() if name in targets)


@pytest.mark.parametrize("family,targets", [("llama", "all-linear"), ("qwen2", "all-linear"),
                                            ("qwen2", ["q_proj", "v_proj"])])
def test_trainable_count_is_r_times_in_plus_out(family: str, targets: Any, llama_base: Path,
                                                qwen_base: Path) -> None:
    base, arch = (llama_base, LLAMA) if family == "llama" else (qwen_base, QWEN2)
    adapter = AdapterConfig(type="qlora", rank=8, target_modules=targets)
    model = build_model(ModelConfig(name_or_path=str(base)), byte_tokenizer(), 0, adapter=adapter, precision="bf16")
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
        (["distributed.engine=deepspeed"], "adapter.type", "peft#2016"),
        (["model.name_or_path=null", "model.config={model_type: llama}", "model.tokenizer=byte"], "adapter.type",
         "give model.name_or_path"),
    ]


def test_validation_rejects_bad_adapter_settings(llama_base: Path, shared_data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    base_args = recipe_args(Path("unused"), llama_base, shared_data)
    for overrides, key, advice in _bad(llama_base, shared_data):
        code = main(["validate", str(QUICKSTART), *base_args, *overrides])
        err = capsys.readouterr().err
        assert code == 2, overrides
        assert f"  - {key} = " in err and advice in err, (overrides, err)
        assert "Traceback" not in err
    for ok in (["adapter.target_modules=[q_proj, v_proj]"], ["adapter.type=lora", "precision.dtype=fp32"],
               ["adapter.quant.type=int8"], ["precision.dtype=fp32", "adapter.quant.compute_dtype=fp32"]):
        assert main(["validate", str(QUICKSTART), *base_args, *ok]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------- state round trips

def test_adapter_save_load_gives_identical_logits(llama_base: Path, tmp_path: Path) -> None:
    """Our save -> load, and peft's own PeftModel.from_pretrained on the same prepared base: bitwise equal."""
    from peft import PeftModel

    mcfg = ModelConfig(name_or_path=str(llama_base))
    model = build_model(mcfg, byte_tokenizer(), 0, adapter=qlora(), precision="bf16")
    randomize_lora_b(model)
    expected = logits_of(model)
    adapters.save_adapter(model, tmp_path / "adapter")
    fresh = build_model(mcfg, byte_tokenizer(), 123, adapter=qlora(), precision="bf16")
    assert not torch.equal(logits_of(fresh), expected)
    adapters.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits_of(fresh), expected)
    base = load_base(mcfg, qlora(), "bf16", torch.device("cpu"))
    adapters.prepare_frozen(base, gradient_checkpointing=False)  # norms in fp32, as in training
    assert torch.equal(logits_of(PeftModel.from_pretrained(base, str(tmp_path / "adapter"))), expected)


def test_merge_matches_adapter_model_in_fp32(llama_base: Path, tmp_path: Path) -> None:
    """With compute dtype fp32 the merge is exact up to float rounding: dequantize, add (alpha/r) B A, save."""
    mcfg, adapter = ModelConfig(name_or_path=str(llama_base)), qlora(compute_dtype="fp32")
    model = build_model(mcfg, byte_tokenizer(), 0, adapter=adapter, precision="fp32")
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
        model = build_model(ModelConfig(name_or_path=str(llama_base)), byte_tokenizer(), 0, adapter=qlora(),
                            precision="bf16")
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
    model = build_model(ModelConfig(name_or_path=str(base)), byte_tokenizer(), 0, adapter=adapter,
                        precision=precision)
    opt = build_optimizer(model, OptimizerConfig(name=optimizer))
    weights = measured(model, opt)["weights"]  # before a forward: CPU kernels may repack at first use
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=fixed_ids(), labels=fixed_ids()).loss.backward()
    opt.step()
    after = measured(model, opt)
    expected = predicted(meta_model(AutoConfig.from_pretrained(base)), adapter, precision, optimizer)
    assert {**after, "weights": weights} == expected


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
    cfg = load_recipe(QUICKSTART, recipe_args(out, llama_base, SHARED_DATA, steps=8))
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
    ok(run_cli(cli_args(out, llama_base, SHARED_DATA)))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_then_resume_is_exact_on_qlora(tmp_path: Path, llama_base: Path, shared_data: Path,
                                               single_ref: Path) -> None:
    """Adapter, paged_adamw8bit state, LR schedule and mid-epoch data position: all restored bitwise."""
    out = tmp_path / "run"
    killed = run_cli(cli_args(out, llama_base, shared_data), env={"TRAINER_FAULT": "sigkill@5"})
    assert killed.returncode != 0
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4]
    resumed = ok(run_cli(cli_args(out, llama_base, shared_data)))
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
                                                                shared_data: Path, single_ref: Path) -> None:
    """2 ranks x micro-batch 1 == 1 rank x micro-batch 2 (the same global batch of 2 sequences). Not bitwise:
    bf16 matmuls over other batch shapes round differently. Measured: losses within 6e-5, LoRA B within 1% after
    6 steps (Adam amplifies tiny gradient differences in near-zero entries); asserted: 5e-4 and 3%."""
    ok(run_cli(cli_args(tmp_path, llama_base, shared_data, "train.micro_batch_size=1"), nproc=2))
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
    cfg = load_recipe(QUICKSTART, recipe_args(tmp_path, qwen_base, SHARED_DATA, "adapter.use_dora=true",
                                              "adapter.target_modules=[q_proj, v_proj]", "optimizer.name=adamw8bit",
                                              "model.tokenizer=byte", steps=5))
    with caplog.at_level(logging.INFO, logger="trainer.model"), distributed_context() as dist:
        run = setup(cfg, dist)
        run_loop(run)
        run.metrics.close()
    dora = lora_formula(QWEN2, 8, {"q_proj", "v_proj"}) + 2 * (128 + 64)  # + a magnitude per output row
    assert f"{dora:,} trainable" in caplog.text
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert losses[-1] < losses[0] - 0.1 and all(math.isfinite(x) for x in losses)


# ---------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: paging and CUDA 4-bit kernels")
def test_qlora_on_gpu_pages_the_optimizer(tmp_path: Path, llama_base: Path, shared_data: Path) -> None:
    """GPU only (paged optimizers need CUDA unified memory): the quantized base lives on the GPU, the 8-bit
    optimizer state is paged, and the loss falls."""
    cfg = load_recipe(QUICKSTART, recipe_args(tmp_path, llama_base, shared_data, "optimizer.name=paged_adamw8bit",
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
