"""The memory plan: what a recipe will take on each GPU, computed before launch from the real model shapes.

Nothing heavy is built: the model is instantiated on the meta device (shapes, no storage). Per rank we count:

- model states: weights (by dtype; 4-bit weights with their quantization constants), gradients, optimizer state
  (AdamW 8 B/param, 8-bit 2 B/param, GaLore at its rank, ZeRO-sharded over N ranks, or offloaded to CPU),
  fp32 master copies (DeepSpeed keeps bf16/fp16 weights and fp32 masters), LoRA parameters and their state;
- activations saved for backward, per token and layer, measured for the Llama family (llama, mistral, qwen2)
  with autograd's saved-tensor hooks on CPU: fp32 `32h + 8kv + 16f + 4a + 8` bytes, bf16/fp16 autocast
  `30h + 4kv + 8f + 4a + 8` (h hidden, kv = kv heads x head dim, f intermediate, a heads); with gradient
  checkpointing only each layer's input (4h, the residual stream is fp32) plus one layer recomputed in full;
- logits and loss: the logits in the compute dtype plus the fp32 log-softmax kept for backward and its gradient;
- temporary buffers: autocast's cast copies of the linear weights (2 B/param in bf16/fp16, alive from forward
  to backward) and the optimizer step's foreach temporaries (about one fp32 copy of the largest state tensors);
- an allowance for the CUDA context (0.75 GiB) and allocator fragmentation (8% of the rest).

The peak is the larger of the forward/backward phase (weights, optimizer state, gradients, activations,
logits) and the optimizer-step phase (weights, state, gradients, step temporaries), plus the allowance.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from trainer.config import Config, ConfigError
from trainer.typed import Problem

GiB = 2**30
CUDA_CONTEXT = int(0.75 * GiB)
FRAGMENTATION = 0.08
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "mixtral"}
GALORE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj",
                  "c_fc", "fc1", "fc2", "query_key_value", "dense")
LORA_ALL_LINEAR_SKIP = ("lm_head",)


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


def model_config(cfg: Config) -> Any:
    """The transformers config of the recipe's model, without downloading anything."""
    from transformers import AutoConfig

    from trainer.known_models import KNOWN

    m = cfg.model
    if m.config is not None:
        arch = dict(m.config)
        if "vocab_size" not in arch:  # the tokenizer decides (the byte one is built in; others may download)
            arch["vocab_size"] = _tokenizer_size(cfg)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    kwargs = {"trust_remote_code": m.trust_remote_code, "revision": m.revision}
    try:  # a local directory, or the hub cache: no network
        return AutoConfig.from_pretrained(m.name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if m.name_or_path in KNOWN:
        arch = dict(KNOWN[m.name_or_path])
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    try:  # last resort: fetch config.json (a few kB)
        return AutoConfig.from_pretrained(m.name_or_path, **kwargs)
    except (OSError, ValueError):
        raise ConfigError([Problem("model.name_or_path", m.name_or_path, "cannot read this model's config.json "
                                   "(not a local directory, not in the hub cache, not a known model, and the hub "
                                   "is unreachable); download it once or give model.config")]) from None


def _tokenizer_size(cfg: Config) -> int:
    from trainer.tokenizer import build_tokenizer

    return len(build_tokenizer(cfg.model))


def shapes(cfg: Config) -> Shapes:
    """Parameter shapes from the model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    params = [Param(n, tuple(p.shape)) for n, p in model.named_parameters()]
    linear = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    return Shapes(config.model_type, params, hidden, inter, layers, heads, kv * head_dim, text.vocab_size, linear)


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def _matches(module: str, targets: list[str] | str | None, default: tuple[str, ...]) -> bool:
    names = default if targets in (None, "all-linear") else ([targets] if isinstance(targets, str) else targets)
    last = module.rsplit(".", 1)[-1]
    return any(last == t or module == t or module.endswith("." + t) for t in names)


# ------------------------------------------------------------------------------------------------ states

def _optimizer_bytes(name: str, numels: list[int], momentum: float) -> int:
    """State bytes of a plain (non-GaLore) optimizer over tensors of these sizes."""
    if name == "sgd":
        return 4 * sum(numels) if momentum else 0
    if name in ("adamw8bit", "paged_adamw8bit", "galore_adamw8bit"):
        # bitsandbytes keeps tensors under 4096 elements in fp32; others get two uint8 moments plus one fp32
        # absmax per 256-element block each.
        return sum(8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256) for n in numels)
    return 8 * sum(numels)  # AdamW: two fp32 moments


def galore_target(cfg: Config, p: Param) -> bool:
    """The rule GaLore uses: 2-D weights of attention and MLP projections (or the recipe's targets)."""
    module = _module_of(p.name)
    return len(p.shape) == 2 and "embed" not in module and "lm_head" not in module and _matches(
        module, cfg.optimizer.galore.target_modules, GALORE_TARGETS)


def galore_state_bytes(cfg: Config, p: Param) -> int:
    """Projector(s) in fp32 plus the two Adam moments in the projected space (8-bit: 1 B each + absmax)."""
    g = cfg.optimizer.galore
    m, n = p.shape
    r = min(g.rank, m, n)
    small, large = min(m, n), max(m, n)
    projector, moment = {"std": (small * r, r * large), "reverse_std": (large * r, r * small),
                         "left": (m * r, r * n), "right": (n * r, m * r), "full": (m * r + n * r, r * r)}[g.proj_type]
    if cfg.optimizer.name == "galore_adamw8bit" and moment >= 4096:
        moments = 2 * moment + 2 * 4 * math.ceil(moment / 256)
    else:
        moments = 8 * moment
    return 4 * projector + moments


def lora_targets(cfg: Config, sh: Shapes) -> list[Param]:
    """Weights of the linear layers LoRA adapts ('all-linear': every linear layer but the LM head)."""
    targets = cfg.adapter.target_modules
    out = []
    for p in sh.params:
        module = _module_of(p.name)
        if not p.name.endswith(".weight") or module not in sh.linear_names:
            continue
        if targets == "all-linear":
            if not module.endswith(LORA_ALL_LINEAR_SKIP):
                out.append(p)
        elif _matches(module, targets, ()):
            out.append(p)
    return out


def _quantized_weight_bytes(cfg: Config, p: Param) -> int:
    """A bitsandbytes-quantized linear weight: 4-bit with blockwise constants, or LLM.int8 with row scales."""
    q = cfg.adapter.quant
    n = p.numel
    if q.type == "int8":
        return n + 4 * p.shape[0]
    if q.double_quant:  # 8-bit absmax per 64 weights, fp32 second-level constant per 256 of them
        return n // 2 + math.ceil(n / 64) + 4 * math.ceil(n / (64 * 256))
    return n // 2 + 4 * math.ceil(n / 64)


def model_states(cfg: Config, sh: Shapes, world: int) -> tuple[list[Item], int]:
    """(items, trainable parameter count) for weights, gradients, optimizer state and master copies."""
    if cfg.adapter.type != "none":
        return _adapter_states(cfg, sh)
    d = cfg.distributed
    if d.engine == "deepspeed" and d.zero_stage >= 1:
        return _zero_states(cfg, sh, world), sh.total
    return _native_states(cfg, sh, world), sh.total


def _native_states(cfg: Config, sh: Shapes, world: int) -> list[Item]:
    o = cfg.optimizer
    shard = world if cfg.distributed.zero_stage >= 1 else 1  # native ZeRO-1: ZeroRedundancyOptimizer
    half = cfg.precision.dtype != "fp32" and not cfg.precision.master_weights
    wb = 2 if half else 4  # weights, their gradients and torch's AdamW moments share the parameters' dtype
    items = [Item("weights (bf16, no fp32 master)" if half else "weights (fp32 master, the model itself)",
                  wb * sh.total)]
    if o.name.startswith("galore"):
        targets = [p for p in sh.params if galore_target(cfg, p)]
        rest = [p.numel for p in sh.params if not galore_target(cfg, p)]
        state = sum(galore_state_bytes(cfg, p) for p in targets) + _optimizer_bytes(
            "adamw8bit" if o.name.endswith("8bit") else "adamw", rest, 0)
        note = f"GaLore rank {o.galore.rank} on {len(targets)} matrices, AdamW on {len(rest)} other tensors"
        if o.galore.per_layer:
            largest = max(p.numel for p in sh.params)
            items.append(Item("gradients (per-layer updates: one tensor at a time)", wb * largest))
        else:
            items.append(Item("gradients", wb * sh.total))
    else:
        state = _optimizer_bytes(o.name, [p.numel for p in sh.params], o.momentum)
        if half and o.name in ("adamw", "sgd"):
            state //= 2
        note = o.name
        items.append(Item("gradients", wb * sh.total))
    if shard > 1:
        note += f", sharded over {shard} ranks"
    items.append(Item("optimizer state", state // shard, note=note))
    return items


def _zero_states(cfg: Config, sh: Shapes, world: int) -> list[Item]:
    """ZeRO (Rajbhandari et al.): 2 + 2 + 12 bytes per parameter in bf16/fp16, partitioned by stage."""
    d, psi = cfg.distributed, sh.total
    half = cfg.precision.dtype != "fp32"
    wbytes, gbytes = (2, 2) if half else (4, 4)
    opt_per_param = 12 if half else 8  # fp32 master + two moments, or just the moments in fp32
    w_shard = world if d.zero_stage >= 3 else 1
    g_shard = world if d.zero_stage >= 2 else 1
    where_opt = "cpu" if d.offload_optimizer == "cpu" else "gpu"
    where_w = "cpu" if d.offload_params == "cpu" else "gpu"
    items = [Item(f"weights ({'bf16/fp16' if half else 'fp32'}{', partitioned' if w_shard > 1 else ''})",
                  wbytes * psi // w_shard, where_w),
             Item(f"gradients{' (partitioned)' if g_shard > 1 else ''}", gbytes * psi // g_shard)]
    if half:
        items.append(Item("fp32 master weights (partitioned)", 4 * psi // world, where_opt))
    items.append(Item("optimizer state (Adam moments, partitioned)", 8 * psi // world, where_opt,
                      note=f"ZeRO stage {d.zero_stage} over {world} ranks"))
    if d.zero_stage >= 3:
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


def _adapter_states(cfg: Config, sh: Shapes) -> tuple[list[Item], int]:
    a = cfg.adapter
    targets = lora_targets(cfg, sh)
    lora = sum(a.rank * (p.shape[0] + p.shape[1]) for p in targets)
    if a.use_dora:
        lora += sum(p.shape[0] for p in targets)
    base_dtype = 4 if cfg.precision.dtype == "fp32" else 2
    items = []
    if a.type == "qlora":
        quantized = [p for p in sh.params if _module_of(p.name) in sh.linear_names and p.name.endswith(".weight")
                     and not _module_of(p.name).endswith("lm_head")]
        qnames = {p.name for p in quantized}
        items.append(Item(f"base weights ({a.quant.type}{', double quant' if a.quant.double_quant else ''})",
                          sum(_quantized_weight_bytes(cfg, p) for p in quantized)))
        rest = [p for p in sh.params if p.name not in qnames]
        items.append(Item("other base weights (embeddings, norms, head; fp32 after k-bit preparation)",
                          4 * sum(p.numel for p in rest)))
    else:
        items.append(Item(f"base weights (frozen, {'fp32' if base_dtype == 4 else cfg.precision.dtype})",
                          base_dtype * sh.total))
    items.append(Item(f"LoRA parameters (rank {a.rank}, {len(targets)} matrices, fp32)", 4 * lora))
    items.append(Item("LoRA gradients (fp32)", 4 * lora))
    items.append(Item("LoRA optimizer state", _optimizer_bytes(cfg.optimizer.name, [lora], 0),
                      note=cfg.optimizer.name))
    return items, lora


# ------------------------------------------------------------------------------------------- activations

def layer_bytes_per_token(cfg: Config, sh: Shapes) -> int:
    """Bytes one decoder layer saves for backward per token (measured formula, see the module docstring)."""
    h, kv, f, a = sh.hidden, sh.kv_dim, sh.intermediate, sh.heads
    if cfg.precision.dtype == "fp32":
        per = 32 * h + 8 * kv + 16 * f + 4 * a + 8
    else:
        per = 30 * h + 4 * kv + 8 * f + 4 * a + 8
    if sh.model_type not in LLAMA_LIKE:  # GPT-2 style: LayerNorm and GELU keep a little more; approximate
        per = int(per * 1.15)
    if cfg.adapter.type != "none":  # LoRA: the A projection's output (rank r) per adapted matrix
        per += 4 * cfg.adapter.rank * len(lora_targets(cfg, sh)) // max(sh.layers, 1)
    return per


def activation_bytes(cfg: Config, sh: Shapes, checkpointing: bool) -> int:
    """Saved activations of one micro-batch (forward to the start of backward)."""
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    per_layer = layer_bytes_per_token(cfg, sh)
    outside = 12 * sh.hidden + 12  # final norm and the LM head's input
    if checkpointing:  # each layer's input is kept (fp32 residual stream); one layer is recomputed at a time
        return tokens * (sh.layers * 4 * sh.hidden + per_layer + outside)
    return tokens * (sh.layers * per_layer + outside)


def logits_bytes(cfg: Config, sh: Shapes) -> int:
    """Logits in the compute dtype, the fp32 log-softmax kept for the loss, and its gradient."""
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    compute = 4 if cfg.precision.dtype == "fp32" else 2
    return tokens * sh.vocab * (compute + 8)


def _step_temporaries(cfg: Config, items: list[Item], sh: Shapes) -> int:
    """torch's foreach AdamW creates about one fp32 copy of the state it updates; others work per tensor."""
    if cfg.distributed.engine == "deepspeed" and cfg.distributed.zero_stage >= 1:
        return 0
    if cfg.optimizer.name == "adamw":
        state = sum(i.bytes for i in items if i.name.endswith("optimizer state") and i.where == "gpu")
        return state // 2
    return 4 * max(p.numel for p in sh.params)


def _autocast_copies(cfg: Config, sh: Shapes, trainable_full: bool) -> int:
    """bf16/fp16 autocast casts each fp32 linear weight once per forward and keeps it until backward. Under
    gradient checkpointing a layer's casts are dropped with its activations: only the LM head's and the
    recomputed layer's are alive."""
    if cfg.precision.dtype == "fp32" or not trainable_full or cfg.distributed.engine == "deepspeed" \
            or not cfg.precision.master_weights:
        return 0
    linear = [p for p in sh.params if _module_of(p.name) in sh.linear_names]
    if not cfg.model.gradient_checkpointing:
        return 2 * sum(p.numel for p in linear)
    outside = sum(p.numel for p in linear if ".layers." not in p.name and ".h." not in p.name)
    return 2 * (outside + sum(p.numel for p in linear) // max(sh.layers, 1))


def plan(cfg: Config, world_size: int = 1, gpu_bytes: int = 24 * GiB, sh: Shapes | None = None) -> Plan:
    """The plan of one recipe at a world size, against a GPU of gpu_bytes."""
    sh = sh or shapes(cfg)
    items, trainable = model_states(cfg, sh, world_size)
    states = sum(i.bytes for i in items if i.where == "gpu")
    with_gc, without_gc = activation_bytes(cfg, sh, True), activation_bytes(cfg, sh, False)
    act = with_gc if cfg.model.gradient_checkpointing else without_gc
    items.append(Item(f"activations ({cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens, "
                      f"{'with' if cfg.model.gradient_checkpointing else 'without'} checkpointing)", act))
    items.append(Item("logits and loss (fp32 log-softmax and its gradient)", logits_bytes(cfg, sh)))
    casts = _autocast_copies(cfg, sh, cfg.adapter.type == "none")
    if casts:
        items.append(Item(f"{cfg.precision.dtype} cast copies of the weights (autocast)", casts))
    temp = _step_temporaries(cfg, items, sh)
    forward = states + act + logits_bytes(cfg, sh) + casts
    step = states + temp
    base = max(forward, step)
    items.append(Item("optimizer step temporaries", temp, note="counted in the step phase only"))
    allowance = CUDA_CONTEXT + int(FRAGMENTATION * base)
    items.append(Item("CUDA context and allocator fragmentation", allowance,
                      note=f"{CUDA_CONTEXT / GiB:.2f} GiB context + {FRAGMENTATION:.0%} of the rest"))
    return Plan(world_size, gpu_bytes, items, base + allowance, "forward/backward" if forward >= step else
                "optimizer step", without_gc, with_gc, sh.total, trainable)
