"""Cross-field rules of a recipe: settings that are each valid but contradict each other.

Pure: each rule reads the typed recipe only (no file, environment or model) and returns Problems naming the key,
the value and the fix. Rules that need the world size, the filesystem or the architecture live in resolve.py.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from trainer.errors import Problem
from trainer.schema import DEEPSPEED_OWNED, LOW_RANK, QuantConfig, Recipe

Source = Callable[[str], str]
BUILTIN_SOURCES = ("builtin:python_stdlib",)


def _model(r: Recipe, src: Source) -> list[Problem]:
    m, out = r.model, []
    if m.name_or_path and m.config:
        out.append(Problem("model.config", m.config, "give either model.config (from scratch) or "
                           "model.name_or_path (pretrained), not both; set one to null", src("model.config")))
    elif not m.name_or_path and not m.config:
        out.append(Problem("model.name_or_path", None, "no model: give model.name_or_path (hub id or directory) "
                           "or model.config (an architecture dict with model_type)", src("model.name_or_path")))
    if m.config is not None and not isinstance(m.config.get("model_type"), str):
        out.append(Problem("model.config.model_type", m.config.get("model_type"), "model.config needs a "
                           "model_type string (llama, qwen2, mistral, gpt2, ...)", src("model.config")))
    if m.config and m.rope_scaling and ({"rope_scaling", "rope_parameters"} & set(m.config)):
        out.append(Problem("model.rope_scaling", m.rope_scaling, "model.config sets its own RoPE settings too; give "
                           "the scaling in one place", src("model.rope_scaling")))
    if m.config and not m.tokenizer:
        out.append(Problem("model.tokenizer", None, "a from-scratch model needs a tokenizer: 'byte', "
                           "a directory or a hub id", src("model.tokenizer")))
    return out


def _data(r: Recipe, src: Source) -> list[Problem]:
    d, out = r.data, []
    if d.source and d.sources:
        out.append(Problem("data.sources", [e.source for e in d.sources], "give data.source (one source) or "
                           "data.sources (a mixture), not both; set data.source=null", src("data.sources")))
    elif d.sources is not None and not d.sources:
        out.append(Problem("data.sources", [], "empty: give at least one {source: ...}, or data.source",
                           src("data.sources")))
    elif d.sources:
        for i, entry in enumerate(d.sources):
            out += _builtin_problems(entry.source, entry.format or d.format, f"data.sources[{i}]", src)
        return out + _eval_problems(r, src)
    if not d.source:
        out.append(Problem("data.source", None, "no training data: give a file, directory or hub dataset name "
                           "(or builtin:python_stdlib), or data.sources", src("data.source")))
        return out + _eval_problems(r, src)
    return out + _builtin_problems(d.source, d.format, "data.source", src) + _eval_problems(r, src)


def _packing(r: Recipe, src: Source) -> list[Problem]:
    d = r.data
    formats = {e.format or d.format for e in d.sources} if d.sources else {d.format}
    if d.packing == "none" and "text" in formats:
        return [Problem("data.packing", "none", "plain text is always packed into seq_len blocks: use concat (the "
                        "default), or data.document_mask: true to keep documents apart", src("data.packing"))]
    if d.document_mask and "text" not in formats:
        return [Problem("data.document_mask", True, "applies to plain text; chats and Alpaca rows are kept apart by "
                        "data.packing: isolated", src("data.document_mask"))]
    return []


def _builtin_problems(source: str, fmt: str, key: str, src: Source) -> list[Problem]:
    out = []
    if source.startswith("builtin:") and source not in BUILTIN_SOURCES:
        out.append(Problem(key, source, "unknown built-in dataset; the one built-in is builtin:python_stdlib",
                           src(key)))
    if source in BUILTIN_SOURCES and fmt != "text":
        out.append(Problem("data.format", fmt, "builtin:python_stdlib is plain text: use format: text",
                           src("data.format")))
    return out


def _eval_problems(r: Recipe, src: Source) -> list[Problem]:
    if r.train.eval_every_steps > 0 and r.data.eval_fraction == 0:
        return [Problem("train.eval_every_steps", r.train.eval_every_steps, "evaluation needs held-out data: set "
                        "data.eval_fraction (e.g. 0.05) or train.eval_every_steps=0", src("train.eval_every_steps"))]
    return []


def _optimizer(r: Recipe, src: Source) -> list[Problem]:
    o, out = r.optimizer, []
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        out.append(Problem("optimizer.betas", o.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.95]",
                           src("optimizer.betas")))
    return out + _galore(r, src)


def _galore(r: Recipe, src: Source) -> list[Problem]:
    """Settings of a low-rank-state optimizer's section (optimizer.galore or optimizer.apollo) that need it
    selected, and what the family cannot run with."""
    o, out = r.optimizer, []
    if o.name not in LOW_RANK or o.name.startswith("apollo"):
        out += _per_layer_without("optimizer.galore.per_layer", r.optimizer.galore.per_layer, src,
                                  "the GaLore optimizers: set optimizer.name: galore_adamw (or galore_adamw8bit)")
    if o.name not in LOW_RANK or o.name.startswith("galore"):
        out += _per_layer_without("optimizer.apollo.per_layer", r.optimizer.apollo.per_layer, src,
                                  "APOLLO: set optimizer.name: apollo_adamw (or apollo_mini)")
    if o.low_rank is None:
        return out
    who, section = ("APOLLO", "optimizer.apollo") if o.name.startswith("apollo") else ("GaLore", "optimizer.galore")
    if r.distributed.engine == "deepspeed":
        out.append(Problem("optimizer.name", o.name, f"{who} needs whole weight matrices, and DeepSpeed flattens "
                           "and partitions parameters, so no rank ever sees a matrix to project; use "
                           "distributed.engine: native with distributed.zero_stage: 1 (its state sharded across "
                           "ranks by whole parameters)", src("optimizer.name")))
    if r.adapter.type != "none":
        out.append(Problem("optimizer.name", o.name, f"{who} trains full weight matrices, but adapter.type: "
                           f"{r.adapter.type} trains only small adapter matrices (nothing to project); use "
                           "optimizer.name: adamw (or adamw8bit), or adapter.type: none", src("optimizer.name")))
    low = o.low_rank
    if low.target_modules is not None and not low.target_modules:
        out.append(Problem(f"{section}.target_modules", [], "empty: give module names or globs (e.g. "
                           "[q_proj, v_proj]) or null for every attention and MLP projection",
                           src(f"{section}.target_modules")))
    if low.per_layer and r.precision.dtype == "fp16":
        out.append(Problem(f"{section}.per_layer", True, "per-layer updates change each weight during "
                           "backward, before an fp16 overflow elsewhere in the model is known, so the step cannot "
                           "be skipped; use precision.dtype: bf16 (no loss scaling needed) or per_layer: false",
                           src(f"{section}.per_layer")))
    if low.per_layer and r.distributed.zero_stage == 1:
        out.append(Problem(f"{section}.per_layer", True, "per-layer updates with sharded optimizer state "
                           "(distributed.zero_stage: 1) are not supported; choose one: per_layer frees gradients "
                           f"during backward, zero_stage 1 splits the {who} state across ranks",
                           src(f"{section}.per_layer")))
    return out


def _per_layer_without(key: str, value: bool, src: Source, which: str) -> list[Problem]:
    """per_layer set in the section of an optimizer the recipe does not use."""
    if not value:
        return []
    return [Problem(key, True, f"per-layer updates are built for {which}, or per_layer: false", src(key))]


def _nonfinite(r: Recipe, src: Source) -> list[Problem]:
    """Skipping a non-finite step needs an update that has not happened yet when it is found."""
    if r.train.max_nonfinite_steps == 0 or r.precision.dtype == "fp16":
        return []
    key, why = "train.max_nonfinite_steps", ""
    if r.optimizer.per_layer:
        why = ("per-layer updates change each weight during backward, so a step cannot be skipped once its "
               "gradients exist; set it to 0 (the run stops at the first NaN/inf loss, before its backward)")
    elif r.distributed.engine == "deepspeed" and r.distributed.zero_stage > 0 and r.precision.dtype == "fp32":
        why = ("DeepSpeed checks gradients for NaN/inf only in bf16 and fp16, so in fp32 it would apply them; use "
               "precision.dtype: bf16, or set it to 0")
    return [Problem(key, r.train.max_nonfinite_steps, why, src(key))] if why else []


def _int8_weights(r: Recipe, src: Source) -> list[Problem]:
    """INT8 weights are written by the low-rank family's stochastic-rounding update, and only its targets are
    INT8; other optimizers update weights with in-place ops an INT8 tensor does not have."""
    if r.precision.weights != "int8" or r.optimizer.low_rank is not None:
        return []
    return [Problem("precision.weights", "int8", f"INT8 weights are the targets of GaLore or APOLLO, updated "
                    f"with stochastic rounding by those optimizers; optimizer.name: {r.optimizer.name} has no "
                    "such update: use optimizer.name: apollo_mini, apollo_adamw, galore_adamw or "
                    "galore_adamw8bit, or precision.weights: float", src("precision.weights"))]


def _precision(r: Recipe, src: Source) -> list[Problem]:
    p = r.precision
    if p.master_weights:
        return []
    key, why = "precision.master_weights", ""
    if p.dtype == "fp16":
        why = "fp16 weights without an fp32 master copy cannot be loss-scaled safely; use precision.dtype: bf16"
    elif p.dtype == "fp32":
        why = "has no effect with precision.dtype: fp32 (the weights are fp32); set dtype: bf16 or remove it"
    elif r.distributed.engine == "deepspeed" and r.distributed.zero_stage > 0:
        why = "DeepSpeed keeps its own fp32 master copy in the optimizer; remove it"
    elif r.adapter.type != "none":
        why = "adapter runs already keep the frozen base in precision.dtype and the adapters in fp32; remove it"
    return [Problem(key, False, why, src(key))] if why else []


def _distributed(r: Recipe, src: Source) -> list[Problem]:
    d, out = r.distributed, []
    if d.engine == "native" and d.zero_stage > 1:
        out.append(Problem("distributed.zero_stage", d.zero_stage, "the native engine shards optimizer state only "
                           "(zero_stage 1: each rank keeps the state of the whole parameters it owns); stages 2-3 "
                           "need distributed.engine: deepspeed", src("distributed.zero_stage")))
    if d.engine == "native" and (d.offload_optimizer != "none" or d.offload_params != "none"):
        key = "distributed.offload_optimizer" if d.offload_optimizer != "none" else "distributed.offload_params"
        out.append(Problem(key, "cpu", "CPU offload needs distributed.engine: deepspeed", src(key)))
    if d.offload_params != "none" and d.zero_stage != 3:
        out.append(Problem("distributed.offload_params", d.offload_params, "parameter offload needs "
                           "distributed.zero_stage: 3", src("distributed.offload_params")))
    if d.deepspeed_overrides and d.engine != "deepspeed":
        out.append(Problem("distributed.deepspeed_overrides", d.deepspeed_overrides, "only used with "
                           "distributed.engine: deepspeed; remove it or switch the engine",
                           src("distributed.deepspeed_overrides")))
    return out


def owned_override_paths(overrides: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(override key, its value, recipe key to use) for every DeepSpeed override the recipe owns."""
    out = []
    for path, recipe_key in DEEPSPEED_OWNED.items():
        node: Any = overrides
        for part in path.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            out.append((path, node, recipe_key))
    return out


