"""Cross-field rules of a recipe: settings that are each valid but contradict each other.

Each rule returns Problems naming the key, the value and the fix. `resolve_batch` is separate because it
needs the world size, which is known only at launch (or from `validate --world-size`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from trainer.config import Config, ConfigError, QuantConfig
from trainer.typed import Problem

Source = Callable[[str], str]


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def _model(cfg: Config, src: Source) -> list[Problem]:
    m, out = cfg.model, []
    if m.name_or_path and m.config:
        out.append(Problem("model.config", "{...}", "give either model.config (from scratch) or "
                           "model.name_or_path (pretrained), not both; set one to null", src("model.config")))
    elif not m.name_or_path and not m.config:
        out.append(Problem("model.name_or_path", None, "no model: give model.name_or_path (hub id or directory) "
                           "or model.config (an architecture dict with model_type)", src("model.name_or_path")))
    if m.config is not None and not isinstance(m.config.get("model_type"), str):
        out.append(Problem("model.config.model_type", m.config.get("model_type"), "model.config needs a "
                           "model_type string (llama, qwen2, mistral, gpt2, ...)", src("model.config")))
    if m.name_or_path and _looks_local(m.name_or_path) and not Path(m.name_or_path).expanduser().is_dir():
        out.append(Problem("model.name_or_path", m.name_or_path, "local model directory not found; check "
                           "the path (or give a hub id like org/name)", src("model.name_or_path")))
    if m.config and not m.tokenizer:
        out.append(Problem("model.tokenizer", None, "a from-scratch model needs a tokenizer: 'byte', "
                           "a directory or a hub id", src("model.tokenizer")))
    if m.tokenizer and m.tokenizer != "byte" and _looks_local(m.tokenizer) \
            and not Path(m.tokenizer).expanduser().exists():
        out.append(Problem("model.tokenizer", m.tokenizer, "tokenizer directory not found; give 'byte', an "
                           "existing directory or a hub id", src("model.tokenizer")))
    return out


def _data(cfg: Config, src: Source) -> list[Problem]:
    d, out = cfg.data, []
    if not d.source:
        out.append(Problem("data.source", None, "no training data: give a file, directory or hub dataset name "
                           "(or builtin:python_stdlib)", src("data.source")))
    elif d.source.startswith("builtin:") and d.source != "builtin:python_stdlib":
        out.append(Problem("data.source", d.source, "unknown built-in dataset; the one built-in is "
                           "builtin:python_stdlib", src("data.source")))
    elif not d.source.startswith("builtin:") and _looks_local(d.source) \
            and not Path(d.source).expanduser().exists():
        out.append(Problem("data.source", d.source, "file or directory not found; check the path",
                           src("data.source")))
    if d.source == "builtin:python_stdlib" and d.format != "text":
        out.append(Problem("data.format", d.format, "builtin:python_stdlib is plain text: use format: text",
                           src("data.format")))
    if cfg.train.eval_every_steps > 0 and d.eval_fraction == 0:
        out.append(Problem("train.eval_every_steps", cfg.train.eval_every_steps, "evaluation needs held-out "
                           "data: set data.eval_fraction (e.g. 0.05) or train.eval_every_steps=0",
                           src("train.eval_every_steps")))
    return out


def _optimizer(cfg: Config, src: Source) -> list[Problem]:
    o, out = cfg.optimizer, []
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        out.append(Problem("optimizer.betas", o.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.95]",
                           src("optimizer.betas")))
    return out + _galore(cfg, src)


def _galore(cfg: Config, src: Source) -> list[Problem]:
    o, g, out = cfg.optimizer, cfg.optimizer.galore, []
    if not o.name.startswith("galore"):
        if g.per_layer:
            out.append(Problem("optimizer.galore.per_layer", True, "per-layer updates are built for the GaLore "
                               "optimizers: set optimizer.name: galore_adamw (or galore_adamw8bit), or "
                               "per_layer: false", src("optimizer.galore.per_layer")))
        return out
    if cfg.distributed.engine == "deepspeed":
        out.append(Problem("optimizer.name", o.name, "GaLore needs whole weight matrices, and DeepSpeed flattens "
                           "and partitions parameters, so no rank ever sees a matrix to project; use "
                           "distributed.engine: native with distributed.zero_stage: 1 (GaLore with its state "
                           "sharded across ranks by whole parameters)", src("optimizer.name")))
    if cfg.adapter.type != "none":
        out.append(Problem("optimizer.name", o.name, f"GaLore trains full weight matrices, but adapter.type: "
                           f"{cfg.adapter.type} trains only small adapter matrices (nothing to project); use "
                           "optimizer.name: adamw (or adamw8bit), or adapter.type: none", src("optimizer.name")))
    if g.target_modules is not None and not g.target_modules:
        out.append(Problem("optimizer.galore.target_modules", [], "empty: give module names or globs (e.g. "
                           "[q_proj, v_proj]) or null for every attention and MLP projection",
                           src("optimizer.galore.target_modules")))
    if g.per_layer and cfg.precision.dtype == "fp16":
        out.append(Problem("optimizer.galore.per_layer", True, "per-layer updates change each weight during "
                           "backward, before an fp16 overflow elsewhere in the model is known, so the step cannot "
                           "be skipped; use precision.dtype: bf16 (no loss scaling needed) or per_layer: false",
                           src("optimizer.galore.per_layer")))
    if g.per_layer and cfg.distributed.zero_stage == 1:
        out.append(Problem("optimizer.galore.per_layer", True, "per-layer updates with sharded optimizer state "
                           "(distributed.zero_stage: 1) are not supported; choose one: per_layer frees gradients "
                           "during backward, zero_stage 1 splits the GaLore state across ranks",
                           src("optimizer.galore.per_layer")))
    return out


def _precision(cfg: Config, src: Source) -> list[Problem]:
    p = cfg.precision
    if p.master_weights:
        return []
    key, why = "precision.master_weights", ""
    if p.dtype == "fp16":
        why = "fp16 weights without an fp32 master copy cannot be loss-scaled safely; use precision.dtype: bf16"
    elif p.dtype == "fp32":
        why = "has no effect with precision.dtype: fp32 (the weights are fp32); set dtype: bf16 or remove it"
    elif cfg.distributed.engine == "deepspeed" and cfg.distributed.zero_stage > 0:
        why = "DeepSpeed keeps its own fp32 master copy in the optimizer; remove it"
    elif cfg.adapter.type != "none":
        why = "adapter runs already keep the frozen base in precision.dtype and the adapters in fp32; remove it"
    return [Problem(key, False, why, src(key))] if why else []


def _checkpoint(cfg: Config, src: Source) -> list[Problem]:
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).expanduser().is_dir():
        return [Problem("checkpoint.resume", resume, "not auto, never, or an existing checkpoint folder / run "
                        "directory; check the path", src("checkpoint.resume"))]
    return []


def _distributed(cfg: Config, src: Source) -> list[Problem]:
    d, out = cfg.distributed, []
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
        out.append(Problem("distributed.deepspeed_overrides", "{...}", "only used with distributed.engine: "
                           "deepspeed; remove it or switch the engine", src("distributed.deepspeed_overrides")))
    return out


def _deepspeed(cfg: Config, src: Source) -> list[Problem]:
    """distributed.engine: deepspeed. (GaLore and adapters on it are refused by their own rules.)"""
    from trainer.engine.ds_config import is_power_of_two, owned_override_paths

    d, out = cfg.distributed, []
    if d.engine != "deepspeed":
        return out
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        out.append(Problem("distributed.offload_optimizer", d.offload_optimizer, "optimizer offload is part of "
                           "ZeRO: set distributed.zero_stage: 1, 2 or 3", src("distributed.offload_optimizer")))
    if d.offload_optimizer != "none" and cfg.optimizer.name != "adamw":
        out.append(Problem("optimizer.name", cfg.optimizer.name, "with distributed.offload_optimizer: cpu the "
                           "update runs on the CPU in DeepSpeedCPUAdam: use optimizer.name: adamw, or "
                           "offload_optimizer: none", src("optimizer.name")))
    if cfg.precision.dtype == "fp16" and d.zero_stage > 0 and not is_power_of_two(cfg.precision.initial_loss_scale):
        out.append(Problem("precision.initial_loss_scale", cfg.precision.initial_loss_scale, "DeepSpeed's loss "
                           "scale starts at a power of two (2**initial_scale_power): use e.g. 65536",
                           src("precision.initial_loss_scale")))
    if d.deepspeed_overrides and d.zero_stage == 0:
        out.append(Problem("distributed.deepspeed_overrides", "{...}", "zero_stage 0 runs on the native engine "
                           "(DeepSpeed's stage 0 mishandles fp16 and bf16), which reads no DeepSpeed config: "
                           "remove the overrides or set distributed.zero_stage: 1, 2 or 3",
                           src("distributed.deepspeed_overrides")))
    for path, value, recipe_key in owned_override_paths(d.deepspeed_overrides):
        out.append(Problem(f"distributed.deepspeed_overrides.{path}", value, f"generated from the recipe; set "
                           f"{recipe_key} instead", src("distributed.deepspeed_overrides")))
    return out


def _adapter_targets(cfg: Config, src: Source) -> list[Problem]:
    """Target module names checked against the architecture built on the meta device (no weights read)."""
    a = cfg.adapter
    if isinstance(a.target_modules, str):
        if a.target_modules != "all-linear":
            return [Problem("adapter.target_modules", a.target_modules, "give a list of module names (e.g. "
                            "[q_proj, v_proj]) or 'all-linear'", src("adapter.target_modules"))]
        return []
    if not a.target_modules:
        return [Problem("adapter.target_modules", [], "empty: give module names (e.g. [q_proj, v_proj]) or "
                        "'all-linear'", src("adapter.target_modules"))]
    try:  # a local directory, the hub cache, a well-known model, and only then the network
        from trainer.memory import model_config

        arch = model_config(cfg)
    except Exception:  # not reachable now (a hub id offline): loading reports it, and peft checks the names then
        return []
    from trainer.adapters.targets import target_problems

    return [Problem("adapter.target_modules", a.target_modules, why, src("adapter.target_modules"))
            for why in target_problems(a, arch)]


def _adapter(cfg: Config, src: Source) -> list[Problem]:
    a, out = cfg.adapter, []
    if a.type == "none":
        return []
    if not cfg.model.name_or_path:
        return [Problem("adapter.type", a.type, "adapters train on top of a pretrained model, and model.config "
                        "builds a randomly initialized one: give model.name_or_path (a directory or hub id) and set "
                        "model.config=null, or use adapter.type=none to train from scratch", src("adapter.type"))]
    if a.type == "lora" and a.quant != QuantConfig():
        out.append(Problem("adapter.quant", "{...}", "quantization settings apply to adapter.type=qlora; use qlora "
                           "or remove adapter.quant", src("adapter.quant")))
    q, dtype = a.quant, cfg.precision.dtype
    if a.type == "qlora" and q.type != "int8" and dtype != "fp32" and q.compute_dtype != dtype:
        out.append(Problem("adapter.quant.compute_dtype", q.compute_dtype, f"differs from precision.dtype={dtype}: "
                           f"the 4-bit matmuls would run in {q.compute_dtype} inside {dtype} autocast; set "
                           f"adapter.quant.compute_dtype={dtype}", src("adapter.quant.compute_dtype")))
    if a.type == "qlora" and q.type == "int8" and q.storage_dtype != "uint8":
        out.append(Problem("adapter.quant.storage_dtype", q.storage_dtype, "applies to 4-bit weights (nf4, fp4); "
                           "int8 weights are stored as int8: remove it", src("adapter.quant.storage_dtype")))
    if cfg.distributed.engine == "deepspeed":
        out.append(Problem("adapter.type", a.type, "adapters are not supported with distributed.engine=deepspeed "
                           "in this version (ZeRO-3 needs the 4-bit weights in a bf16 storage dtype to shard them, "
                           "and saving the adapter from partitioned parameters writes an empty file: peft#2016, "
                           "DeepSpeed#3620); use distributed.engine=native (DDP)", src("distributed.engine")))
    return out + _adapter_targets(cfg, src)  # GaLore with adapters: refused by the GaLore rules


# Features whose issues have not landed yet: validation refuses them with the reason instead of failing later.
NOT_YET: dict[str, tuple[Callable[[Config], bool], str]] = {
}


def cross_check(cfg: Config, src: Source) -> list[Problem]:
    """Every cross-field problem of a type-correct recipe."""
    out = (_model(cfg, src) + _data(cfg, src) + _optimizer(cfg, src) + _precision(cfg, src) + _checkpoint(cfg, src)
           + _distributed(cfg, src))
    out += _deepspeed(cfg, src)
    out += _adapter(cfg, src)
    for key, (applies, why) in NOT_YET.items():
        if applies(cfg):
            section, name = key.split(".")
            out.append(Problem(key, getattr(getattr(cfg, section), name), why, src(key)))
    return out


def resolve_batch(cfg: Config, world_size: int) -> int:
    """The number of micro-batches per optimizer step on each rank; ConfigError when sizes do not divide."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size is None:
        return t.grad_accum_steps or 1
    if t.global_batch_size % per_step:
        raise ConfigError([Problem("train.global_batch_size", t.global_batch_size,
                                   f"must be a multiple of micro_batch_size x world size = {t.micro_batch_size} "
                                   f"x {world_size} = {per_step}; e.g. {per_step * max(1, t.global_batch_size // per_step)}",
                                   "recipe")])
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
        raise ConfigError([Problem("train.grad_accum_steps", t.grad_accum_steps,
                                   f"contradicts train.global_batch_size={t.global_batch_size} (which gives "
                                   f"{accum} at micro_batch_size {t.micro_batch_size} x {world_size} ranks); "
                                   "give only one of them", "recipe")])
    return accum
