"""What DeepSpeed ZeRO (stages 1-3, CPU offload) is, at plan time: what it refuses in a recipe, what each rank keeps
(partitions of weights, gradients, fp32 master copies and optimizer state by stage, in CPU memory when offloaded;
at ZeRO-3 the module computing gathered whole), and what one of its checkpoints takes on disk. Imports no engine
and not DeepSpeed: validation and `plan` read this on a login node (engine/deepspeed.py is the engine itself).

The model states follow the ZeRO paper (Rajbhandari et al.): 2 + 2 + 12 bytes per parameter in bf16/fp16, the
optimizer's 12 partitioned from stage 1, the gradients' from stage 2, the weights' from stage 3. DeepSpeed's own
defaults that change what a rank holds (the ZeRO-3 persistence threshold and prefetch bucket) come from
engine/ds_config.py, with `distributed.deepspeed_overrides` applied.
"""

from __future__ import annotations

import math

from trainer.adapters.footprint import FrozenTensor, lora_numels
from trainer.engine.ds_config import owned_override_paths, prefetch_bucket_elements, persistence_threshold
from trainer.errors import KeySource, Problem
from trainer.recipe.execution import execution_of
from trainer.optim.lowrank_groups import member
from trainer.plan.frozen_base import base_label, base_tensors, whole_base_bytes, whole_base_item
from trainer.plan.items import CheckpointSize, Item, Kind, ModelStates, Shapes, Where
from trainer.plan.optimizer_state import lora_targets, optimizer_bytes
from trainer.plan.shapes import largest_layer, layer_of
from trainer.recipe.resolved import ResolvedRun
from trainer.recipe.schema import Recipe

NAME = "deepspeed"


# The attention implementations sequence parallelism runs inside its exchange (model/sequence_parallel.py).
SEQUENCE_PARALLEL_ATTENTION = ("sdpa", "eager", "flash_attention_2")

# ------------------------------------------------------------------------------------------------ problems

def problems(r: Recipe, src: KeySource) -> list[Problem]:
    """What a recipe naming `distributed.engine: deepspeed` cannot ask of it (stage 0 runs on the native engine,
    whose own rules then apply too)."""
    if r.distributed.engine != NAME:
        return []
    out = _zero_problems(r, src) + _override_problems(r, src) + _low_rank_problems(r, src)
    if execution_of(r).deepspeed:
        out += _training_problems(r, src) + _adapter_problems(r, src) + _sequence_problems(r, src)
    return out


def _sequence_problems(r: Recipe, src: KeySource) -> list[Problem]:
    """Sequence parallelism (model/sequence_parallel.py): every rank holds seq_len / N tokens of each row, and
    attention is exchanged through one of the implementations it wraps. (Heads: resolve.py, with the model.)"""
    n, out = r.distributed.sequence_parallel, list[Problem]()
    if r.model.head_in_loss and r.distributed.zero_stage == 3:
        out.append(Problem("model.head_in_loss", True, "the loss reads the LM head's whole weight, which ZeRO-3 "
                           "partitions; use distributed.zero_stage: 1 or 2, or head_in_loss: false",
                           src("model.head_in_loss")))
    if n == 1:
        return out
    seq_len = r.data.seq_len
    if seq_len % n:
        lower, upper = seq_len - seq_len % n, seq_len + n - seq_len % n
        out.append(Problem("data.seq_len", seq_len, f"must be a multiple of distributed.sequence_parallel={n} (each "
                           f"rank holds seq_len / {n} tokens of every row): use {lower} or {upper}",
                           src("data.seq_len")))
    attention = r.model.attn_implementation
    if attention is not None and attention not in SEQUENCE_PARALLEL_ATTENTION:
        out.append(Problem("model.attn_implementation", attention, f"sequence parallelism wraps "
                           f"{', '.join(SEQUENCE_PARALLEL_ATTENTION)} "
                           "attention; choose one of them", src("model.attn_implementation")))
    return out


def _low_rank_problems(r: Recipe, src: KeySource) -> list[Problem]:
    """GaLore and APOLLO are refused wherever the recipe names DeepSpeed (at stage 0 too, where it would run on the
    native engine: the recipe should say so)."""
    if r.optimizer.low_rank is None:
        return []
    return [Problem("optimizer.name", r.optimizer.name, f"{member(r.optimizer)} needs whole weight matrices, and "
                    "DeepSpeed flattens and partitions parameters, so no rank ever sees a matrix to project; use "
                    "distributed.engine: native with distributed.zero_stage: 1 (its state sharded across ranks by "
                    "whole parameters)", src("optimizer.name"))]


