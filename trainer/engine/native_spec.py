"""What the native engine (one process, DDP, optionally optimizer state sharded by whole parameters) is, at plan
time: what it refuses in a recipe, what each rank keeps (weights, gradients, optimizer state), what a step and
autocast add, and what one of its checkpoints takes on disk. Imports no engine: validation and `plan` read this
without building anything (engine/native.py is the engine itself).
"""

from __future__ import annotations

from trainer.adapters.footprint import lora_numels, optimizer_state_bytes
from trainer.errors import KeySource, Problem
from trainer.recipe.execution import execution_of
from trainer.model.int8_weights import expected_bytes as int8_bytes
from trainer.optim.lowrank_groups import member, rank_of
from trainer.plan.frozen_base import base_tensors, whole_base_item
from trainer.plan.items import CheckpointSize, Item, Kind, ModelStates, Shapes
from trainer.plan.optimizer_state import (int8_targets, lora_targets, low_rank_state, plain_state,
                                          sharded_state_loads)
from trainer.plan.per_layer import per_layer_gradients
from trainer.plan.shapes import module_of, tied_elements
from trainer.recipe.resolved import ResolvedRun
from trainer.recipe.schema import Recipe

NAME = "native"


# ------------------------------------------------------------------------------------------------ problems

def problems(r: Recipe, src: KeySource) -> list[Problem]:
    """What the native engine refuses: in a recipe that names it (stages above 1, offload, DeepSpeed overrides),
    and in any recipe it runs (also `distributed.engine: deepspeed` at stage 0)."""
    out = _named_problems(r, src) if r.distributed.engine == NAME else []
    if execution_of(r).engine == NAME:
        out += _running_problems(r, src)
        out += _sequence_parallel_problems(r, src)
    return out


def _sequence_parallel_problems(r: Recipe, src: KeySource) -> list[Problem]:
    """Sequence parallelism runs over DeepSpeed only (its ZeRO reduction sums the sequence shards' gradients)."""
    n = r.distributed.sequence_parallel
    if n == 1:
        return []
    return [Problem("distributed.sequence_parallel", n, "sequence parallelism runs on the DeepSpeed engine: set "
                    "distributed.engine: deepspeed with distributed.zero_stage: 1, 2 or 3",
                    src("distributed.sequence_parallel"))]


def _named_problems(r: Recipe, src: KeySource) -> list[Problem]:
    d, out = r.distributed, []
    if d.zero_stage > 1:
        out.append(Problem("distributed.zero_stage", d.zero_stage, "the native engine shards optimizer state only "
                           "(zero_stage 1: each rank keeps the state of the whole parameters it owns); stages 2-3 "
                           "need distributed.engine: deepspeed", src("distributed.zero_stage")))
    if d.offload_optimizer != "none" or d.offload_params != "none":
        key = "distributed.offload_optimizer" if d.offload_optimizer != "none" else "distributed.offload_params"
        out.append(Problem(key, "cpu", "CPU offload needs distributed.engine: deepspeed", src(key)))
    if d.deepspeed_overrides:
        out.append(Problem("distributed.deepspeed_overrides", d.deepspeed_overrides, "only used with "
                           "distributed.engine: deepspeed; remove it or switch the engine",
                           src("distributed.deepspeed_overrides")))
    return out


def _running_problems(r: Recipe, src: KeySource) -> list[Problem]:
    out = []
    low = r.optimizer.low_rank
    if low is not None and low.per_layer and r.distributed.zero_stage == 1:
        section, who = r.optimizer.low_rank_key, member(r.optimizer)
        out.append(Problem(f"{section}.per_layer", True, "per-layer updates with sharded optimizer state "
                           "(distributed.zero_stage: 1) are not supported; choose one: per_layer frees gradients "
                           f"during backward, zero_stage 1 splits the {who} state across ranks",
                           src(f"{section}.per_layer")))
    if r.checkpoint.full_weights is False and r.adapter.type == "none":
        out.append(Problem("checkpoint.full_weights", False, "the native engine's checkpoint holds the weights "
                           "only in model.safetensors, which resume needs; remove it (it applies to "
                           "distributed.engine: deepspeed)", src("checkpoint.full_weights")))
    return out


# ------------------------------------------------------------------------------------------------ model states

def model_states(run: ResolvedRun, sh: Shapes) -> ModelStates:
    """Each rank's weights, gradients and optimizer state: a full model in its own dtype (fp32 master weights, or
    bf16 without them), or an adapter run's frozen base whole and its LoRA matrices in fp32."""
    if run.execution.adapted:
        return _adapter_states(run, sh)
    return ModelStates(_full_states(run, sh), sh.total)


def weight_bytes(run: ResolvedRun) -> int:
    """Bytes per element of the weights, their gradients and torch's AdamW moments (the parameters' dtype)."""
    p = run.recipe.precision
    return 2 if p.dtype != "fp32" and not p.master_weights else 4