_MISSING = object()


def _deepspeed(r: Recipe, src: Source) -> list[Problem]:
    """distributed.engine: deepspeed. (GaLore and adapters on it are refused by their own rules.)"""
    d, out = r.distributed, []
    if d.engine != "deepspeed":
        return out
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        out.append(Problem("distributed.offload_optimizer", d.offload_optimizer, "optimizer offload is part of "
                           "ZeRO: set distributed.zero_stage: 1, 2 or 3", src("distributed.offload_optimizer")))
    if d.offload_optimizer != "none" and r.optimizer.name != "adamw":
        out.append(Problem("optimizer.name", r.optimizer.name, "with distributed.offload_optimizer: cpu the "
                           "update runs on the CPU in DeepSpeedCPUAdam: use optimizer.name: adamw, or "
                           "offload_optimizer: none", src("optimizer.name")))
    scale = r.precision.initial_loss_scale
    if r.precision.dtype == "fp16" and d.zero_stage > 0 and not math.log2(scale).is_integer():
        out.append(Problem("precision.initial_loss_scale", scale, "DeepSpeed's loss scale starts at a power of "
                           "two (2**initial_scale_power): use e.g. 65536", src("precision.initial_loss_scale")))
    if d.deepspeed_overrides and d.zero_stage == 0:
        out.append(Problem("distributed.deepspeed_overrides", d.deepspeed_overrides, "zero_stage 0 runs on the "
                           "native engine (DeepSpeed's stage 0 mishandles fp16 and bf16), which reads no DeepSpeed "
                           "config: remove the overrides or set distributed.zero_stage: 1, 2 or 3",
                           src("distributed.deepspeed_overrides")))
    for path, value, recipe_key in owned_override_paths(d.deepspeed_overrides):
        out.append(Problem(f"distributed.deepspeed_overrides.{path}", value, f"generated from the recipe; set "
                           f"{recipe_key} instead", src("distributed.deepspeed_overrides")))
    return out


