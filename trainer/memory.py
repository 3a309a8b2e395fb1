"""The memory plan: what a recipe will take on each GPU, computed before launch from the real model shapes.

Nothing heavy is built: the model is instantiated on the meta device (shapes, no storage). Per rank we count:

- model states: weights (by dtype; 4-bit weights with their quantization constants), gradients, optimizer state
  (AdamW 8 B/param, 8-bit 2 B/param, GaLore or APOLLO at its rank, ZeRO-sharded over N ranks, or offloaded to
  CPU), fp32 master copies (DeepSpeed keeps bf16/fp16 weights and fp32 masters), LoRA parameters and their state
  (under DeepSpeed partitioned by stage; at ZeRO-3 the frozen base too, except the tensors DeepSpeed keeps whole
  and the 4-bit quantization constants, plus the module being computed gathered whole);
- activations saved for backward, per token and layer, measured for the Llama family (llama, mistral, qwen2)
  with autograd's saved-tensor hooks on CPU: fp32 `32h + 8kv + 16f + 4a + 8` bytes, bf16/fp16 autocast
  `30h + 4kv + 8f + 4a + 8` (h hidden, kv = kv heads x head dim, f intermediate, a heads); with gradient
  checkpointing only each layer's input (4h, the residual stream is fp32) plus one layer recomputed in full;
- logits and loss: the logits and their gradient in the compute dtype, and one chunk of fp32 work (the loss
  computes its gradient chunk by chunk in the forward pass, trainer/loss.py);
- temporary buffers: autocast's cast copies of the linear weights (2 B/param in bf16/fp16, alive from forward
  to backward) and the optimizer step's foreach temporaries (about one fp32 copy of the largest state tensors);
- INT8 weights (precision.weights: int8): 1 B per element plus a scale per row for the low-rank targets, the
  one layer dequantized inside a matmul, and the fp32 temporaries of a stochastic-rounding write;
- an allowance for the CUDA context (0.75 GiB) and allocator fragmentation (8% of the rest).

The peak is the larger of the forward/backward phase (weights, optimizer state, gradients, activations,
logits; with checkpointing the recomputed layer and the logits are not alive at once) and the optimizer-step
phase (weights, state, gradients, step temporaries), plus the allowance.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from trainer.adapters.footprint import FrozenTensor, frozen_tensors, lora_numels, optimizer_state_bytes
from trainer.adapters.quant import storage_dtype
from trainer.adapters.targets import find_targets
from trainer.data.packing import sample_mode
from trainer.loss import chunk_rows
from trainer.optim import param_groups
from trainer.int8_weights import expected_bytes as int8_bytes
from trainer.optim.lowrank_groups import lowrank_defaults, lowrank_param_groups, member, rank_of, state_cost, targets_of
from trainer.optim.per_layer import MAX_IN_FLIGHT, record_first_use
from trainer.optim.sharded import numel_cost, partition
from trainer.resolve import ResolvedRun

GiB = 2**30
CUDA_CONTEXT = int(0.75 * GiB)
FRAGMENTATION = 0.08
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's default stage3_param_persistence_threshold (elements)
DEEPSPEED_PREFETCH_BUCKET = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size (elements)
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "mixtral"}


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Shapes:
    """What the plan needs to know about the architecture."""

    model_type: str
    params: list[Param]
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    linear_names: set[str]  # module names of nn.Linear layers (LoRA / quantization targets)
    meta: Any = None  # the model on the meta device: the adapter and GaLore rules select from it

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)


@dataclass
class Item:
    """One line of the plan."""

    name: str
    bytes: int
    where: str = "gpu"  # gpu | cpu
    note: str = ""


@dataclass(frozen=True)
class CheckpointSize:
    total: int  # one checkpoint on disk, all ranks together
    rank0: int  # the part of it rank 0 writes (and fsyncs and hashes)


@dataclass
class Plan:
    world_size: int
    gpu_bytes: int
    items: list[Item]
    peak_bytes: int
    phase: str
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    parameters: int
    trainable: int
    offloaded_activations: int = 0  # model.activation_offload: per micro-batch, in pinned CPU memory
    checkpoint: CheckpointSize = CheckpointSize(total=0, rank0=0)
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_bytes


def shapes(run: ResolvedRun) -> Shapes:
    """Parameter shapes from the model built on the meta device (no memory, no weights)."""
    config = run.architecture
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=run.recipe.model.trust_remote_code)
    params = [Param(n, tuple(p.shape)) for n, p in model.named_parameters()]
    linear = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    return Shapes(config.model_type, params, hidden, inter, layers, heads, kv * head_dim, text.vocab_size, linear,
                  model)


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


# ------------------------------------------------------------------------------------------------ states

def _optimizer_bytes(name: str, numels: list[int], momentum: float) -> int:
    """State bytes of a plain (non-GaLore) optimizer over tensors of these sizes: SGD keeps one momentum
    buffer; AdamW and bitsandbytes' 8-bit AdamW follow the adapter package's accounting (fp32 moments and a
    step per tensor; 8-bit moments with blockwise absmax and code tables, fp32 under 4096 elements)."""
    if name == "sgd":
        return 4 * sum(numels) if momentum else 0
    return optimizer_state_bytes(name, numels)


def low_rank_state(run: ResolvedRun, sh: Shapes) -> tuple[int, int, int]:
    """(state bytes, target matrices, other tensors) by the family's own target rule and state accounting
    (trainer/optim/lowrank_groups.py state_cost): GaLore's fp32 projectors and projected moments (8-bit: 1 B each
    plus an fp32 absmax per block), APOLLO's seed, limiter norm and projected moments (the projection itself is
    regenerated, never stored), AdamW moments for every other tensor, a float64 step each."""
    o = run.recipe.optimizer
    targets, _ = targets_of(sh.meta, o)
    defaults = lowrank_defaults(o)
    total = 0
    for p in sh.meta.parameters():
        total += state_cost(p, {**defaults, "rank": rank_of(o) if p in targets else None})
    return total, len(targets), sum(1 for _ in sh.meta.parameters()) - len(targets)


def int8_targets(run: ResolvedRun, sh: Shapes) -> set[str]:
    """Names of the weights stored in INT8 (precision.weights: int8): the low-rank optimizer's targets."""
    if run.recipe.precision.weights != "int8":
        return set()
    targets, _ = targets_of(sh.meta, run.recipe.optimizer)
    return set(targets.values())