def _full_states(run: ResolvedRun, sh: Shapes) -> list[Item]:
    o = run.recipe.optimizer
    wb = weight_bytes(run)
    items = [Item(Kind.WEIGHTS, "weights (bf16, no fp32 master)" if wb == 2 else
                  "weights (fp32 master, the model itself)", wb * sh.total)]
    int8 = int8_targets(run, sh)
    if int8:  # INT8 values and one scale (in the weights' dtype) per row
        stored = sum(p.numel for p in sh.params if p.name in int8)
        items[0].bytes -= wb * stored
        items.append(Item(Kind.WEIGHTS, f"weights (INT8 {member(o)} targets, {len(int8)} matrices, per-row scales)",
                          sum(int8_bytes(p.shape, wb) for p in sh.params if p.name in int8)))
    grads = Item(Kind.GRADIENTS, "gradients" + (" (DDP buckets; the .grad tensors are views into them)"
                                                if run.world_size > 1 else ""), wb * sh.total)
    if o.low_rank is not None:
        state, n_targets, n_rest = low_rank_state(run, sh)
        note = f"{member(o)} rank {rank_of(o)} on {n_targets} matrices, AdamW on {n_rest} other tensors"
        if o.per_layer:
            grads = per_layer_gradients(run, sh, wb)
    else:
        state, note = plain_state(run, [p.numel for p in sh.params]), o.name
    items.append(grads)
    tied = tied_elements(sh) if o.per_layer and run.grad_accum_steps == 1 else 0
    if tied:  # the head's share of a tied embedding's gradient waits in autograd until the embedding's own arrives
        items.append(Item(Kind.GRADIENTS, "gradients (the LM head's share of the tied embedding, held through "
                          "backward)", wb * tied))
    if run.sharded_native_state:
        loads = sharded_state_loads(run, sh)
        state = max(loads)
        note += (f", sharded over {run.world_size} ranks by whole parameters (largest share "
                 f"{state / max(sum(loads), 1):.0%}; per rank {', '.join(f'{x / 2**20:.1f}' for x in loads)} MiB)")
    items.append(Item(Kind.OPTIMIZER_STATE, "optimizer state", state, note=note))
    return items


def _adapter_states(run: ResolvedRun, sh: Shapes) -> ModelStates:
    """The frozen base whole on every rank; the LoRA matrices, their gradients and optimizer state in fp32."""
    a = run.recipe.adapter
    targets = lora_targets(run, sh)
    lora = lora_numels(sh.meta, a)
    items = [whole_base_item(run, base_tensors(run, sh)),
             Item(Kind.WEIGHTS, f"LoRA parameters (rank {a.rank}, {len(targets)} matrices, fp32)", 4 * sum(lora)),
             Item(Kind.GRADIENTS, "LoRA gradients (fp32)", 4 * sum(lora)),
             Item(Kind.OPTIMIZER_STATE, "LoRA optimizer state", optimizer_state_bytes(run.recipe.optimizer.name, lora),
                  note=run.recipe.optimizer.name)]
    return ModelStates(items, sum(lora))


# ------------------------------------------------------------------------------------------------ transients

def step_temporaries(run: ResolvedRun, sh: Shapes, states: ModelStates) -> int:
    """torch's foreach AdamW creates about one fp32 copy of the state it updates; the other optimizers work tensor
    by tensor (about one fp32 copy of the largest trainable tensor: for an adapter run, a LoRA matrix; for an INT8
    write, trainer/model/int8_weights.py, the new value, its ratio to the scales and the random draws, in fp32)."""
    if run.execution.adapted:
        return 4 * max((t.in_features + t.out_features) * run.recipe.adapter.rank for t in lora_targets(run, sh))
    if run.recipe.optimizer.name == "adamw":
        state = sum(i.bytes for i in states.items if i.kind is Kind.OPTIMIZER_STATE and i.where == "gpu")
        return state // 2
    per_tensor = 4 * max(p.numel for p in sh.params)
    int8 = int8_targets(run, sh)
    if not int8:
        return per_tensor
    return max(per_tensor, 3 * 4 * max(p.numel for p in sh.params if p.name in int8))


def autocast_copies(run: ResolvedRun, sh: Shapes) -> int:
    """bf16/fp16 autocast casts each fp32 linear weight once per forward and keeps it until backward. Under
    gradient checkpointing a layer's casts are dropped with its activations: only the LM head's and the
    recomputed layer's are alive. (Adapter runs' frozen base is already in the compute dtype; INT8 weights are
    dequantized inside their matmuls instead.)"""
    p = run.recipe.precision
    if p.dtype == "fp32" or run.execution.adapted or not p.master_weights:
        return 0
    int8 = int8_targets(run, sh)
    linear = [q for q in sh.params if module_of(q.name) in sh.linear_names and q.name not in int8]
    if not run.recipe.model.gradient_checkpointing:
        return 2 * sum(q.numel for q in linear)
    outside = sum(q.numel for q in linear if ".layers." not in q.name and ".h." not in q.name)
    return 2 * (outside + sum(q.numel for q in linear) // max(sh.layers, 1))


# ------------------------------------------------------------------------------------------------ disk

def checkpoint_size(run: ResolvedRun, sh: Shapes) -> CheckpointSize:
    """One checkpoint: the trainable weights in fp32 (an adapter run saves only the adapter), written by rank 0,
    and the optimizer state of every rank (DDP: rank 0's only; zero_stage 1: each rank its own partition)."""
    states = model_states(run, sh)
    state = sum(i.bytes for i in states.items if i.kind is Kind.OPTIMIZER_STATE)
    weights = 4 * states.trainable
    copies = run.world_size if run.sharded_native_state else 1
    return CheckpointSize(total=weights + state * copies, rank0=weights + state)