def _adapter(r: Recipe, src: Source) -> list[Problem]:
    a, out = r.adapter, []
    if a.type == "none":
        return []
    if not r.model.name_or_path:
        return [Problem("adapter.type", a.type, "adapters train on top of a pretrained model, and model.config "
                        "builds a randomly initialized one: give model.name_or_path (a directory or hub id) and set "
                        "model.config=null, or use adapter.type=none to train from scratch", src("adapter.type"))]
    if a.type == "lora" and a.quant != QuantConfig():
        out.append(Problem("adapter.quant", a.quant.model_dump(), "quantization settings apply to "
                           "adapter.type=qlora; use qlora or remove adapter.quant", src("adapter.quant")))
    q, dtype = a.quant, r.precision.dtype
    if a.type == "qlora" and q.type != "int8" and dtype != "fp32" and q.compute_dtype != dtype:
        out.append(Problem("adapter.quant.compute_dtype", q.compute_dtype, f"differs from precision.dtype={dtype}: "
                           f"the 4-bit matmuls would run in {q.compute_dtype} inside {dtype} autocast; set "
                           f"adapter.quant.compute_dtype={dtype}", src("adapter.quant.compute_dtype")))
    if a.type == "qlora" and q.type == "int8" and q.storage_dtype not in ("auto", "uint8"):
        out.append(Problem("adapter.quant.storage_dtype", q.storage_dtype, "applies to 4-bit weights (nf4, fp4); "
                           "int8 weights are stored as int8: remove it", src("adapter.quant.storage_dtype")))
    if isinstance(a.target_modules, str) and a.target_modules != "all-linear":
        out.append(Problem("adapter.target_modules", a.target_modules, "give a list of module names (e.g. "
                           "[q_proj, v_proj]) or 'all-linear'", src("adapter.target_modules")))
    if isinstance(a.target_modules, list) and not a.target_modules:
        out.append(Problem("adapter.target_modules", [], "empty: give module names (e.g. [q_proj, v_proj]) or "
                           "'all-linear'", src("adapter.target_modules")))
    return out + _adapter_on_deepspeed(r, src)  # GaLore with adapters: refused by the GaLore rules