def _zero_problems(r: Recipe, src: KeySource) -> list[Problem]:
    d, out = r.distributed, []
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        out.append(Problem("distributed.offload_optimizer", d.offload_optimizer, "optimizer offload is part of "
                           "ZeRO: set distributed.zero_stage: 1, 2 or 3", src("distributed.offload_optimizer")))
    if d.offload_params != "none" and d.zero_stage != 3:
        out.append(Problem("distributed.offload_params", d.offload_params, "parameter offload needs "
                           "distributed.zero_stage: 3", src("distributed.offload_params")))
    if d.offload_optimizer != "none" and r.optimizer.name != "adamw":
        out.append(Problem("optimizer.name", r.optimizer.name, "with distributed.offload_optimizer: cpu the "
                           "update runs on the CPU in DeepSpeedCPUAdam: use optimizer.name: adamw, or "
                           "offload_optimizer: none", src("optimizer.name")))
    scale = r.precision.initial_loss_scale
    if r.precision.dtype == "fp16" and d.zero_stage > 0 and not math.log2(scale).is_integer():
        out.append(Problem("precision.initial_loss_scale", scale, "DeepSpeed's loss scale starts at a power of "
                           "two (2**initial_scale_power): use e.g. 65536", src("precision.initial_loss_scale")))
    return out


def _override_problems(r: Recipe, src: KeySource) -> list[Problem]:
    d, out = r.distributed, []
    if d.deepspeed_overrides and d.zero_stage == 0:
        out.append(Problem("distributed.deepspeed_overrides", d.deepspeed_overrides, "zero_stage 0 runs on the "
                           "native engine (DeepSpeed's stage 0 mishandles fp16 and bf16), which reads no DeepSpeed "
                           "config: remove the overrides or set distributed.zero_stage: 1, 2 or 3",
                           src("distributed.deepspeed_overrides")))
    for path, value, recipe_key in owned_override_paths(d.deepspeed_overrides):
        out.append(Problem(f"distributed.deepspeed_overrides.{path}", value, f"generated from the recipe; set "
                           f"{recipe_key} instead", src("distributed.deepspeed_overrides")))
    return out


def _training_problems(r: Recipe, src: KeySource) -> list[Problem]:
    """What ZeRO cannot train: skipped fp32 steps, bf16 weights without masters."""
    out = []
    if r.train.max_nonfinite_steps and r.precision.dtype == "fp32" and not r.optimizer.per_layer:
        out.append(Problem("train.max_nonfinite_steps", r.train.max_nonfinite_steps, "DeepSpeed checks gradients "
                           "for NaN/inf only in bf16 and fp16, so in fp32 it would apply them; use precision.dtype: "
                           "bf16, or set it to 0", src("train.max_nonfinite_steps")))
    if not r.precision.master_weights and r.precision.dtype == "bf16":
        out.append(Problem("precision.master_weights", False, "DeepSpeed keeps its own fp32 master copy in the "
                           "optimizer; remove it", src("precision.master_weights")))
    return out