def lora_targets(run: ResolvedRun, sh: Shapes) -> list[Any]:
    """The linear layers LoRA adapts, by the adapter package's own rule."""
    return find_targets(sh.meta, run.recipe.adapter.target_modules)


def model_states(run: ResolvedRun, sh: Shapes) -> tuple[list[Item], int]:
    """(items, trainable parameter count) for weights, gradients, optimizer state and master copies."""
    if run.recipe.adapter.type != "none":
        return _adapter_states(run, sh)
    d = run.recipe.distributed
    if d.engine == "deepspeed" and d.zero_stage >= 1:
        return _zero_states(run, sh), sh.total
    return _native_states(run, sh), sh.total


def _plain_state(run: ResolvedRun, numels: list[int]) -> int:
    """State of a non-GaLore optimizer; torch's AdamW and SGD keep it in the parameters' dtype."""
    o, p = run.recipe.optimizer, run.recipe.precision
    state = _optimizer_bytes(o.name, numels, o.momentum)
    if p.dtype != "fp32" and not p.master_weights and o.name in ("adamw", "sgd"):
        state //= 2
    return state


def sharded_state_loads(run: ResolvedRun, sh: Shapes) -> list[int]:
    """Optimizer-state bytes of each rank under native zero_stage 1, by the sharded optimizer's own partition
    (trainer/optim/sharded.py: whole parameters, GaLore balanced by state bytes, the others by size), built
    from the same parameter groups in the same order on the meta model."""
    world = run.world_size
    o = run.recipe.optimizer
    if o.low_rank is not None:
        groups, _ = lowrank_param_groups(sh.meta, o, announce=False)
        defaults = lowrank_defaults(o)
        flat = [(p, {**defaults, **g}) for g in groups for p in g["params"]]
        costs = [state_cost(p, g) for p, g in flat]
        owners = partition(costs, world)
        return [sum(c for c, r in zip(costs, owners) if r == rank) for rank in range(world)]
    flat = [(p, g) for g in param_groups(sh.meta, o.weight_decay) for p in g["params"]]
    owners = partition([numel_cost(p, g) for p, g in flat], world)
    return [_plain_state(run, [p.numel() for (p, _), r in zip(flat, owners) if r == rank]) for rank in range(world)]


def _per_layer_gradients(run: ResolvedRun, sh: Shapes, wb: int) -> Item:
    """Gradient memory with per-layer updates (trainer/optim/per_layer.py). Without accumulation a gradient
    lives from its hook to its update: one tensor in one process; under DDP the reductions in flight (at most
    MAX_IN_FLIGHT, full size on refresh steps) and the one arriving. With accumulation the gradients of a GaLore
    refresh step (1 in update_gap) build up at full size, since the SVD needs the summed gradient: that step
    is the peak; APOLLO's always do (its update scales the raw summed gradient)."""
    world = run.world_size
    o = run.recipe.optimizer
    if run.grad_accum_steps > 1:
        when = "on every step (APOLLO scales the raw gradient)" if o.name.startswith("apollo") else \
            f"on refresh steps: 1 in {o.galore.update_gap}"
        return Item(f"gradients (per-layer updates, accumulated at full size {when})", wb * sh.total)
    if world == 1:
        return Item("gradients (per-layer updates: one tensor at a time, the largest)",
                    wb * max(p.numel for p in sh.params))
    size = {p.name: p.numel for p in sh.params}
    order = [size[n] for n in reduction_order(sh)]
    live = MAX_IN_FLIGHT + 1  # the reductions in flight and the gradient arriving
    window = max(sum(order[i:i + live]) for i in range(max(1, len(order) - live + 1)))
    return Item(f"gradients (per-layer updates: {MAX_IN_FLIGHT} in all-reduce + 1 arriving, refresh step)",
                wb * window)