def _adapter_on_deepspeed(r: Recipe, src: Source) -> list[Problem]:
    """LoRA/QLoRA under DeepSpeed ZeRO 1-3 (stage 0 runs on the native engine)."""
    d, q, out = r.distributed, r.adapter.quant, []
    if d.engine != "deepspeed" or d.zero_stage == 0:
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


def _full_weights(r: Recipe, src: Source) -> list[Problem]:
    """checkpoint.full_weights chooses whether a DeepSpeed checkpoint carries a gathered copy of the weights beside
    its shards; elsewhere the weights file is the checkpoint's only copy of the weights."""
    chosen, key = r.checkpoint.full_weights, "checkpoint.full_weights"
    deepspeed = r.distributed.engine == "deepspeed" and r.distributed.zero_stage > 0
    if chosen is False and not deepspeed and r.adapter.type == "none":
        return [Problem(key, False, "the native engine's checkpoint holds the weights only in model.safetensors, "
                        "which resume needs; remove it (it applies to distributed.engine: deepspeed)", src(key))]
    if chosen is not None and r.adapter.type != "none":
        return [Problem(key, chosen, "an adapter run's checkpoint holds the adapter (adapter/), never the base's "
                        "weights, whatever the engine; remove it", src(key))]
    return []


RULES = (_model, _data, _packing, _optimizer, _nonfinite, _precision, _int8_weights, _distributed, _deepspeed,
         _adapter, _full_weights)


def cross_check(recipe: Recipe, src: Source) -> list[Problem]:
    """Every cross-field problem of a type-correct recipe."""
    return [problem for rule in RULES for problem in rule(recipe, src)]


def warnings_of(recipe: Recipe) -> list[str]:
    """Settings that are allowed but probably not meant: `validate` and `train` both print these."""
    out = []
    o, t = recipe.optimizer, recipe.train
    if o.warmup_steps > t.max_steps:
        out.append(f"optimizer.warmup_steps={o.warmup_steps} > train.max_steps={t.max_steps}: the LR never reaches "
                   "optimizer.lr")
    return out