def _adapter_problems(r: Recipe, src: KeySource) -> list[Problem]:
    """LoRA/QLoRA under ZeRO 1-3."""
    d, q = r.distributed, r.adapter.quant
    out: list[Problem] = []
    if r.adapter.type == "none":
        return out
    if r.precision.dtype == "fp16":
        out.append(Problem("precision.dtype", "fp16", "adapter runs on DeepSpeed keep fp32 LoRA weights under "
                           "torch.autocast (DeepSpeed's torch_autocast), which runs here in bf16 only; DeepSpeed's "
                           "fp16 mode would cast the LoRA weights and the fp32 norms to fp16; use precision.dtype: "
                           "bf16, or distributed.engine: native for fp16", src("precision.dtype")))
    if r.adapter.type == "qlora" and q.type == "int8":
        out.append(Problem("adapter.quant.type", "int8", "LLM.int8 layers keep their row scales and outlier state "
                           "outside their parameters, which ZeRO cannot partition or gather (bitsandbytes#1451: wrong "
                           "losses under ZeRO-3); use adapter.quant.type: nf4, or distributed.engine: native",
                           src("adapter.quant.type")))
    if r.adapter.use_dora and d.zero_stage == 3:
        out.append(Problem("adapter.use_dora", True, "DoRA reads each base weight outside the layer's own forward "
                           "(its magnitude is the norm of W + BA), where ZeRO-3 holds only a partition of it; use "
                           "distributed.zero_stage: 2, or adapter.use_dora: false", src("adapter.use_dora")))
    if r.adapter.type == "qlora" and q.type != "int8" and d.zero_stage == 3 and q.storage_dtype == "uint8":
        out.append(Problem("adapter.quant.storage_dtype", "uint8", "ZeRO-3 partitions the packed 4-bit weights as "
                           "tensors of their storage dtype and gathers a layer's tensors together; DeepSpeed before "
                           "0.19.2 gathers them in buffers of one dtype (PR #8073), so uint8 codes beside bf16/fp32 "
                           "tensors come back as garbage (loss 0 or NaN gradients, accelerate#3983); set "
                           f"adapter.quant.storage_dtype: {q.compute_dtype} (the compute dtype) or auto",
                           src("adapter.quant.storage_dtype")))
    return out


# ------------------------------------------------------------------------------------------------ model states

def model_states(run: ResolvedRun, sh: Shapes) -> ModelStates:
    """Each rank's share of the model states at this stage and world size."""
    if run.execution.adapted:
        return _adapter_states(run, sh)
    return ModelStates(_full_states(run, sh), sh.total)


def _placement(run: ResolvedRun) -> tuple[Where, Where]:
    """(where the optimizer state and master weights live, where the parameter partitions live)."""
    e = run.execution
    return ("cpu" if e.offload_optimizer else "gpu"), ("cpu" if e.offload_params else "gpu")