def reduction_order(sh: Shapes) -> list[str]:
    """Parameter names in the order per-layer updates reduce them under DDP: the reverse of their first use in
    the forward, which the engine records from its first forward (optim/per_layer.py record_first_use). Here
    it comes from one forward of a narrow copy of the model on CPU (same modules and layer count, widths of a
    few units); if that copy cannot be built, from the reverse of the registration order."""
    names = [p.name for p in sh.params]
    narrow = copy.deepcopy(sh.meta.config)
    text = narrow.get_text_config() if hasattr(narrow, "get_text_config") else narrow
    small = {"hidden_size": 4 * sh.heads, "n_embd": 4 * sh.heads, "head_dim": 4, "intermediate_size": 8,
             "n_inner": 8, "moe_intermediate_size": 8, "vocab_size": 32}
    for key, value in small.items():
        if getattr(text, key, None) is not None:
            setattr(text, key, value)
    used: dict[Any, None] = {}
    try:  # the random init draws from a forked RNG: planning never moves the run's random streams
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = AutoModelForCausalLM.from_config(narrow)
            record_first_use(model, used)
            model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    except Exception:  # noqa: BLE001  an architecture that does not shrink: registration order, reversed
        return names[::-1]
    by_param = {p: n for n, p in model.named_parameters()}
    first = [by_param[p] for p in used if p in by_param]
    seen = set(first)
    return first[::-1] + [n for n in names[::-1] if n not in seen]


def _tied(sh: Shapes) -> int:
    """Elements of the input embedding when the LM head shares it (0 when untied)."""
    head, embed = sh.meta.get_output_embeddings(), sh.meta.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return 0
    return embed.weight.numel()


def _native_states(run: ResolvedRun, sh: Shapes) -> list[Item]:
    world = run.world_size
    o = run.recipe.optimizer
    shard = world if run.recipe.distributed.zero_stage >= 1 else 1  # native ZeRO-1: state split by whole parameters
    half = run.recipe.precision.dtype != "fp32" and not run.recipe.precision.master_weights
    wb = 2 if half else 4  # weights, their gradients and torch's AdamW moments share the parameters' dtype
    items = [Item("weights (bf16, no fp32 master)" if half else "weights (fp32 master, the model itself)",
                  wb * sh.total)]
    int8 = int8_targets(run, sh)
    if int8:  # INT8 values and one scale (in the weights' dtype) per row
        stored = sum(p.numel for p in sh.params if p.name in int8)
        items[0].bytes -= wb * stored
        items.append(Item(f"weights (INT8 {member(o)} targets, {len(int8)} matrices, per-row scales)",
                          sum(int8_bytes(p.shape, wb) for p in sh.params if p.name in int8)))
    grads = Item("gradients" + (" (DDP buckets; the .grad tensors are views into them)" if world > 1 else ""),
                 wb * sh.total)
    if o.low_rank is not None:
        state, n_targets, n_rest = low_rank_state(run, sh)
        note = f"{member(o)} rank {rank_of(o)} on {n_targets} matrices, AdamW on {n_rest} other tensors"
        if o.per_layer:
            grads = _per_layer_gradients(run, sh, wb)
    else:
        state, note = _plain_state(run, [p.numel for p in sh.params]), o.name
    items.append(grads)
    tied = _tied(sh) if o.per_layer and run.grad_accum_steps == 1 else 0
    if tied:  # the head's share of a tied embedding's gradient waits in autograd until the embedding's own arrives
        items.append(Item("gradients (the LM head's share of the tied embedding, held through backward)", wb * tied))
    if shard > 1:
        loads = sharded_state_loads(run, sh)
        state = max(loads)
        note += (f", sharded over {shard} ranks by whole parameters (largest share "
                 f"{state / max(sum(loads), 1):.0%}; per rank {', '.join(f'{x / 2**20:.1f}' for x in loads)} MiB)")
    items.append(Item("optimizer state", state, note=note))
    return items


