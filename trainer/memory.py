"""The memory plan: what a recipe will take on each GPU, computed before launch from the real model shapes.

Nothing heavy is built: the model is instantiated on the meta device (shapes, no storage). Per rank we count:

- model states: weights (by dtype; 4-bit weights with their quantization constants), gradients, optimizer state
  (AdamW 8 B/param, 8-bit 2 B/param, GaLore or APOLLO at its rank, ZeRO-sharded over N ranks, or offloaded to
  CPU),
  fp32 master copies (DeepSpeed keeps bf16/fp16 weights and fp32 masters), LoRA parameters and their state;
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

from trainer.adapters.footprint import optimizer_state_bytes, predicted
from trainer.adapters.targets import find_targets, lora_param_count
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
        # DeepSpeed keeps tensors under stage3_param_persistence_threshold (1e5 elements) whole on every rank
        persistent = sum(p.numel for p in sh.params if p.numel < 100_000)
        items.append(Item("weights kept whole on every rank (ZeRO-3 persistence threshold: norms, biases)",
                          wbytes * persistent - wbytes * persistent // world, where_w))
        largest_layer = _largest_layer_params(sh)
        items.append(Item("gathered parameters of the live layers (ZeRO-3)", 2 * wbytes * largest_layer))
    return items


def _largest_layer_params(sh: Shapes) -> int:
    per: dict[str, int] = {}
    for p in sh.params:
        parts = p.name.split(".")
        key = ".".join(parts[:3]) if "layers" in parts else p.name
        per[key] = per.get(key, 0) + p.numel
    return max(per.values())


def _adapter_states(run: ResolvedRun, sh: Shapes) -> tuple[list[Item], int]:
    """The adapter package's own accounting (trainer/adapters/footprint.py): quantized or frozen base in the
    precision dtype (norms fp32), LoRA matrices, their gradients and optimizer state in fp32."""
    a = run.recipe.adapter
    targets = lora_targets(run, sh)
    lora = lora_param_count(targets, a.rank, a.use_dora)
    states = predicted(sh.meta, a, run.recipe.precision.dtype, run.recipe.optimizer.name)
    if a.type == "qlora" and a.quant.type != "int8":
        base = "4-bit " + a.quant.type + (" with double quant" if a.quant.double_quant else "")
    else:
        base = "int8" if a.type == "qlora" else run.recipe.precision.dtype
    items = [Item(f"base weights (frozen, {base}; norms fp32)", states["weights"] - 4 * lora),
             Item(f"LoRA parameters (rank {a.rank}, {len(targets)} matrices, fp32)", 4 * lora),
             Item("LoRA gradients (fp32)", states["grads"]),
             Item("LoRA optimizer state", states["optimizer"], note=run.recipe.optimizer.name)]
    return items, lora


def checkpoint_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """About what one checkpoint of this run takes on disk, all ranks together: the trainable weights in fp32 (an
    adapter run saves only the adapter) and the optimizer state of every rank; DeepSpeed adds its own shards of the
    weights beside our gathered copy."""
    items, trainable = model_states(run, sh)
    state = sum(i.bytes for i in items if "optimizer state" in i.name or i.name.startswith("fp32 master"))
    d = run.recipe.distributed
    sharded = (d.engine == "deepspeed" and d.zero_stage >= 1) or (d.zero_stage == 1 and run.world_size > 1)
    weights = 4 * trainable * (2 if d.engine == "deepspeed" and d.zero_stage >= 1 else 1)
    return weights + state * (run.world_size if sharded else 1)


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
    outside = 12 * sh.hidden + 12  # final norm and the LM head's input
    if checkpointing:  # each layer's input is kept (fp32 residual stream); one layer is recomputed at a time
        return tokens * (sh.layers * 4 * sh.hidden + per_layer + outside)
    return tokens * (sh.layers * per_layer + outside)


def forward_backward_bytes(run: ResolvedRun, sh: Shapes) -> int:
    """What one micro-batch's forward and backward add at their peak on top of the model states (autocast copies
    apart). Without checkpointing, every saved activation and the logits coexist at the end of the forward. With
    it, the end of the forward holds each layer's input and the logits; the one recomputed layer exists only in
    backward, after the logits' gradient has been consumed by the head: the larger of the two counts."""
    checkpointing = run.recipe.model.gradient_checkpointing
    saved, logits = activation_bytes(run, sh, checkpointing), logits_bytes(run, sh)
    if not checkpointing:
        return saved + logits
    recomputed = run.recipe.train.micro_batch_size * run.recipe.data.seq_len * layer_bytes_per_token(run, sh)
    return saved - recomputed + max(recomputed, logits)


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
    act = with_gc if run.recipe.model.gradient_checkpointing else without_gc
    items.append(Item(f"activations ({run.recipe.train.micro_batch_size} x {run.recipe.data.seq_len} tokens, "
                      f"{'with' if run.recipe.model.gradient_checkpointing else 'without'} checkpointing)", act))
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
                "optimizer step", without_gc, with_gc, sh.total, trainable)
