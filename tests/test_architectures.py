"""Every feature on the model families people fine-tune, not only Llama: tiny from-config models (hidden 64, 2
layers, the byte tokenizer, whose special ids the configs take) of 11 architectures, each through training from
scratch, isolated packing, export and generation, LoRA and QLoRA on the export, GaLore and APOLLO, and an exact
resume; DeepSpeed ZeRO-3 on 2 ranks for all of them in one launch. README's architecture table is this file's.

What each architecture brings: Qwen2 q/k/v biases; Qwen3 and OLMo 2 norms on queries and keys; Mistral a sliding
window; Gemma 2 sliding and global layers, soft-capped attention and logits (no sdpa: eager); Gemma 3 sliding and
global layers with two RoPE bases; Phi-3 fused qkv and gate_up projections; GPT-NeoX LayerNorm, parallel residual,
partial rotary; Qwen3-MoE and Mixtral experts (fused 3-D weights, which GaLore and APOLLO refuse: test_moe.py has
the rest of MoE). The sliding windows (16) are shorter than the packed examples, so their masks are exercised.

One training per architecture is shared by the tests that need a trained model (module fixture `trained`), in this
process, on one thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import deepspeed_probe
from tests.helpers import (QUICKSTART, TEST_DATA, assert_bitwise_equal, final_weights, read_metrics, save_base,
                           tiny)
from trainer.adapters import parameter_counts
from trainer.adapters.targets import find_targets, meta_model
from trainer.data.batches import Batch, TrainData, collate
from trainer.distributed import distributed_context
from trainer.errors import ConfigError
from trainer.model.loss import IGNORE, token_loss_sum
from trainer.plan.peak import plan
from trainer.model.tokenizer import BYTE_SPECIAL_IDS, BYTE_VOCAB_SIZE, byte_tokenizer
from trainer.recipe.architecture import from_recipe, model_class
from trainer.recipe.resolve import resolve
from trainer.recipe.schema import AdapterConfig, DataConfig
from trainer.run.loop import run_loop, setup
from trainer.use.export import export

SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
WINDOW = {"sliding_window": 16}  # shorter than the packed examples: the sliding masks are exercised
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **SIZE},
    "qwen2": {"model_type": "qwen2", **SIZE},
    "qwen3": {"model_type": "qwen3", **SIZE, "head_dim": 16},
    "mistral": {"model_type": "mistral", **SIZE, "head_dim": 16, **WINDOW},
    "gemma2": {"model_type": "gemma2", **SIZE, "head_dim": 16, "query_pre_attn_scalar": 16, **WINDOW},
    "gemma3_text": {"model_type": "gemma3_text", **SIZE, "head_dim": 16, "query_pre_attn_scalar": 16, **WINDOW},
    "phi3": {"model_type": "phi3", **SIZE},
    "olmo2": {"model_type": "olmo2", **SIZE},
    "gpt_neox": {"model_type": "gpt_neox", **{k: v for k, v in SIZE.items() if k != "num_key_value_heads"}},
    "qwen3_moe": {"model_type": "qwen3_moe", **SIZE, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32},
    "mixtral": {"model_type": "mixtral", **SIZE, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
}
MOE = ("qwen3_moe", "mixtral")
NAMES = list(ARCHS)


def architecture(name: str) -> str:
    return f"model.config={json.dumps(ARCHS[name])}"


def train(out: Path, *overrides: str, steps: int, until: int | None = None) -> list[dict[str, Any]]:
    """A run of the real loop in this process (stopped after step `until` if given); its metrics rows."""
    cfg = resolve(QUICKSTART, [*tiny(out, steps=steps), *overrides])
    with distributed_context() as dist:
        run = setup(cfg, dist)
        try:
            run_loop(run, until_step=until)
        finally:
            run.metrics.close()
    return read_metrics(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """An architecture trained from scratch (8 steps, fp32, a final checkpoint) and exported, once per module."""
    done: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in done:
            base = tmp_path_factory.mktemp(name)
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                rows = train(base / "run", architecture(name), "optimizer.lr=3e-3", steps=8)
                export(base / "run", base / "export")
            finally:
                torch.set_num_threads(before)
            done[name] = {"run": base / "run", "export": base / "export", "losses": [r["loss"] for r in rows]}
        return done[name]

    return get


# ------------------------------------------------------------------------------------------------ from scratch

@pytest.mark.parametrize("name", NAMES)
def test_trains_from_scratch(name: str, trained: Callable[[str], dict[str, Any]], one_thread: None) -> None:
    losses = trained(name)["losses"]
    print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5  # measured 0.94-1.07 over 8 steps at lr 3e-3


@pytest.mark.parametrize("name", ["phi3", "olmo2", "gemma2"])
def test_special_ids_come_from_the_tokenizer_not_the_config_class(name: str) -> None:
    """Phi-3's config class defaults pad_token_id to 32000 and OLMo 2's eos to 50279, far outside a 259-token
    vocabulary (Phi-3's embedding then refuses its padding_idx, which broke validation's meta model); Gemma's pad 0
    is a byte. The resolved architecture takes the tokenizer's ids; an id the recipe gives past the vocabulary is a
    recipe problem naming it."""
    tok = byte_tokenizer()
    config = resolve(QUICKSTART, [architecture(name)]).architecture
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == \
        (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    meta_model(config)  # the embedding accepts its padding_idx
    with pytest.raises(ConfigError) as refused:
        resolve(QUICKSTART, [architecture(name), "model.config.pad_token_id=32000"])
    assert "model.config.pad_token_id = 32000" in str(refused.value) and "outside the vocabulary of 259" in \
        str(refused.value)


def test_an_attention_the_architecture_lacks_is_a_recipe_problem() -> None:
    """Gemma 2 has no sdpa path (sdpa cannot soft-cap attention logits): transformers raised at build time."""
    with pytest.raises(ConfigError) as refused:
        resolve(QUICKSTART, [architecture("gemma2"), "model.attn_implementation=sdpa"])
    text = str(refused.value)
    assert "model.attn_implementation = 'sdpa'" in text and "Gemma2ForCausalLM (gemma2) has no sdpa" in text
    assert "its default, eager" in text
    resolve(QUICKSTART, [architecture("gemma2"), "model.attn_implementation=eager"])


# ---------------------------------------------------------------------------------------------- isolated packing

def attentions(name: str) -> list[str]:
    """The attention implementations of this architecture that run on a CPU: eager, and sdpa where it has one."""
    cls = model_class(from_recipe(ARCHS[name], BYTE_VOCAB_SIZE, BYTE_SPECIAL_IDS))
    return ["sdpa", "eager"] if getattr(cls, "_supports_sdpa", False) else ["eager"]


PACKING_CASES = [(name, attention) for name in NAMES for attention in attentions(name)]


def _loss_and_grads(model: torch.nn.Module, inputs: list[dict[str, Any]], labels: list[torch.Tensor]
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    """The summed token loss of several forwards and the gradient of that sum."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for kwargs, lab in zip(inputs, labels):
        loss = token_loss_sum(model(**kwargs, use_cache=False).logits, lab)
        loss.backward()
        total += float(loss.detach().double())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _data(packing: str) -> TrainData:
    config = DataConfig(source=str(TEST_DATA / "alpaca_tasks.json"), format="alpaca", seq_len=256, packing=packing,
                        max_documents=80)
    return TrainData(config, byte_tokenizer(), seed=0, rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=1)