def _zero_states(run: ResolvedRun, sh: Shapes) -> list[Item]:
    """ZeRO (Rajbhandari et al.): 2 + 2 + 12 bytes per parameter in bf16/fp16, partitioned by stage."""
    world = run.world_size
    d, psi = run.recipe.distributed, sh.total
    half = run.recipe.precision.dtype != "fp32"
    wbytes, gbytes = (2, 2) if half else (4, 4)
    w_shard = world if d.zero_stage >= 3 else 1
    g_shard = world if d.zero_stage >= 2 else 1
    where_opt = "cpu" if d.offload_optimizer == "cpu" else "gpu"
    where_w = "cpu" if d.offload_params == "cpu" else "gpu"
    items = [Item(f"weights ({'bf16/fp16' if half else 'fp32'}{', partitioned' if w_shard > 1 else ''})",
                  wbytes * psi // w_shard, where_w)]
    if where_opt == "cpu" and d.zero_stage >= 2:  # reduced straight into fp32 partitions beside the optimizer
        items.append(Item("gradients (fp32 partition, with the offloaded optimizer)", 4 * psi // world, "cpu"))
    else:
        items.append(Item(f"gradients{' (partitioned)' if g_shard > 1 else ''}", gbytes * psi // g_shard))
        if d.zero_stage == 2 and world > 1:  # a parameter crossing a partition boundary keeps its whole gradient
            items.append(Item("gradients (whole tensor straddling a partition boundary, worst rank)",
                              gbytes * max(p.numel for p in sh.params)))
    if half:
        items.append(Item("fp32 master weights (partitioned)", 4 * psi // world, where_opt))
    items.append(Item("optimizer state (Adam moments, partitioned)", 8 * psi // world, where_opt,
                      note=f"ZeRO stage {d.zero_stage} over {world} ranks"))
    if d.zero_stage >= 3:
        # DeepSpeed keeps tensors up to stage3_param_persistence_threshold elements whole on every rank
        persistent = sum(p.numel for p in sh.params if p.numel <= persistence_threshold(run))
        items.append(Item("weights kept whole on every rank (ZeRO-3 persistence threshold: norms, biases)",
                          wbytes * persistent - wbytes * persistent // world, where_w))
        largest_layer = _largest_layer_params(sh)
        items.append(Item("gathered parameters of the live layers (ZeRO-3)", 2 * wbytes * largest_layer))
    return items


def persistence_threshold(run: ResolvedRun) -> int:
    """ZeRO-3 keeps a tensor of at most this many elements whole on every rank once it has been gathered:
    stage3_param_persistence_threshold, DeepSpeed's default unless distributed.deepspeed_overrides sets it."""
    zero = run.recipe.distributed.deepspeed_overrides.get("zero_optimization") or {}
    return int(zero.get("stage3_param_persistence_threshold", DEEPSPEED_PERSISTENCE_THRESHOLD))


def _layer_of(name: str) -> str:
    """The decoder layer a parameter belongs to ('model.layers.3'), or the parameter itself outside the layers."""
    parts = name.split(".")
    if "layers" in parts:
        at = parts.index("layers")
        return ".".join(parts[:at + 2])
    return name


def _largest_layer(sizes: list[tuple[str, int]]) -> int:
    """The largest sum of `sizes` over the parameters of one decoder layer."""
    per: dict[str, int] = {}
    for name, size in sizes:
        per[_layer_of(name)] = per.get(_layer_of(name), 0) + size
    return max(per.values())


def _largest_layer_params(sh: Shapes) -> int:
    return _largest_layer([(p.name, p.numel) for p in sh.params])


def _adapter_states(run: ResolvedRun, sh: Shapes) -> tuple[list[Item], int]:
    """The adapter package's own accounting (trainer/adapters/footprint.py): quantized or frozen base in the
    precision dtype (norms fp32), LoRA matrices, their gradients and optimizer state in fp32; under DeepSpeed the
    LoRA state partitioned by stage and, at ZeRO-3, the base partitioned too."""
    a, d = run.recipe.adapter, run.recipe.distributed
    targets = lora_targets(run, sh)
    lora = lora_numels(sh.meta, a)
    zero = d.engine == "deepspeed" and d.zero_stage >= 1
    frozen = base_tensors(run, sh)
    items = _base_items(run, frozen)
    if zero:
        items += _zero_lora_items(run, lora, len(targets))
    else:
        items += [Item(f"LoRA parameters (rank {a.rank}, {len(targets)} matrices, fp32)", 4 * sum(lora)),
                  Item("LoRA gradients (fp32)", 4 * sum(lora)),
                  Item("LoRA optimizer state", optimizer_state_bytes(run.recipe.optimizer.name, lora),
                       note=run.recipe.optimizer.name)]
    if zero and d.zero_stage == 3:
        items.append(_gathered_adapter_layers(run, frozen, lora, sh.layers))
    return items, sum(lora)


def _zero3(run: ResolvedRun) -> bool:
    d = run.recipe.distributed
    return d.engine == "deepspeed" and d.zero_stage == 3


def base_tensors(run: ResolvedRun, sh: Shapes) -> list[FrozenTensor]:
    """The frozen tensors of an adapter run's base as this run stores them (4-bit codes in their storage dtype)."""
    a = run.recipe.adapter
    return frozen_tensors(sh.meta, a, run.recipe.precision.dtype, storage_dtype(a.quant, zero3=_zero3(run)))


def _share(elements: int, world: int) -> int:
    """Elements of one rank's ZeRO-3 partition of a tensor (DeepSpeed pads the tensor to a multiple of N)."""
    return -(-elements // world)


def _base_label(run: ResolvedRun) -> str:
    a = run.recipe.adapter
    if a.type == "qlora" and a.quant.type != "int8":
        return "4-bit " + a.quant.type + (" with double quant" if a.quant.double_quant else "")
    return "int8" if a.type == "qlora" else run.recipe.precision.dtype


def _base_items(run: ResolvedRun, frozen: list[FrozenTensor]) -> list[Item]:
    """The frozen base: whole on every rank, or under ZeRO-3 each rank's partition of every tensor, the tensors
    DeepSpeed keeps whole once gathered (persistence threshold: norms, small tensors; their partitions stay on the
    GPU), and the 4-bit layers' quantization constants, which bitsandbytes keeps beside the parameter, whole."""
    label = _base_label(run)
    if not _zero3(run):
        return [Item(f"base weights (frozen, {label}; norms fp32)", sum(t.stored + t.constants for t in frozen))]
    world, limit = run.world_size, persistence_threshold(run)
    where = "cpu" if run.recipe.distributed.offload_params == "cpu" else "gpu"
    split = [t for t in frozen if t.elements > limit]
    whole = [t for t in frozen if t.elements <= limit]
    items = [Item(f"base weights (frozen, {label}; norms fp32; partitioned over {world} ranks)",
                  sum(_share(t.elements, world) * t.itemsize for t in split), where)]
    if whole:
        items.append(Item(f"base weights kept whole on every rank (ZeRO-3 persistence threshold: {len(whole)} "
                          f"tensors of <= {limit:,} elements)",
                          sum((t.elements + _share(t.elements, world)) * t.itemsize for t in whole)))
    constants = sum(t.constants for t in frozen)
    if constants:
        items.append(Item("quantization constants of the base (absmax, code tables; whole on every rank)",
                          constants))
    return items


def base_bytes_per_rank(run: ResolvedRun, sh: Shapes) -> int:
    """What each rank holds of an adapter run's base once the model is built, before the first step: the whole
    base, or under ZeRO-3 its partition of every tensor plus the quantization constants (a tensor DeepSpeed keeps
    whole is gathered at its first use, not before). The sharding check (trainer/sharding_check.py) measures it."""
    frozen = base_tensors(run, sh)
    if not _zero3(run):
        return sum(t.stored + t.constants for t in frozen)
    world = run.world_size
    return sum(_share(t.elements, world) * t.itemsize + t.constants for t in frozen)


def _zero_lora_items(run: ResolvedRun, lora: list[int], matrices: int) -> list[Item]:
    """The LoRA weights under DeepSpeed: fp32 parameters (torch.autocast computes in bf16), whole on every rank at
    stages 1-2 and partitioned at stage 3; gradients whole at stage 1, partitioned from stage 2 (straight into the
    CPU partitions with the optimizer offloaded); DeepSpeed's own fp32 master copy and the optimizer state
    partitioned at every stage."""
    d, o = run.recipe.distributed, run.recipe.optimizer
    world, psi, limit = run.world_size, sum(lora), persistence_threshold(run)
    where_opt = "cpu" if d.offload_optimizer == "cpu" else "gpu"
    where_w = "cpu" if d.offload_params == "cpu" else "gpu"
    rank = run.recipe.adapter.rank
    if d.zero_stage < 3:
        items = [Item(f"LoRA parameters (rank {rank}, {matrices} matrices, fp32)", 4 * psi)]
    else:
        split, whole = [n for n in lora if n > limit], [n for n in lora if n <= limit]
        items = [Item(f"LoRA parameters (rank {rank}, {matrices} matrices, fp32, partitioned)",
                      4 * sum(_share(n, world) for n in split), where_w)]
        if whole:
            items.append(Item("LoRA parameters kept whole on every rank (ZeRO-3 persistence threshold)",
                              4 * sum(n + _share(n, world) for n in whole)))
    if where_opt == "cpu" and d.zero_stage >= 2:
        items.append(Item("LoRA gradients (fp32 partition, with the offloaded optimizer)", 4 * psi // world, "cpu"))
    elif d.zero_stage == 1:
        items.append(Item("LoRA gradients (fp32)", 4 * psi))
    else:
        items.append(Item("LoRA gradients (fp32, partitioned)", 4 * psi // world))
        if d.zero_stage == 2 and world > 1:
            items.append(Item("LoRA gradients (whole tensor straddling a partition boundary, worst rank)",
                              4 * max(lora)))
    items.append(Item("LoRA fp32 master weights (DeepSpeed's copy, partitioned)", 4 * psi // world, where_opt))
    items.append(Item("LoRA optimizer state (partitioned)", _optimizer_bytes(o.name, [_share(psi, world)],
                                                                            o.momentum), where_opt,
                      note=f"{o.name}, ZeRO stage {d.zero_stage} over {world} ranks"))
    return items


def _gathered_adapter_layers(run: ResolvedRun, frozen: list[FrozenTensor], lora: list[int], layers: int) -> Item:
    """ZeRO-3 gathers a module's partitioned tensors whole while it computes (a decoder layer, or the embedding or
    the head alone, each in its stored dtype, LoRA in fp32) and prefetches what comes next, up to
    stage3_prefetch_bucket_size elements (DeepSpeed's default 5e7; counted in bf16)."""
    limit = persistence_threshold(run)
    lora_per_layer = 4 * sum(n for n in lora if n > limit) // max(layers, 1)
    units: dict[str, int] = {}
    for t in frozen:
        if t.elements > limit:
            units[_layer_of(t.name)] = units.get(_layer_of(t.name), 0) + t.stored
    layer_units = [size + lora_per_layer for name, size in units.items() if name.split(".")[-1].isdigit()]
    computed = max([*units.values(), *layer_units], default=0)
    zero = run.recipe.distributed.deepspeed_overrides.get("zero_optimization") or {}
    bucket = 2 * int(zero.get("stage3_prefetch_bucket_size", DEEPSPEED_PREFETCH_BUCKET))
    prefetched = min(max(layer_units, default=0), bucket)
    return Item("gathered parameters (ZeRO-3: the module computing, whole, and the prefetched next one)",
                computed + prefetched)


def checkpoint_size(run: ResolvedRun, sh: Shapes) -> CheckpointSize:
    """About what one checkpoint of this run takes on disk. The native engine: the trainable weights in fp32 (an
    adapter run saves only the adapter), written by rank 0, and the optimizer state of every rank (DDP: rank 0's
    only; zero_stage 1: each rank's own partition). DeepSpeed: see zero_checkpoint_size."""
    d = run.recipe.distributed
    if d.engine == "deepspeed" and d.zero_stage >= 1:
        return zero_checkpoint_size(run, sh)
    items, trainable = model_states(run, sh)
    state = sum(i.bytes for i in items if "optimizer state" in i.name)  # the weights item is the model itself
    sharded = d.zero_stage == 1 and run.world_size > 1
    return CheckpointSize(total=4 * trainable + state * (run.world_size if sharded else 1),
                          rank0=4 * trainable + state)


def zero_checkpoint_size(run: ResolvedRun, sh: Shapes) -> CheckpointSize:
    """A DeepSpeed checkpoint: every rank's fp32 master partition and optimizer state (together the whole of
    both, an equal share per rank), DeepSpeed's module file (ZeRO-1/2: the trainable weights in the training dtype;
    ZeRO-3: empty placeholders, the weights being the master partitions), and the gathered fp32 weights with
    checkpoint.full_weights (an adapter run: the adapter, always); rank 0 writes the last two."""
    _, trainable = model_states(run, sh)
    o = run.recipe.optimizer
    shards = 4 * trainable + _optimizer_bytes(o.name, [trainable], o.momentum)
    adapted = run.recipe.adapter.type != "none"
    module = 4 if adapted or run.recipe.precision.dtype == "fp32" else 2  # LoRA weights stay fp32
    module_file = 0 if run.recipe.distributed.zero_stage == 3 else module * trainable
    gathered = 4 * trainable if adapted or run.full_weights else 0
    return CheckpointSize(total=shards + module_file + gathered,
                          rank0=shards // run.world_size + module_file + gathered)


# ------------------------------------------------------------------------------------------- activations

def layer_bytes_per_token(run: ResolvedRun, sh: Shapes) -> int:
    """Bytes one decoder layer saves for backward per token (measured formula, see the module docstring)."""
    h, kv, f, a = sh.hidden, sh.kv_dim, sh.intermediate, sh.heads
    if run.recipe.precision.dtype == "fp32":
        per = 32 * h + 8 * kv + 16 * f + 4 * a + 8
    else:
        per = 30 * h + 4 * kv + 8 * f + 4 * a + 8
    if sh.model_type not in LLAMA_LIKE:  # GPT-2 style: LayerNorm and GELU keep a little more; approximate
        per = int(per * 1.15)
    if run.recipe.adapter.type != "none":  # LoRA: the A projection's output (rank r) per adapted matrix
        per += 4 * run.recipe.adapter.rank * len(lora_targets(run, sh)) // max(sh.layers, 1)
    return per


def activation_bytes(run: ResolvedRun, sh: Shapes, checkpointing: bool) -> int:
    """Saved activations of one micro-batch (forward to the start of backward)."""
    tokens = run.recipe.train.micro_batch_size * run.recipe.data.seq_len
    per_layer = layer_bytes_per_token(run, sh)
    # the final norm (its fp32 input and scale) and the LM head's input (fp32, or the bf16/fp16 cast)
    outside = (12 if run.recipe.precision.dtype == "fp32" else 10) * sh.hidden + 12
    if checkpointing:  # each layer's input is kept (fp32 residual stream); one layer is recomputed at a time
        return tokens * (sh.layers * 4 * sh.hidden + per_layer + outside)
    return tokens * (sh.layers * per_layer + outside)


def offloaded_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """What model.activation_offload moves to host memory per micro-batch (trainer/activation_offload.py): every
    saved activation, or with checkpointing each layer's input and what the final norm and the LM head keep (the
    recomputed layer stays on the GPU)."""
    if not run.recipe.model.activation_offload:
        return 0
    tokens = run.recipe.train.micro_batch_size * run.recipe.data.seq_len
    if run.recipe.model.gradient_checkpointing:
        return activation_bytes(run, sh, True) - tokens * layer_bytes_per_token(run, sh)
    return activation_bytes(run, sh, False)


def offload_window_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """What offloading leaves on the GPU at a time: the layer whose saved tensors backward is using and the one
    prefetched ahead of it (in the forward, at most as much is in flight to the host)."""
    tokens = run.recipe.train.micro_batch_size * run.recipe.data.seq_len
    per_layer = 4 * sh.hidden if run.recipe.model.gradient_checkpointing else layer_bytes_per_token(run, sh)
    return 2 * tokens * per_layer


def forward_backward_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """What one micro-batch's forward and backward add at their peak on top of the model states (autocast copies
    apart). Without checkpointing, every saved activation and the logits coexist at the end of the forward. With
    it, the end of the forward holds each layer's input and the logits; the one recomputed layer exists only in
    backward, after the logits' gradient has been consumed by the head: the larger of the two counts. Offloaded
    activations are replaced by the two layers' worth in flight."""
    checkpointing = run.recipe.model.gradient_checkpointing
    saved, logits = activation_bytes(run, sh, checkpointing), logits_bytes(run, sh)
    if run.recipe.model.activation_offload:
        saved += offload_window_bytes(run, sh) - offloaded_bytes(run, sh)
    saved += packed_mask_bytes(run)
    if not checkpointing:
        return saved + logits
    recomputed = run.recipe.train.micro_batch_size * run.recipe.data.seq_len * layer_bytes_per_token(run, sh)
    return saved - recomputed + max(recomputed, logits)


def packed_mask_bytes(run: ResolvedRun) -> int:
    """Packed rows whose attention stays inside each example (isolated packing, document_mask): sdpa and eager get
    a block-diagonal mask of seq_len x seq_len per row (bool for sdpa, the compute dtype for eager);
    FlashAttention-2 takes the sequence boundaries instead and needs none."""
    d, attention = run.recipe.data, run.recipe.model.attn_implementation or "sdpa"
    formats = {e.format or d.format for e in d.sources} if d.sources else {d.format}
    confined = any(sample_mode(f, d.packing, d.document_mask) in (("isolated", False), ("concat", True))
                   for f in formats)
    if not confined or attention.startswith("flash"):
        return 0
    per_entry = 1 if attention == "sdpa" else (4 if run.recipe.precision.dtype == "fp32" else 2)
    return run.recipe.train.micro_batch_size * d.seq_len * d.seq_len * per_entry


def packing_label(run: ResolvedRun) -> str:
    """How the plan's micro-batch of seq_len tokens is filled."""
    d = run.recipe.data
    formats = {e.format or d.format for e in d.sources} if d.sources else {d.format}
    modes = {sample_mode(f, d.packing, d.document_mask)[0] for f in formats}
    if modes == {"none"}:
        return "padded rows: at most"
    return "packed: no padding" if "isolated" in modes else "packed"


def logits_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """The logits and their gradient in the compute dtype, plus one chunk of the loss's fp32 work (the softmax,
    and an fp32 copy when the logits are bf16/fp16): trainer/loss.py never copies the whole logits to fp32."""
    tokens = run.recipe.train.micro_batch_size * run.recipe.data.seq_len
    compute = 4 if run.recipe.precision.dtype == "fp32" else 2
    chunk = min(tokens, chunk_rows(sh.vocab)) * sh.vocab
    return 2 * compute * tokens * sh.vocab + (4 if compute == 4 else 8) * chunk


def _step_temporaries(run: ResolvedRun, items: list[Item], sh: Shapes) -> int:
    """torch's foreach AdamW creates about one fp32 copy of the state it updates; the other optimizers work
    tensor by tensor (about one fp32 copy of the largest trainable tensor: for an adapter run, a LoRA matrix)."""
    if run.recipe.distributed.engine == "deepspeed" and run.recipe.distributed.zero_stage >= 1:
        return 0
    if run.recipe.adapter.type != "none":
        return 4 * max((t.in_features + t.out_features) * run.recipe.adapter.rank for t in lora_targets(run, sh))
    if run.recipe.optimizer.name == "adamw":
        state = sum(i.bytes for i in items if i.name.endswith("optimizer state") and i.where == "gpu")
        return state // 2
    per_tensor = 4 * max(p.numel for p in sh.params)
    int8 = int8_targets(run, sh)
    if not int8:
        return per_tensor
    # an INT8 write (trainer/int8_weights.py): the new value, its ratio to the scales and the random draws, fp32
    return max(per_tensor, 3 * 4 * max(p.numel for p in sh.params if p.name in int8))


def dequantized_in_flight(run: ResolvedRun, sh: Shapes) -> int:
    """INT8 weights are dequantized inside each matmul of the forward and backward: one copy of a layer in the
    compute dtype at a time (the largest target), never saved for backward."""
    int8 = int8_targets(run, sh)
    if not int8:
        return 0
    compute = 4 if run.recipe.precision.dtype == "fp32" else 2
    return compute * max(p.numel for p in sh.params if p.name in int8)


def _autocast_copies(run: ResolvedRun, sh: Shapes, trainable_full: bool) -> int:
    """bf16/fp16 autocast casts each fp32 linear weight once per forward and keeps it until backward. Under
    gradient checkpointing a layer's casts are dropped with its activations: only the LM head's and the
    recomputed layer's are alive."""
    if run.recipe.precision.dtype == "fp32" or not trainable_full or run.recipe.distributed.engine == "deepspeed" \
            or not run.recipe.precision.master_weights:
        return 0
    int8 = int8_targets(run, sh)  # dequantized inside their matmuls instead (dequantized_in_flight)
    linear = [p for p in sh.params if _module_of(p.name) in sh.linear_names and p.name not in int8]
    if not run.recipe.model.gradient_checkpointing:
        return 2 * sum(p.numel for p in linear)
    outside = sum(p.numel for p in linear if ".layers." not in p.name and ".h." not in p.name)
    return 2 * (outside + sum(p.numel for p in linear) // max(sh.layers, 1))


def plan(run: ResolvedRun, gpu_bytes: int = 24 * GiB, sh: Shapes | None = None) -> Plan:
    """The plan of one resolved recipe (at its world size), against a GPU of gpu_bytes."""
    sh = sh or shapes(run)
    items, trainable = model_states(run, sh)
    states = sum(i.bytes for i in items if i.where == "gpu")
    with_gc, without_gc = activation_bytes(run, sh, True), activation_bytes(run, sh, False)
    m = run.recipe.model
    act = with_gc if m.gradient_checkpointing else without_gc
    moved = offloaded_bytes(run, sh)
    tokens = f"{run.recipe.train.micro_batch_size} x {run.recipe.data.seq_len} tokens, {packing_label(run)}"
    if moved:
        items.append(Item(f"activations on the GPU ({tokens}, {'with' if m.gradient_checkpointing else 'without'}"
                          " checkpointing, offloaded)", act - moved + offload_window_bytes(run, sh),
                          note="two layers' worth in flight"))
        items.append(Item("activations offloaded to pinned CPU memory", moved, where="cpu"))
    else:
        items.append(Item(f"activations ({tokens}, {'with' if m.gradient_checkpointing else 'without'} "
                          "checkpointing)", act))
    mask = packed_mask_bytes(run)
    if mask:
        items.append(Item("block-diagonal attention masks of packed rows", mask,
                          note=f"{m.attn_implementation or 'sdpa'}; none with flash_attention_2"))
    items.append(Item("logits and loss (logits, their gradient, one fp32 chunk)", logits_bytes(run, sh)))
    casts = _autocast_copies(run, sh, run.recipe.adapter.type == "none")
    if casts:
        items.append(Item(f"{run.recipe.precision.dtype} cast copies of the weights (autocast)", casts))
    dequantized = dequantized_in_flight(run, sh)
    if dequantized:
        items.append(Item("INT8 layer dequantized in flight (inside one matmul)", dequantized))
    temp = _step_temporaries(run, items, sh)
    # per-layer updates run the optimizer inside backward, while the activations are alive
    inside = run.recipe.optimizer.per_layer
    forward = states + forward_backward_bytes(run, sh) + casts + dequantized + (temp if inside else 0)
    step = states + temp
    base = max(forward, step)
    items.append(Item("optimizer step temporaries", temp, note="inside backward (per-layer updates)" if inside
                      else "counted in the step phase only"))
    allowance = CUDA_CONTEXT + int(FRAGMENTATION * base)
    items.append(Item("CUDA context and allocator fragmentation", allowance,
                      note=f"{CUDA_CONTEXT / GiB:.2f} GiB context + {FRAGMENTATION:.0%} of the rest"))
    return Plan(run.world_size, gpu_bytes, items, base + allowance, "forward/backward" if forward >= step else
                "optimizer step", without_gc, with_gc, sh.total, trainable, moved,
                checkpoint=checkpoint_size(run, sh))
