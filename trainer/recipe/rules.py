"""Cross-field rules of a recipe: settings that are each valid but contradict each other.

Pure: each rule reads the typed recipe only (no file, environment or model) and returns Problems naming the key,
the value and the fix. Rules that need the world size, the filesystem or the architecture live in resolve.py.
"""

from __future__ import annotations

from typing import Callable

from trainer.engine.specs import engine_problems
from trainer.errors import Problem
from trainer.engine import nonfinite
from trainer.preference import rules as preference_rules
from trainer.recipe.execution import execution_of
from trainer.recipe.schema import LOW_RANK, QuantConfig, Recipe

Source = Callable[[str], str]
BUILTIN_SOURCES = ("builtin:shakespeare", "builtin:python_stdlib")  # trainer/data/sources.py reads them


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
                           "(or builtin:shakespeare), or data.sources", src("data.source")))
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
        out.append(Problem(key, source, "unknown built-in dataset; the built-in ones are "
                           + " and ".join(BUILTIN_SOURCES), src(key)))
    if source in BUILTIN_SOURCES and fmt != "text":
        out.append(Problem("data.format", fmt, f"{source} is plain text: use format: text",
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
    return out


def _per_layer_without(key: str, value: bool, src: Source, which: str) -> list[Problem]:
    """per_layer set in the section of an optimizer the recipe does not use."""
    if not value:
        return []
    return [Problem(key, True, f"per-layer updates are built for {which}, or per_layer: false", src(key))]


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
    elif r.adapter.type != "none" and not execution_of(r).deepspeed:  # DeepSpeed: its spec says why
        why = "adapter runs already keep the frozen base in precision.dtype and the adapters in fp32; remove it"
    return [Problem(key, False, why, src(key))] if why else []


def _adapter(r: Recipe, src: Source) -> list[Problem]:
    a, out = r.adapter, []
    if a.type == "none":
        if a.target_experts:
            return [Problem("adapter.target_experts", True, "applies to adapter.type lora or qlora (it puts LoRA on "
                            "the experts); full training trains the experts anyway: remove it",
                            src("adapter.target_experts"))]
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
    return out  # GaLore with adapters: refused by the GaLore rules; on DeepSpeed: its spec


def _full_weights(r: Recipe, src: Source) -> list[Problem]:
    """An adapter run's checkpoint holds the adapter, never the base's weights (the native engine's own rule about
    full_weights is in its spec)."""
    chosen, key = r.checkpoint.full_weights, "checkpoint.full_weights"
    if chosen is not None and r.adapter.type != "none":
        return [Problem(key, chosen, "an adapter run's checkpoint holds the adapter (adapter/), never the base's "
                        "weights, whatever the engine; remove it", src(key))]
    return []


RULES = (_model, _data, _packing, _optimizer, nonfinite.problems, _precision, _int8_weights, _adapter, _full_weights,
         engine_problems, preference_rules.problems)


def cross_check(recipe: Recipe, src: Source) -> list[Problem]:
    """Every cross-field problem of a type-correct recipe, the engines' own included (engine/specs.py)."""
    return [problem for rule in RULES for problem in rule(recipe, src)]


def warnings_of(recipe: Recipe) -> list[str]:
    """Settings that are allowed but probably not meant: `validate` and `train` both print these."""
    out = []
    o, t = recipe.optimizer, recipe.train
    if o.warmup_steps > t.max_steps:
        out.append(f"optimizer.warmup_steps={o.warmup_steps} > train.max_steps={t.max_steps}: the LR never reaches "
                   "optimizer.lr")
    return out
