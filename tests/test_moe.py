"""Mixture-of-experts models (trainer/adapters/experts.py): under QLoRA the experts are 4-bit, whatever layout the
checkpoint stores them in, and hold the bytes the plan says; the router is never quantized; LoRA reaches the experts
only with adapter.target_experts; a merged export is a plain transformers model again; the load-balancing loss is
in the gradient and the metrics when the config enables it; the plan counts experts and active parameters and
matches the real tensors. Tiny Qwen3-MoE and Mixtral (hidden 64, 2 layers, 4 experts, 2 active), saved as
transformers 5 saves them (fused 3-D experts) unless a test writes the hub's per-expert layout.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.deepspeed_probe import count_native_bytes
from tests.helpers import QUICKSTART, TEST_DATA, adapter_run, planned_and_measured_activations, read_metrics
from tests.helpers import save_base, tiny
from trainer.adapters import parameter_counts
from trainer.adapters.experts import SplitExperts, split_experts
from trainer.adapters.footprint import held_frozen_bytes
from trainer.data.batches import DataPosition
from trainer.distributed import distributed_context
from trainer.errors import ConfigError
from trainer.model.build import build_model
from trainer.model.tokenizer import byte_tokenizer
from trainer.plan.frozen_base import base_tensors, whole_base_bytes
from trainer.plan.peak import plan
from trainer.plan.report import render
from trainer.plan.shapes import shapes
from trainer.recipe.resolve import resolve
from trainer.recipe.schema import AdapterConfig, QuantConfig
from trainer.run.loop import run_loop, setup, train_step
from trainer.use import chat
from trainer.use.export import export

H, LAYERS, EXPERTS, ACTIVE, FE = 64, 2, 4, 2, 64  # FE: one expert's intermediate size
MOE: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": H, "intermediate_size": 128, "num_hidden_layers": LAYERS,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": EXPERTS,
                  "num_experts_per_tok": ACTIVE, "moe_intermediate_size": FE, "max_position_embeddings": 512},
    "mixtral": {"model_type": "mixtral", "hidden_size": H, "intermediate_size": FE, "num_hidden_layers": LAYERS,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": EXPERTS,
                "num_experts_per_tok": ACTIVE, "max_position_embeddings": 512},
}
FAMILIES = list(MOE)
ATTENTION_LORA = LAYERS * sum(8 * (i + o) for i, o in ((H, H), (H, 32), (H, 32), (H, H)))  # q, k, v, o at rank 8
EXPERT_LORA = LAYERS * EXPERTS * (8 * (H + 2 * FE) + 8 * (FE + H))  # gate_up and down of every expert


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: save_base(tmp_path_factory.mktemp(name), arch) for name, arch in MOE.items()}


def qlora(base: Path, **settings: Any) -> Any:
    return build_model(adapter_run(base, AdapterConfig(type="qlora", rank=8, **settings), "bf16"), byte_tokenizer())


def expert_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every expert's linear layer (the layer peft wraps, or its base layer)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and ".experts." in n and ".lora_" not in n]


# --------------------------------------------------------------------------------------------------- splitting

@pytest.mark.parametrize("family", FAMILIES)
def test_split_experts_compute_what_fused_experts_compute(family: str, one_thread: None) -> None:
    """One linear layer per expert, the eager loop over the experts the router picked: the same logits and the
    same gradients as transformers' fused experts (fp32), the experts' gradients row for row."""
    config = AutoConfig.for_model(**{**MOE[family], "vocab_size": 259})
    torch.manual_seed(0)
    fused = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    split = copy.deepcopy(fused)
    assert split_experts(split) == LAYERS
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for model in (fused, split):
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(split(input_ids=ids).logits, fused(input_ids=ids).logits, rtol=0, atol=1e-6)
    got = dict(split.named_parameters())
    for name, p in fused.named_parameters():
        if ".experts." not in name:
            torch.testing.assert_close(got[name].grad, p.grad, rtol=0, atol=1e-6, msg=name)
            continue
        for e in range(EXPERTS):
            layer = got[f"{name}.expert{e}.weight"]
            torch.testing.assert_close(layer.grad, p.grad[e], rtol=0, atol=1e-6, msg=f"{name}[{e}]")


# ----------------------------------------------------------------------------------------------- QLoRA experts

@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_experts_are_4_bit_and_hold_the_planned_bytes(family: str, bases: dict[str, Path],
                                                            one_thread: None) -> None:
    """transformers 5 keeps the experts as fused 3-D parameters, which bitsandbytes does not quantize: "QLoRA"
    held them in bf16 (here 2 x 4 experts x 3 x 64 x 64 elements at 2 bytes). Now every expert is a 4-bit layer
    with its own quantization constants, the router is not quantized (bf16, frozen), and the frozen base holds
    exactly the bytes the plan counts for it."""
    model = qlora(bases[family])
    layers = expert_layers(model)
    assert len(layers) == LAYERS * EXPERTS * 2
    assert all(type(m.weight).__name__ == "Params4bit" and m.weight.quant_state is not None for _, m in layers)
    routers = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(routers) == LAYERS and all(type(p) is torch.nn.Parameter and p.dtype == torch.bfloat16
                                          and not p.requires_grad for p in routers)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]  # no fused expert weight is left
    run = adapter_run(bases[family], AdapterConfig(type="qlora", rank=8), "bf16")
    planned = whole_base_bytes(base_tensors(run, shapes(run)))
    print(f"{family}: frozen base held {held_frozen_bytes(model):,} B, planned {planned:,} B")
    assert held_frozen_bytes(model) == planned
    expert_elements = LAYERS * EXPERTS * 3 * H * FE
    assert planned < 2 * expert_elements  # the experts alone in bf16 would be more than the whole planned base


def per_expert_checkpoint(fused: Path, out: Path, mixtral: bool) -> Path:
    """`fused` rewritten in the layout the hub ships: one tensor per expert and projection, named as Qwen3-MoE
    (`experts.3.gate_proj.weight`) or Mixtral (`block_sparse_moe.experts.3.w1.weight`, the router under
    `block_sparse_moe.gate`) name them; transformers 5 fuses them when it loads."""
    out.mkdir()
    for item in fused.iterdir():
        if item.name != "model.safetensors":
            (out / item.name).write_bytes(item.read_bytes())
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    tensors = {}
    for name, t in load_file(str(fused / "model.safetensors")).items():
        block = name.replace(".mlp.", ".block_sparse_moe.") if mixtral else name
        if name.endswith("experts.gate_up_proj"):
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                tensors[f"{block.removesuffix('gate_up_proj')}{e}.{names[0]}.weight"] = gate.contiguous()
                tensors[f"{block.removesuffix('gate_up_proj')}{e}.{names[1]}.weight"] = up.contiguous()
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                tensors[f"{block.removesuffix('down_proj')}{e}.{names[2]}.weight"] = t[e].contiguous()
        else:
            tensors[block if name.endswith("mlp.gate.weight") else name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_per_expert_checkpoints_give_the_same_4_bit_experts(family: str, bases: dict[str, Path], tmp_path: Path,
                                                                one_thread: None) -> None:
    """A checkpoint with one tensor per expert (as Qwen3-MoE and Mixtral are on the hub) loads into the same 4-bit
    codes and constants as the fused one, each expert read alone; transformers reads it as the same model."""
    hub = per_expert_checkpoint(bases[family], tmp_path / "hub", mixtral=family == "mixtral")
    assert not [n for n in load_file(str(hub / "model.safetensors")) if "gate_up_proj" in n]
    want = torch.testing.assert_close
    plain, converted = AutoModelForCausalLM.from_pretrained(bases[family]), AutoModelForCausalLM.from_pretrained(hub)
    for (name, p), (_, q) in zip(plain.named_parameters(), converted.named_parameters()):
        want(q, p, rtol=0, atol=0, msg=name)  # the rewritten checkpoint is the same model
    fused, per_expert = qlora(bases[family]), qlora(hub)
    got = dict(per_expert.named_modules())
    for name, layer in expert_layers(fused):
        other = got[name]
        assert torch.equal(other.weight.data, layer.weight.data), name
        assert torch.equal(other.weight.quant_state.absmax, layer.weight.quant_state.absmax), name
    for (name, p), (_, q) in zip(fused.named_parameters(), per_expert.named_parameters()):
        assert torch.equal(p.data, q.data), name


# ------------------------------------------------------------------------------------------------ LoRA targets

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_lora_reaches_the_experts_only_with_target_experts(family: str, kind: str, bases: dict[str, Path],
                                                           one_thread: None) -> None:
    """all-linear adapts attention only (peft alone would rewrite all-linear into LoRA on the router and the fused
    experts of these families); adapter.target_experts adds LoRA on every expert's gate_up and down. The router is
    never adapted."""
    counts = {}
    for target_experts in (False, True):
        adapter = AdapterConfig(type=kind, rank=8, target_experts=target_experts)
        model = build_model(adapter_run(bases[family], adapter, "bf16"), byte_tokenizer())
        counts[target_experts], _ = parameter_counts(model)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert not [n for n in trainable if ".gate." in n or "lora_" not in n], trainable
    assert counts[False] == ATTENTION_LORA
    assert counts[True] == ATTENTION_LORA + EXPERT_LORA


def test_moe_settings_that_cannot_work_are_recipe_problems(llama_base: Path) -> None:
    """adapter.target_experts on a dense model or without adapters; GaLore on fused experts; adapters on experts of
    a layout that cannot be split (gpt-oss: biases, its own gate): each named with the key, value and reason."""
    cases = [
        (["adapter.type=lora", "adapter.target_experts=true", "model.config=null", f"model.name_or_path={llama_base}"],
         "adapter.target_experts = true", "has no experts"),
        (["adapter.target_experts=true", f"model.config={json.dumps(MOE['mixtral'])}"],
         "adapter.target_experts = true", "applies to adapter.type lora or qlora"),
        (["optimizer.name=apollo_mini", f"model.config={json.dumps(MOE['qwen3_moe'])}"],
         "optimizer.name = 'apollo_mini'", "fused 3-D weights (model.layers.0.mlp.experts: gate_up_proj 4x128x64"),
    ]
    for overrides, key, reason in cases:
        with pytest.raises(ConfigError) as refused:
            resolve(QUICKSTART, overrides)
        assert key in str(refused.value) and reason in str(refused.value), str(refused.value)


def test_experts_of_an_unknown_layout_are_refused_for_adapters(tmp_path: Path) -> None:
    """gpt-oss's experts have biases and a gate function of their own: split, they would compute something else,
    so an adapter run over it is refused (before: QLoRA left its experts in bf16 without a word)."""
    arch = {"model_type": "gpt_oss", "hidden_size": H, "intermediate_size": FE, "num_hidden_layers": LAYERS,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": EXPERTS,
            "num_experts_per_tok": ACTIVE, "max_position_embeddings": 512}
    base = save_base(tmp_path / "gpt_oss", arch)
    with pytest.raises(ConfigError) as refused:
        resolve(QUICKSTART, ["model.config=null", f"model.name_or_path={base}", "model.tokenizer=byte",
                             "adapter.type=qlora", "precision.dtype=bf16"])
    text = str(refused.value)
    assert "adapter.type = 'qlora'" in text and "gpt_oss's experts cannot be split" in text and "GptOssExperts" in text


# ---------------------------------------------------------------------------------------------- merged export

@pytest.mark.parametrize("family", FAMILIES)
def test_a_merged_moe_export_is_a_plain_transformers_model(family: str, bases: dict[str, Path], tmp_path: Path,
                                                           one_thread: None) -> None:
    """QLoRA with LoRA on the experts, 4 steps, exported with --merge: transformers loads it with its own fused
    experts, and its logits are the trained model's (the base dequantized as training saw it; bf16 compute in
    training against fp32 here: measured 0.7% and 1.4% of the largest logit; the base is 100 times further)."""
    overrides = ["model.config=null", f"model.name_or_path={bases[family]}", "model.tokenizer=null",
                 "adapter.type=qlora", "adapter.target_experts=true", "precision.dtype=bf16", "optimizer.lr=1e-2"]
    cfg = resolve(QUICKSTART, tiny(tmp_path / "run", *overrides, steps=4))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with distributed_context() as dist:
        run = setup(cfg, dist)
        run_loop(run)
        run.metrics.close()
        run.engine.train(False)
        trained = run.engine.forward(ids).logits.float()
    export(tmp_path / "run", tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert {tuple(p.shape) for n, p in merged.named_parameters() if ".experts." in n} == \
        {(EXPERTS, 2 * FE, H), (EXPERTS, H, FE)}
    base = AutoModelForCausalLM.from_pretrained(bases[family]).eval()
    with torch.no_grad():
        got, before = merged(input_ids=ids).logits, base(input_ids=ids).logits
    error, moved = (got - trained).abs().max().item(), (before - trained).abs().max().item()
    print(f"{family}: merged vs trained {error:.2e}, base vs trained {moved:.2e} (largest logit "
          f"{trained.abs().max().item():.2f})")
    assert error < 0.03 * trained.abs().max().item() and moved > 20 * error

    # --adapter-only, loaded by generate/chat over the plain base: its LoRA on the experts is found and loaded
    export(tmp_path / "run", tmp_path / "adapter", adapter_only=True)
    loaded = chat.load(tmp_path / "adapter").model
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    on_experts = {n: p for n, p in loaded.named_parameters() if ".experts." in n and "lora_" in n}
    assert len(on_experts) == 2 * 2 * LAYERS * EXPERTS  # A and B of gate_up and down of every expert
    for name, p in on_experts.items():
        assert torch.equal(p.detach().float(), saved[name.replace(".default", "")].float()), name


# ------------------------------------------------------------------------------------------ load-balancing loss

AUX = {"output_router_logits": True, "router_aux_loss_coef": 0.5}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("enabled", [True, False])
def test_load_balancing_loss_is_in_the_gradient_and_logged(family: str, enabled: bool, tmp_path: Path,
                                                           one_thread: None) -> None:
    """With output_router_logits the gradient of a step is the gradient of transformers' own loss (token loss +
    router_aux_loss_coef x load-balancing loss) averaged over the micro-batches (measured equal to 1e-7), and
    `aux_loss` is logged beside `loss`, which stays the token loss; without it, neither (before: the load-balancing
    loss was never computed or trained)."""
    arch = {**MOE[family], **(AUX if enabled else {})}
    cfg = resolve(QUICKSTART, tiny(tmp_path, f"model.config={json.dumps(arch)}", "optimizer.grad_clip=null",
                                   "checkpoint.save_final=false", "train.micro_batch_size=2",
                                   "train.grad_accum_steps=2", steps=1))
    with distributed_context() as dist:
        run = setup(cfg, dist)
        reference = copy.deepcopy(run.engine.module)
        batches, _ = run.data.step_batches(DataPosition())
        run_loop(run)
        run.metrics.close()
    (row,) = read_metrics(tmp_path)
    token_losses, aux = [], []
    for b in batches:
        out = reference(**b.model_inputs(torch.device("cpu")), labels=b.labels, use_cache=False)
        (out.loss / len(batches)).backward()
        token_losses.append(out.loss.item() - (0.5 * out.aux_loss.item() if enabled else 0.0))
        aux.append(out.aux_loss.item() if enabled else None)
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in reference.parameters() if p.grad is not None))
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert row["loss"] == pytest.approx(sum(token_losses) / 2, rel=1e-5)  # equal tokens per micro-batch
    if enabled:
        assert row["aux_loss"] == pytest.approx(sum(aux) / 2, rel=1e-6) and row["aux_loss"] > 1.0
    else:
        assert "aux_loss" not in row


# ---------------------------------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("family", FAMILIES)
def test_the_plan_counts_experts_routers_and_active_parameters(family: str) -> None:
    """The plan's experts from the real model: experts per layer, active per token, one expert's size, every
    expert's and router's weights; active parameters = all less the (count - active) / count of the experts."""
    run = resolve(QUICKSTART, [f"model.config={json.dumps(MOE[family])}"])
    p = plan(run)
    model = AutoModelForCausalLM.from_config(run.architecture)
    experts = sum(q.numel() for n, q in model.named_parameters() if ".experts." in n)
    routers = sum(q.numel() for n, q in model.named_parameters() if n.endswith("mlp.gate.weight"))
    assert p.experts is not None and (p.experts.layers, p.experts.count, p.experts.active, p.experts.intermediate) \
        == (LAYERS, EXPERTS, ACTIVE, FE)
    assert (p.experts.parameters, p.experts.router_parameters) == (experts, routers) == \
        (LAYERS * EXPERTS * 3 * H * FE, LAYERS * EXPERTS * H)
    assert p.parameters == sum(q.numel() for q in model.parameters())
    assert p.active_parameters == p.parameters - experts // 2  # 2 of 4 experts active
    text = render(p, "tiny")
    assert f"{LAYERS} layers x {EXPERTS} experts of intermediate size {FE}, {ACTIVE} active per token" in text


STATES = {"full-fp32-adamw": ["precision.dtype=fp32", "optimizer.name=adamw"],
          "qlora-bf16-adamw8bit": ["adapter.type=qlora", "precision.dtype=bf16", "optimizer.name=adamw8bit"],
          "qlora-experts-bf16-adamw": ["adapter.type=qlora", "adapter.target_experts=true", "precision.dtype=bf16",
                                       "optimizer.name=adamw"]}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("combo", list(STATES))
def test_moe_model_states_match_the_plan(family: str, combo: str, bases: dict[str, Path], tmp_path: Path) -> None:
    """Planned weights, gradients and optimizer state against the real tensors after one step (counted as
    tests/test_memory_states.py counts them), full training and QLoRA with and without LoRA on the experts."""
    keys = {"weights": ("weights", "base weights", "LoRA parameters", "fp32 master"),
            "grads": ("gradients", "LoRA gradients"), "optimizer": ("optimizer state", "LoRA optimizer state")}
    model = [f"model.config={json.dumps(MOE[family])}"] if combo.startswith("full") else \
        ["model.config=null", f"model.name_or_path={bases[family]}", "model.tokenizer=null"]
    cfg = resolve(QUICKSTART, tiny(tmp_path, *model, *STATES[combo], f"data.source={TEST_DATA / 'alpaca_tasks.json'}",
                                   "data.format=alpaca", "data.seq_len=256", "data.max_documents=40",
                                   "checkpoint.save_final=false", steps=1))
    p = plan(cfg)
    planned = {k: sum(i.bytes for i in p.items if i.name.startswith(names)) for k, names in keys.items()}
    with distributed_context() as dist:
        run = setup(cfg, dist)
        batches, run.state.position = run.data.step_batches(run.state.position)
        train_step(run, batches)
        run.metrics.close()
        real = count_native_bytes(run)
    for key in keys:
        print(f"{family} {combo} {key}: planned {planned[key]:,} real {real[key]:,}")
        assert planned[key] == pytest.approx(real[key], rel=0.02, abs=4096), key


ACTIVATION_CASES = [(family, dtype, ckpt) for family in FAMILIES for dtype in ("fp32", "bf16") for ckpt in (False,
                                                                                                              True)]


def activation_case(family: str, dtype: str, checkpointing: bool) -> str:
    return f"{family}-{dtype}-{'ckpt' if checkpointing else 'full'}"


def activation_overrides(family: str, dtype: str, checkpointing: bool) -> list[str]:
    """8 experts, 2 active, hidden 256, 4 layers, 4 sequences of 512 tokens."""
    arch = {**MOE[family], "hidden_size": 256, "head_dim": 64, "num_hidden_layers": 4,
            ("num_experts" if family == "qwen3_moe" else "num_local_experts"): 8, "max_position_embeddings": 512}
    arch["moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"] = 128
    return [f"model.config={json.dumps(arch)}", "data.seq_len=512", "train.micro_batch_size=4",
            f"precision.dtype={dtype}", f"model.gradient_checkpointing={str(checkpointing).lower()}"]


@pytest.fixture(scope="module")
def moe_activations() -> dict[str, tuple[int, int]]:
    """Planned and measured bytes of every case; one probe process measures them all."""
    return planned_and_measured_activations({activation_case(*case): activation_overrides(*case)
                                             for case in ACTIVATION_CASES})


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,checkpointing", ACTIVATION_CASES,
                         ids=[activation_case(*case) for case in ACTIVATION_CASES])
def test_moe_activations_within_15_percent(moe_activations: dict[str, tuple[int, int]], family: str, dtype: str,
                                           checkpointing: bool) -> None:
    """The per-token activations of the active experts, k (10h + 16fe) bytes (bf16 15fe), against the peak RSS
    of one forward and backward (tests/memory_probe.py), at 8 experts, 2 active, hidden 256."""
    predicted, got = moe_activations[activation_case(family, dtype, checkpointing)]
    error = abs(got - predicted) / got
    print(f"{family} {dtype} checkpointing={checkpointing}: predicted {predicted / 2**20:.1f} MiB, measured "
          f"{got / 2**20:.1f} MiB (error {error:.1%})")
    assert error < 0.15


def test_split_experts_is_what_the_plan_sees_for_adapter_runs(bases: dict[str, Path]) -> None:
    """The plan's model of an adapter run has its experts split like the built one, so the 4-bit layers and LoRA
    targets it counts are the real ones."""
    run = adapter_run(bases["qwen3_moe"], AdapterConfig(type="qlora", rank=8, quant=QuantConfig()), "bf16")
    assert sum(isinstance(m, SplitExperts) for m in shapes(run).meta.modules()) == LAYERS