@pytest.mark.parametrize("name,attention", PACKING_CASES, ids=[f"{n}-{a}" for n, a in PACKING_CASES])
def test_isolated_packing_gives_the_loss_and_gradients_of_one_by_one(name: str, attention: str,
                                                                      trained: Callable[[str], dict[str, Any]],
                                                                      one_thread: None) -> None:
    """Packed rows (position ids, no mask) against the same examples one by one, with every attention the
    architecture runs here, on the trained model (a fresh one attends almost uniformly, so crossing examples would
    hardly show): masks built from the position ids must hold with sliding windows, soft-capping and MoE routing
    too. Measured over the 21 cases: loss within 1e-7 relative, gradients within 1.4e-6 of their largest value;
    across examples the gradients differ by 0.18-0.29."""
    packed, loose = _data("isolated"), _data("none")
    bins = packed.train_sets[0]
    chosen = (0, 1, 2, len(bins) - 1)  # full bins and the emptiest one: padding in the batch
    batch = every_token_a_target(collate([bins.get(b) for b in chosen], byte_tokenizer().pad_token_id))
    examples = [int(d) for b in chosen for d in bins.items[bins.bin_offsets[b]:bins.bin_offsets[b + 1]]]
    one_by_one = [torch.from_numpy(loose.train_sets[0].get(d)[0])[None] for d in examples]
    assert len(examples) >= 5 and min(ids.shape[1] for ids in one_by_one) > 16  # longer than the windows
    model = AutoModelForCausalLM.from_pretrained(trained(name)["export"], attn_implementation=attention,
                                                 dtype=torch.float32).eval()

    got_loss, got = _loss_and_grads(model, [batch.model_inputs(torch.device("cpu"))], [batch.labels])
    want_loss, want = _loss_and_grads(model, [{"input_ids": ids} for ids in one_by_one], one_by_one)
    crossed = Batch(batch.input_ids, batch.attention_mask, batch.labels)  # attention across examples
    crossed_loss, crossed_grads = _loss_and_grads(model, [crossed.model_inputs(torch.device("cpu"))],
                                                  [crossed.labels])
    print(f"{name} {attention}: loss {abs(got_loss - want_loss) / want_loss:.1e} relative, gradients "
          f"{gradient_difference(got, want):.1e} (across examples: {gradient_difference(crossed_grads, want):.1e})")
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert gradient_difference(got, want) < 1e-5
    assert gradient_difference(crossed_grads, want) > 1e-3  # the control: a hundred times the tolerance


