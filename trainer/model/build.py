"""Build the model the recipe asks for.

Order of the transforms (each needs the one before):
1. load: `from_pretrained` (hub id or directory) or `from_config` (architecture dict, from scratch), weights
   in fp32 (the master copy; autocast gives bf16/fp16 compute). For qlora the linear layers are quantized
   while loading (bitsandbytes through transformers' BitsAndBytesConfig): quantization has to see the
   original weights, so it cannot come later, and loading an 8B model unquantized first would not fit. A
   mixture-of-experts base (qlora, or LoRA on its experts) is read module by module instead, its fused experts
   split into one linear layer per expert so that they are quantized and adaptable (adapters/experts.py);
2. match the vocabulary to the tokenizer (a from-scratch config takes the tokenizer's size);
3. adapter runs: prepare for k-bit training (freeze the base, norms in fp32, inputs that require grad so
   checkpointed blocks have something to differentiate), then attach LoRA (peft). Preparing comes first
   because it freezes every parameter: done after attaching it would freeze the adapter too;
4. INT8 weights (precision.weights: int8): the low-rank optimizer's targets become INT8 training weights
   (trainer/model/int8_weights.py), after the vocabulary is matched (resizing would replace the head, not a target)
   and from the initialized fp32 or bf16 values, so a from-scratch INT8 run starts from the same weights
   rounded once;
5. tiled MLP (model.tiled_mlp): each dense MLP's forward runs in tiles of the sequence (trainer/model/tiled_mlp.py),
   after the adapters so their LoRA layers are inside the tiles;
6. gradient checkpointing (non-reentrant), last, so it wraps the final modules, LoRA layers included.

Under DeepSpeed ZeRO-3 an adapter run's base is read one module at a time and each module is partitioned as soon as
its weights are in (adapters/streamed.py; transformers would load a quantized base whole on every rank), and the
LoRA weights, created whole by peft, are partitioned right after they are attached: `Placement.partition`, given by
the engine (engine/build.py model_init_context).

From scratch, the initial weights are a function of train.seed and each module's name only: every module is
initialized by the model's own rule (`_init_weights`) in fp32 on the CPU from a generator seeded by (seed, module
name), then cast to its dtype and device. So the native engine, DeepSpeed ZeRO-1/2 and ZeRO-3 (which builds the
model already partitioned, one module gathered at a time for this) start from the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from trainer import adapters

from trainer.model import int8_weights
from trainer.adapters import streamed
from trainer.adapters.experts import splits_experts
from trainer.adapters.streamed import Partition
from trainer.dtypes import torch_dtype
from trainer.errors import fetching_from_hub
from trainer.model.causal_lm import CausalLM
from trainer.model.tiled_mlp import tile_mlps
from trainer.model.tokenizer import save_tokenizer
from trainer.optim.lowrank_groups import member, targets_of
from trainer.recipe.resolved import ResolvedRun

log = logging.getLogger(__name__)
Gather = Callable[[list[nn.Parameter]], ContextManager[Any]]


def _from_scratch_config(run: ResolvedRun, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The resolved architecture with the tokenizer's special token ids (generation reads them from config.json)."""
    config = copy.deepcopy(run.architecture)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if run.recipe.model.config.get(name) is None:  # type: ignore[union-attr]
            setattr(config, name, getattr(tokenizer, name))
    return config


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one module, from the run's seed and the module's dotted name."""
    digest = hashlib.sha256(f"trainer.init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _no_gather(params: list[nn.Parameter]) -> ContextManager[Any]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Placement:
    """How the engine places parameters while the model is built. `gathered` makes a partitioned module's parameters
    whole for a moment (initialize_by_name); `partition`, when the engine partitions parameters that were built
    whole (ZeRO-3 adapter runs), splits a module's parameters over the ranks and frees the whole copies."""

    gathered: Gather = _no_gather
    partition: Partition | None = None


WHOLE = Placement()  # the native engine, DeepSpeed ZeRO-1/2: every rank holds whole parameters


def initialize_by_name(model: CausalLM, seed: int, gathered: Gather = _no_gather) -> None:
    """Initialize every module with the model's own rule, from a generator seeded by (seed, module name), in fp32
    on the CPU; `gathered` makes a partitioned module's parameters whole while it is initialized (ZeRO-3)."""
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        with gathered(own), torch.random.fork_rng(devices=[]), torch.no_grad():
            storage = [p.data for p in own]  # (ZeRO-3: the gathered buffers DeepSpeed partitions again on exit)
            for p in own:
                p.data = torch.empty(p.shape, dtype=torch.float32)
            torch.manual_seed(name_seed(seed, name))
            model._init_weights(module)
            for p, target in zip(own, storage):
                target.copy_(p.data)  # cast to the parameter's own dtype and device, in its own tensor
                p.data = target