def _full_states(run: ResolvedRun, sh: Shapes) -> list[Item]:
    """2 + 2 + 12 bytes per parameter in bf16/fp16 (4 + 4 + 8 in fp32), partitioned by stage."""
    world, stage, psi = run.world_size, run.execution.zero_stage, sh.total
    half = run.recipe.precision.dtype != "fp32"
    element = 2 if half else 4  # weights and gradients
    weight_shards = world if stage >= 3 else 1
    grad_shards = world if stage >= 2 else 1
    where_opt, where_w = _placement(run)
    items = [Item(Kind.WEIGHTS, f"weights ({'bf16/fp16' if half else 'fp32'}"
                  f"{', partitioned' if weight_shards > 1 else ''})", element * psi // weight_shards, where_w)]
    if where_opt == "cpu" and stage >= 2:  # reduced straight into fp32 partitions beside the optimizer
        items.append(Item(Kind.GRADIENTS, "gradients (fp32 partition, with the offloaded optimizer)", 4 * psi // world,
                          "cpu"))
    else:
        items.append(Item(Kind.GRADIENTS, f"gradients{' (partitioned)' if grad_shards > 1 else ''}",
                          element * psi // grad_shards))
        if stage == 2 and world > 1:  # a parameter crossing a partition boundary keeps its whole gradient
            items.append(Item(Kind.GRADIENTS, "gradients (whole tensor straddling a partition boundary, worst rank)",
                              element * max(p.numel for p in sh.params)))
    if half:
        items.append(Item(Kind.MASTER_WEIGHTS, "fp32 master weights (partitioned)", 4 * psi // world, where_opt))
    items.append(Item(Kind.OPTIMIZER_STATE, "optimizer state (Adam moments, partitioned)", 8 * psi // world,
                      where_opt, note=f"ZeRO stage {stage} over {world} ranks"))
    if stage >= 3:
        items += _zero3_full_extras(run, sh, element, where_w)
    return items


def _zero3_full_extras(run: ResolvedRun, sh: Shapes, element: int, where_w: Where) -> list[Item]:
    """ZeRO-3 keeps tensors up to its persistence threshold whole on every rank, and gathers the live layers."""
    persistent = sum(p.numel for p in sh.params if p.numel <= persistence_threshold(run.recipe.distributed))
    largest = largest_layer([(p.name, p.numel) for p in sh.params])
    return [Item(Kind.WEIGHTS, "weights kept whole on every rank (ZeRO-3 persistence threshold: norms, biases)",
                 element * persistent - element * persistent // run.world_size, where_w),
            Item(Kind.GATHERED_WEIGHTS, "gathered parameters of the live layers (ZeRO-3)", 2 * element * largest)]


def share(elements: int, world: int) -> int:
    """Elements of one rank's ZeRO-3 partition of a tensor (DeepSpeed pads the tensor to a multiple of N)."""
    return -(-elements // world)


def _adapter_states(run: ResolvedRun, sh: Shapes) -> ModelStates:
    """The frozen base (partitioned at ZeRO-3) and the LoRA weights, gradients, fp32 master copy and optimizer
    state as the stage partitions them."""
    frozen = base_tensors(run, sh)
    lora = lora_numels(sh.meta, run.recipe.adapter)
    items = _base_items(run, frozen) + _lora_items(run, lora, len(lora_targets(run, sh)))
    if run.execution.zero3:
        items.append(_gathered_adapter_layers(run, frozen, lora, sh.layers))
    return ModelStates(items, sum(lora))


def _base_items(run: ResolvedRun, frozen: list[FrozenTensor]) -> list[Item]:
    """The frozen base: whole on every rank below ZeRO-3; at ZeRO-3 each rank's partition of every tensor, the
    tensors DeepSpeed keeps whole once gathered (persistence threshold: norms, small tensors; their partitions stay
    on the GPU), and the 4-bit layers' quantization constants, which bitsandbytes keeps beside the parameter,
    whole."""
    if not run.execution.zero3:
        return [whole_base_item(run, frozen)]
    world, limit = run.world_size, persistence_threshold(run.recipe.distributed)
    _, where = _placement(run)
    split = [t for t in frozen if t.elements > limit]
    whole = [t for t in frozen if t.elements <= limit]
    items = [Item(Kind.WEIGHTS, f"base weights (frozen, {base_label(run)}; norms fp32; partitioned over {world} "
                  "ranks)", sum(share(t.elements, world) * t.itemsize for t in split), where)]
    if whole:
        items.append(Item(Kind.WEIGHTS, f"base weights kept whole on every rank (ZeRO-3 persistence threshold: "
                          f"{len(whole)} tensors of <= {limit:,} elements)",
                          sum((t.elements + share(t.elements, world)) * t.itemsize for t in whole)))
    constants = sum(t.constants for t in frozen)
    if constants:
        items.append(Item(Kind.WEIGHTS, "quantization constants of the base (absmax, code tables; whole on every "
                          "rank)", constants))
    return items


def base_bytes_per_rank(run: ResolvedRun, sh: Shapes) -> int:
    """What each rank holds of an adapter run's base once the model is built, before the first step: the whole
    base, or under ZeRO-3 its partition of every tensor plus the quantization constants (a tensor DeepSpeed keeps
    whole is gathered at its first use, not before). The sharding check (trainer/model/sharding_check.py) measures
    it."""
    frozen = base_tensors(run, sh)
    if not run.execution.zero3:
        return whole_base_bytes(frozen)
    return sum(share(t.elements, run.world_size) * t.itemsize + t.constants for t in frozen)


def _lora_items(run: ResolvedRun, lora: list[int], matrices: int) -> list[Item]:
    """The LoRA weights: fp32 parameters (torch.autocast computes in bf16), whole on every rank at stages 1-2 and
    partitioned at stage 3; gradients whole at stage 1, partitioned from stage 2 (straight into the CPU partitions
    with the optimizer offloaded); DeepSpeed's own fp32 master copy and the optimizer state partitioned at every
    stage."""
    o, stage = run.recipe.optimizer, run.execution.zero_stage
    world, psi, limit = run.world_size, sum(lora), persistence_threshold(run.recipe.distributed)
    where_opt, where_w = _placement(run)
    rank = run.recipe.adapter.rank
    if stage < 3:
        items = [Item(Kind.WEIGHTS, f"LoRA parameters (rank {rank}, {matrices} matrices, fp32)", 4 * psi)]
    else:
        split, whole = [n for n in lora if n > limit], [n for n in lora if n <= limit]
        items = [Item(Kind.WEIGHTS, f"LoRA parameters (rank {rank}, {matrices} matrices, fp32, partitioned)",
                      4 * sum(share(n, world) for n in split), where_w)]
        if whole:
            items.append(Item(Kind.WEIGHTS, "LoRA parameters kept whole on every rank (ZeRO-3 persistence threshold)",
                              4 * sum(n + share(n, world) for n in whole)))
    if where_opt == "cpu" and stage >= 2:
        items.append(Item(Kind.GRADIENTS, "LoRA gradients (fp32 partition, with the offloaded optimizer)",
                          4 * psi // world, "cpu"))
    elif stage == 1:
        items.append(Item(Kind.GRADIENTS, "LoRA gradients (fp32)", 4 * psi))
    else:
        items.append(Item(Kind.GRADIENTS, "LoRA gradients (fp32, partitioned)", 4 * psi // world))
        if stage == 2 and world > 1:
            items.append(Item(Kind.GRADIENTS, "LoRA gradients (whole tensor straddling a partition boundary, worst "
                              "rank)", 4 * max(lora)))
    items.append(Item(Kind.MASTER_WEIGHTS, "LoRA fp32 master weights (DeepSpeed's copy, partitioned)",
                      4 * psi // world, where_opt))
    items.append(Item(Kind.OPTIMIZER_STATE, "LoRA optimizer state (partitioned)",
                      optimizer_bytes(o.name, [share(psi, world)], o.momentum), where_opt,
                      note=f"{o.name}, ZeRO stage {stage} over {world} ranks"))
    return items


def _gathered_adapter_layers(run: ResolvedRun, frozen: list[FrozenTensor], lora: list[int], layers: int) -> Item:
    """ZeRO-3 gathers a module's partitioned tensors whole while it computes (a decoder layer, or the embedding or
    the head alone, each in its stored dtype, LoRA in fp32) and prefetches what comes next, up to
    stage3_prefetch_bucket_size elements (counted in bf16)."""
    limit = persistence_threshold(run.recipe.distributed)
    lora_per_layer = 4 * sum(n for n in lora if n > limit) // max(layers, 1)
    units: dict[str, int] = {}
    for t in frozen:
        if t.elements > limit:
            units[layer_of(t.name)] = units.get(layer_of(t.name), 0) + t.stored
    layer_units = [size + lora_per_layer for name, size in units.items() if name.split(".")[-1].isdigit()]
    computed = max([*units.values(), *layer_units], default=0)
    bucket = 2 * prefetch_bucket_elements(run.recipe.distributed)
    prefetched = min(max(layer_units, default=0), bucket)
    return Item(Kind.GATHERED_WEIGHTS, "gathered parameters (ZeRO-3: the module computing, whole, and the "
                "prefetched next one)", computed + prefetched)


# ------------------------------------------------------------------------------------------------ transients

def step_temporaries(run: ResolvedRun, sh: Shapes, states: ModelStates) -> int:
    """DeepSpeed steps its flat partitions in place (no foreach copies of the state)."""
    return 0


def autocast_copies(run: ResolvedRun, sh: Shapes) -> int:
    """bf16/fp16 ZeRO holds the weights themselves in the compute dtype (the fp32 masters are the optimizer's), so
    nothing is cast per forward; adapter runs' frozen base is in the compute dtype already."""
    return 0


# ------------------------------------------------------------------------------------------------ disk

def checkpoint_size(run: ResolvedRun, sh: Shapes) -> CheckpointSize:
    """Every rank's fp32 master partition and optimizer state (together the whole of both, an equal share per rank),
    DeepSpeed's module file (ZeRO-1/2: the trainable weights in the training dtype; ZeRO-3: empty placeholders, the
    weights being the master partitions), and the gathered fp32 weights with checkpoint.full_weights (an adapter
    run: the adapter, always); rank 0 writes the last two."""
    trainable = model_states(run, sh).trainable
    o = run.recipe.optimizer
    shards = 4 * trainable + optimizer_bytes(o.name, [trainable], o.momentum)
    adapted = run.execution.adapted
    module = 4 if adapted or run.recipe.precision.dtype == "fp32" else 2  # LoRA weights stay fp32
    module_file = 0 if run.execution.zero3 else module * trainable
    gathered = 4 * trainable if adapted or run.full_weights else 0
    return CheckpointSize(total=shards + module_file + gathered,
                          rank0=shards // run.world_size + module_file + gathered)