def every_token_a_target(batch: Batch) -> Batch:
    """The batch with every token of every example a target (but each example's first, which nothing before it in
    the example predicts, and padding): Alpaca's prompts carry no loss, and with them a window of 16 tokens would
    hide what crosses from one example into the next."""
    assert batch.position_ids is not None
    labels = torch.where((batch.position_ids == 0) | (batch.attention_mask == 0), IGNORE, batch.input_ids)
    return Batch(batch.input_ids, batch.attention_mask, labels, batch.position_ids)


def gradient_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest difference of any tensor's gradient, relative to that gradient's largest value."""
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-12)) for k in want)


# ------------------------------------------------------------------------------------------- export and generate

@pytest.mark.parametrize("name", NAMES)
def test_export_reloads_with_transformers_and_generates(name: str, trained: Callable[[str], dict[str, Any]],
                                                        one_thread: None) -> None:
    """The export loads with plain transformers, gives the checkpoint's logits, and generates; its tokenizer fits
    the embeddings (a Qwen2 export's tokenizer had one token more: transformers 5 loads it with Qwen2's own class,
    which added an unknown token, so fine-tuning the export was refused)."""
    run = trained(name)
    model = AutoModelForCausalLM.from_pretrained(run["export"]).eval()
    tok = AutoTokenizer.from_pretrained(run["export"])
    rows = model.get_input_embeddings().num_embeddings
    assert len(tok) == rows and max(tok.all_special_ids) < rows
    reference = AutoModelForCausalLM.from_pretrained(run["export"]).eval()
    reference.load_state_dict(final_weights(run["run"]), strict=False)
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1] and torch.equal(out[0, :ids.shape[1]], ids[0])


# --------------------------------------------------------------------------------------- LoRA and QLoRA on it

ADAPTER_CASES = [(name, kind) for name in NAMES for kind in ("lora", "qlora")]


@pytest.mark.parametrize("name,kind", ADAPTER_CASES, ids=[f"{n}-{k}" for n, k in ADAPTER_CASES])
def test_lora_and_qlora_train_on_the_export(name: str, kind: str, trained: Callable[[str], dict[str, Any]],
                                            tmp_path: Path, one_thread: None) -> None:
    """Three steps of LoRA / QLoRA over the exported model, its own tokenizer: the trainable parameters are LoRA's
    on every linear layer but the head (the experts excluded: adapter.target_experts is off), every such layer is
    4-bit under QLoRA (the experts of a MoE model too), and the loss is finite."""
    export_dir = trained(name)["export"]
    overrides = ["model.config=null", f"model.name_or_path={export_dir}", "model.tokenizer=null",
                 f"adapter.type={kind}", "adapter.rank=4", "precision.dtype=bf16", "checkpoint.save_final=false"]
    cfg = resolve(QUICKSTART, [*tiny(tmp_path, steps=3), *overrides])
    with distributed_context() as dist:
        run = setup(cfg, dist)
        try:
            run_loop(run)
        finally:
            run.metrics.close()
        model = run.engine.module
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    targets = find_targets(meta_model(cfg.architecture, AdapterConfig(type=kind)), "all-linear")
    trainable, _ = parameter_counts(model)
    assert trainable == sum(4 * (t.in_features + t.out_features) for t in targets) > 0
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    if kind == "qlora":
        head = model.get_output_embeddings()
        linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
                  and ".lora_" not in n]
        assert {type(m.weight).__name__ for m in linear} == {"Params4bit"}
        if name in MOE:
            experts = [m for n, m in model.named_modules() if ".experts.gate_up_proj.expert" in n
                       and isinstance(m, torch.nn.Linear)]
            assert len(experts) == 2 * 4 and all(type(m.weight).__name__ == "Params4bit" for m in experts)


# ------------------------------------------------------------------------------------------- GaLore and APOLLO

LOW_RANK = {"galore": ["optimizer.name=galore_adamw", "optimizer.galore.rank=8", "optimizer.galore.update_gap=2"],
            "apollo": ["optimizer.name=apollo_adamw", "optimizer.apollo.rank=8", "optimizer.apollo.update_gap=2"]}
LOW_RANK_CASES = [(name, kind) for name in NAMES for kind in LOW_RANK]


@pytest.mark.parametrize("name,kind", LOW_RANK_CASES, ids=[f"{n}-{k}" for n, k in LOW_RANK_CASES])
def test_galore_and_apollo(name: str, kind: str, tmp_path: Path, one_thread: None) -> None:
    """Four steps from scratch with a projector refresh: the loss falls. MoE models are refused at validation:
    their experts are fused 3-D weights that neither projects (they would keep full AdamW state)."""
    overrides = [architecture(name), *LOW_RANK[kind], "optimizer.lr=3e-3", "checkpoint.save_final=false"]
    if name in MOE:
        with pytest.raises(ConfigError) as refused:
            resolve(QUICKSTART, [*tiny(tmp_path, steps=4), *overrides])
        assert f"optimizer.name = '{LOW_RANK[kind][0].split('=')[1]}'" in str(refused.value)
        assert "fused 3-D weights" in str(refused.value) and "GaLore and APOLLO do not project" in str(refused.value)
        return
    losses = [r["loss"] for r in train(tmp_path, *overrides, steps=4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1, losses


# ------------------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bitwise(name: str, tmp_path: Path, one_thread: None) -> None:
    """Six steps straight, and the same run stopped after step 3 and resumed from its checkpoint in a new setup:
    losses, gradient norms and final weights bitwise equal (the MoE routing included)."""
    overrides = [architecture(name), "checkpoint.every_steps=3"]
    straight = train(tmp_path / "straight", *overrides, steps=6)
    train(tmp_path / "resumed", *overrides, steps=6, until=3)
    resumed = train(tmp_path / "resumed", *overrides, steps=6)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    assert_bitwise_equal(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))


# ----------------------------------------------------------------------------------------------------- ZeRO-3

Z3 = ["distributed.engine=deepspeed", "distributed.zero_stage=3",
      "distributed.deepspeed_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
# DeepSpeed's bf16 (bf16 weights) against DDP's autocast over fp32 weights, 4 steps: measured up to 1.9e-3
# (gemma3_text, step 2), the first step's loss within 1e-4
BF16_TOLERANCE = 5e-3


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_zero3_on_two_ranks_for_every_architecture(tmp_path: Path) -> None:
    """One torchrun launch: each architecture from scratch on 2 ranks, DDP and ZeRO-3 (every parameter
    partitioned), bf16, 4 steps: the same weights at the start (the loss of step 1), losses within bf16's
    tolerance of DDP's after, and falling. And QLoRA with LoRA on the experts over a saved Qwen3-MoE and Mixtral
    (experts split and quantized one module at a time, each partitioned as it loads): the same losses as DDP, with
    less of the base held per rank."""
    common = ["precision.dtype=bf16", "train.micro_batch_size=2", "checkpoint.save_final=false"]
    runs = [(f"{name}-{engine}", [architecture(name), *common, *(Z3 if engine == "z3" else [])])
            for engine in ("ddp", "z3") for name in NAMES]  # the native runs first (see the probe)
    for name in MOE:
        base = save_base(tmp_path / f"{name}-base", ARCHS[name])
        qlora = ["model.config=null", f"model.name_or_path={base}", "model.tokenizer=null", "adapter.type=qlora",
                 "adapter.target_experts=true", *common]
        runs.insert(0, (f"{name}-qlora-ddp", qlora))
        runs.append((f"{name}-qlora-z3", [*qlora, *Z3]))
    spec = [{"name": n, "overrides": tiny(tmp_path / n, *o, steps=4)} for n, o in runs]
    facts = deepspeed_probe.launch(tmp_path, spec, QUICKSTART)["facts"][0]
    for name in [*NAMES, *(f"{m}-qlora" for m in MOE)]:
        assert facts[f"{name}-z3"]["engine"] == "ZeroEngine" and facts[f"{name}-ddp"]["engine"] == "NativeEngine"
        ddp = [r["loss"] for r in read_metrics(tmp_path / f"{name}-ddp")]
        z3 = [r["loss"] for r in read_metrics(tmp_path / f"{name}-z3")]
        print(f"{name}: ddp {np.round(ddp, 4).tolist()} z3 {np.round(z3, 4).tolist()}")
        assert len(z3) == 4 and z3[0] == pytest.approx(ddp[0], abs=5e-4)
        assert max(abs(a - b) for a, b in zip(ddp, z3)) < BF16_TOLERANCE, name
        assert z3[-1] < z3[0] - (0.3 if name in NAMES else 0.05)
    for name in MOE:
        assert facts[f"{name}-qlora-z3"]["base_held"] < facts[f"{name}-qlora-ddp"]["base_held"]


# ------------------------------------------------------------------------------------------------ known models

# parameters in total, and per token for a mixture of experts, as each model card states them
PUBLISHED = {"Qwen/Qwen2.5-7B": (7.61e9, None), "Qwen/Qwen3-8B": (8.2e9, None),
             "Qwen/Qwen3-30B-A3B": (30.5e9, 3.3e9), "mistralai/Mistral-7B-v0.3": (7.25e9, None),
             "google/gemma-2-9b": (9.24e9, None), "microsoft/Phi-3-mini-4k-instruct": (3.8e9, None),
             "microsoft/Phi-4-mini-instruct": (3.8e9, None), "mistralai/Mixtral-8x7B-v0.1": (46.7e9, 12.9e9)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_known_models_plan_offline_with_their_published_sizes(name: str, tmp_path: Path) -> None:
    """The table of known models (trainer/recipe/known_models.py, typed from each config.json) plans these
    families without a download, and its numbers give the parameter counts their model cards publish (within 1%),
    active parameters of the mixtures of experts included; their special ids fit their vocabularies."""
    run = resolve(QUICKSTART, [f"output_dir={tmp_path}", "model.config=null", f"model.name_or_path={name}"])
    assert run.architecture_source in ("known models table", "local")
    p = plan(run)
    total, active = PUBLISHED[name]
    assert p.parameters == pytest.approx(total, rel=0.01)
    if active is not None:
        assert p.experts is not None and p.active_parameters == pytest.approx(active, rel=0.02)
    config = run.architecture
    assert all(getattr(config, key) is None or 0 <= getattr(config, key) < config.vocab_size
               for key in ("pad_token_id", "bos_token_id", "eos_token_id"))