def save_model_files(model: CausalLM, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """What a checkpoint needs to be exported or used without the recipe's sources (its `hf/`): the model's config
    and generation config with inference defaults, and the tokenizer (with the chat template the run used)."""
    config = copy.deepcopy(model.config)
    config.use_cache = True
    config.save_pretrained(path)
    generation = copy.deepcopy(getattr(model, "generation_config", None)) or GenerationConfig.from_model_config(config)
    generation.use_cache = True
    generation.save_pretrained(path)
    save_tokenizer(tokenizer, path)


def _streamed_base(run: ResolvedRun, device: torch.device, partition: Partition | None) -> CausalLM:
    """An adapter run's base read module by module (see the module docstring): under ZeRO-3 each module partitioned
    once loaded; a mixture-of-experts base has its experts split (and quantized, for qlora) one expert at a time.
    With the config and generation defaults `from_pretrained` would give it (its name too: peft writes it into the
    adapter's config as the base to load)."""
    m, adapter, precision = run.recipe.model, run.recipe.adapter, run.recipe.precision
    folder = streamed.checkpoint_folder(m.name_or_path, m.revision)  # type: ignore[arg-type]
    if m.rope_scaling:  # the resolved architecture carries it, merged into the model's own RoPE settings
        config = copy.deepcopy(run.architecture)
    else:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=m.trust_remote_code)
    config.name_or_path = m.name_or_path
    if m.attn_implementation:
        config._attn_implementation = m.attn_implementation
    quantization = adapters.bnb_config(adapter.quant, zero3=run.execution.zero3) if adapter.type == "qlora" else None
    model = streamed.load_base(folder, config, quantization, torch_dtype(precision.dtype), device, partition,
                               split_experts=splits_experts(adapter, config), trust_remote_code=m.trust_remote_code)
    how = "partitioned as it loaded" if partition is not None else "experts split"
    log.info("base loaded module by module, %s (%s)", how, m.name_or_path)
    return model


def _quantize_targets(model: CausalLM, run: ResolvedRun) -> None:
    """INT8 master weights for exactly the matrices GaLore or APOLLO projects (their target rule)."""
    targets, _ = targets_of(model, run.recipe.optimizer)
    count = int8_weights.quantize_weights(model, targets)
    log.info("INT8 weights (per-row scales, stochastic rounding) on the %d %s targets", count,
             member(run.recipe.optimizer))


def build_model(run: ResolvedRun, tokenizer: PreTrainedTokenizerBase, device: torch.device | None = None,
                placement: Placement = WHOLE) -> CausalLM:
    """The causal LM in fp32 on the CPU (a qlora base: quantized on `device`), vocabulary matched, adapters
    attached, checkpointing applied; the engine moves it (or, `placement.partition` given, partitions it here)."""
    m, adapter, precision = run.recipe.model, run.recipe.adapter, run.recipe.precision
    extra: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        extra["attn_implementation"] = m.attn_implementation
    if m.config is None and adapter.type != "none" and (placement.partition is not None
                                                        or splits_experts(adapter, run.architecture)):
        model = _streamed_base(run, device or torch.device("cpu"), placement.partition)
    elif m.config is None:
        load = adapters.load_kwargs(adapter, precision.dtype, device or torch.device("cpu"))
        if not precision.master_weights and adapter.type == "none":
            load["dtype"] = torch_dtype(precision.dtype)  # the model itself in bf16: no fp32 master copy
        if m.rope_scaling:  # the resolved architecture carries it, merged into the model's own RoPE settings
            extra["config"] = copy.deepcopy(run.architecture)
        assert m.name_or_path is not None, "no model.config: name_or_path is set (validated)"
        with fetching_from_hub(m.name_or_path):
            model = AutoModelForCausalLM.from_pretrained(m.name_or_path, revision=m.revision, **load, **extra)
    else:
        dtype = torch.float32 if precision.master_weights else torch_dtype(precision.dtype)
        with no_init_weights():  # initialized below, by name
            model = AutoModelForCausalLM.from_config(_from_scratch_config(run, tokenizer), dtype=dtype, **extra)
        model.tie_weights()  # no_init_weights also skips the tying of a tie_word_embeddings model
        initialize_by_name(model, run.recipe.train.seed, placement.gathered)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        if adapter.type != "none":  # resolve.py refuses this before loading; a tokenizer changed since then
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the base model's embeddings have {rows} "
                             "rows, and adapters freeze the embeddings")
        log.info("resizing embeddings %d -> %d to fit the tokenizer", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    if adapter.type != "none":
        model = adapters.apply(model, adapter, seed=run.recipe.train.seed,
                               gradient_checkpointing=m.gradient_checkpointing)
        if placement.partition is not None:  # the LoRA weights peft just created, whole on every rank
            placement.partition(model)
        log.info("adapter: %s", adapters.describe(model, adapter))
    if precision.weights == "int8":
        _quantize_targets(model, run)
    if run.mlp_tiles > 1:
        tiled = tile_mlps(model, run.mlp_tiles)
        log.info("tiled MLP: %d layers' MLPs computed in %d tiles of the sequence", tiled, run.mlp_tiles)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    _, n = adapters.parameter_counts(model)  # a packed 4-bit weight counts the elements it stands for
    log.info("model: %s, %.2fM parameters%s", type(model).__name__, n / 1e6,
             ", gradient checkpointing" if m.gradient_checkpointing else "")
    return model
