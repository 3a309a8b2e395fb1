"""The typed recipe: one dataclass per section, strict keys, every problem reported at once.

`load_recipe(path, overrides)` reads YAML, applies `dotted.key=value` overrides (values parsed as YAML
scalars; `null` clears), converts to `Config`, runs the cross-field checks, and raises `ConfigError`
listing every problem. Nothing heavy is imported here: validation happens before any model is built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.typed import Converter, Problem, did_you_mean, to_dict


def doc(text: str, default: Any = None, **bounds: Any) -> Any:
    """A dataclass field with a one-line doc and optional bounds (min, max, gt)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": text, **bounds})
    return field(default=default, metadata={"doc": text, **bounds})


def section(cls: type, text: str) -> Any:
    return field(default_factory=cls, metadata={"doc": text})


Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    name_or_path: str | None = doc("hub id or local directory loaded with from_pretrained")
    config: dict[str, Any] | None = doc("architecture for from-scratch training, e.g. {model_type: llama, ...}")
    tokenizer: str | None = doc("tokenizer: hub id or directory, or 'byte' (built-in byte-level); "
                                "default: name_or_path")
    trust_remote_code: bool = doc("allow model code from the hub/directory to run", False)
    revision: str | None = doc("hub revision (branch, tag or commit)")
    gradient_checkpointing: bool = doc("recompute activations in backward (non-reentrant) to save memory", False)
    attn_implementation: str | None = doc("transformers attention backend (eager, sdpa, flash_attention_2)")


@dataclass
class DataConfig:
    source: str | None = doc("local file/dir or hub dataset name; 'builtin:python_stdlib' is the Python "
                             "standard library's source (no download)")
    format: Literal["text", "alpaca", "chat"] = doc(
        "text: pretraining on plain text / JSON-lines 'text'; alpaca: instruction/input/output; "
        "chat: 'messages' or ShareGPT 'conversations'", "text")
    text_field: str = doc("field holding the text in JSON rows (format: text)", "text")
    split: str = doc("dataset split to read (hub datasets)", "train")
    seq_len: int = doc("tokens per training sequence", 512, min=8)
    packing: bool = doc("concatenate examples into full seq_len blocks (always on for format: text)", True)
    chat_template: str | None = doc("chat template: null uses the tokenizer's, or 'chatml', or a Jinja string")
    eval_fraction: float = doc("fraction of documents held out for evaluation (0 = no eval split)", 0.0,
                               min=0.0, max=0.5)
    max_documents: int | None = doc("use at most this many documents (quick experiments)", None, min=1)
    max_bytes: int = doc("for builtin:python_stdlib: bytes of source to use", 4_000_000, min=10_000)


@dataclass
class TrainConfig:
    max_steps: int = doc("optimizer steps to run", 100, min=1)
    seed: int = doc("seed for weights init, data order and dropout", 0, min=0)
    micro_batch_size: int = doc("sequences per forward/backward on each rank", 8, min=1)
    grad_accum_steps: int | None = doc("micro-batches per optimizer step (or give global_batch_size)", None,
                                       min=1)
    global_batch_size: int | None = doc("sequences per optimizer step over all ranks", None, min=1)
    eval_every_steps: int = doc("evaluate every N steps (0 = never)", 0, min=0)
    eval_batches: int = doc("micro-batches per evaluation", 8, min=1)


@dataclass
class PrecisionConfig:
    dtype: Dtype = doc("fp32 | bf16 (autocast, fp32 master weights) | fp16 (autocast + loss scaling)", "fp32")
    master_weights: bool = doc("keep fp32 weights under bf16 (the default); false stores the model itself in "
                               "bf16: half the weight, gradient and optimizer memory, updates rounded to bf16 "
                               "(the GaLore paper's 7B setting)", True)
    initial_loss_scale: float = doc("fp16: starting loss scale", 65536.0, gt=0)
    loss_scale_growth_interval: int = doc("fp16: double the scale after this many clean steps", 2000, min=1)
    max_consecutive_skips: int = doc("fp16: stop with an error after this many overflowed steps in a row",
                                     25, min=1)


@dataclass
class GaloreConfig:
    rank: int = doc("rank of the projected gradient", 128, min=1)
    update_gap: int = doc("steps between projector refreshes (SVD)", 200, min=1)
    scale: float = doc("scale applied to the projected-back update", 0.25, gt=0)
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = doc("which side to project", "std")
    target_modules: list[str] | None = doc("module name patterns that get GaLore (default: attention and "
                                           "MLP projections)")
    svd: Literal["full", "randomized"] = doc("projector refresh: exact SVD or torch.svd_lowrank", "full")
    per_layer: bool = doc("update each weight inside backward and free its gradient at once", False)


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "sgd", "adamw8bit", "paged_adamw8bit", "galore_adamw", "galore_adamw8bit"] = doc(
        "optimizer", "adamw")
    lr: float = doc("peak learning rate", 3e-4, gt=0)
    weight_decay: float = doc("decoupled weight decay (not applied to biases and norms)", 0.0, min=0)
    betas: list[float] = doc("Adam betas", [0.9, 0.95])
    eps: float = doc("Adam epsilon", 1e-8, gt=0)
    momentum: float = doc("SGD momentum", 0.0, min=0)
    grad_clip: float | None = doc("clip gradients to this global norm (null = no clipping)", 1.0, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = doc("LR schedule after warmup", "cosine")
    warmup_steps: int = doc("linear warmup steps from 0 to lr", 0, min=0)
    min_lr_ratio: float = doc("final LR as a fraction of lr (linear, cosine)", 0.1, min=0, max=1)
    galore: GaloreConfig = section(GaloreConfig, "GaLore settings (optimizer.name: galore_*)")


@dataclass
class QuantConfig:
    type: Literal["nf4", "fp4", "int8"] = doc("base weight quantization", "nf4")
    double_quant: bool = doc("quantize the quantization constants too (saves ~0.37 bit/param)", True)
    compute_dtype: Literal["bf16", "fp16", "fp32"] = doc("dtype of the dequantized matmuls", "bf16")
    storage_dtype: Literal["uint8", "bf16", "fp16", "fp32"] = doc("container dtype of 4-bit weights "
                                                                  "(bf16 for ZeRO-3)", "uint8")


@dataclass
class AdapterConfig:
    type: Literal["none", "lora", "qlora"] = doc("none: full training; lora; qlora: LoRA over 4-bit base", "none")
    rank: int = doc("LoRA rank r", 16, min=1)
    alpha: float = doc("LoRA alpha (update scaled by alpha / rank)", 32.0, gt=0)
    dropout: float = doc("LoRA dropout", 0.0, min=0, max=1)
    target_modules: list[str] | str = doc("module names to adapt, or 'all-linear'", "all-linear")
    use_dora: bool = doc("weight-decomposed LoRA (DoRA)", False)
    quant: QuantConfig = section(QuantConfig, "quantization of the base model (qlora)")


@dataclass
class DistributedConfig:
    engine: Literal["native", "deepspeed"] = doc("native: single process / DDP; deepspeed: ZeRO", "native")
    zero_stage: int = doc("DeepSpeed ZeRO stage 0-3", 0, min=0, max=3)
    offload_optimizer: Literal["none", "cpu"] = doc("DeepSpeed: keep optimizer state in CPU memory", "none")
    offload_params: Literal["none", "cpu"] = doc("DeepSpeed ZeRO-3: keep parameters in CPU memory", "none")
    deepspeed_overrides: dict[str, Any] = doc("expert: merged last into the generated DeepSpeed config", {})
    backend: Literal["auto", "gloo", "nccl"] = doc("torch.distributed backend (auto: nccl on GPU, else gloo)",
                                                   "auto")
    timeout_s: int = doc("collective timeout in seconds", 1800, min=10)


@dataclass
class CheckpointConfig:
    every_steps: int = doc("save every N optimizer steps (0 = only at the end)", 0, min=0)
    keep_last: int = doc("keep this many newest complete checkpoints", 2, min=1)
    resume: str = doc("auto (newest complete checkpoint in output_dir) | never | PATH", "auto")
    save_final: bool = doc("save a checkpoint when the run ends", True)


@dataclass
class WandbConfig:
    project: str | None = doc("wandb project (null = no wandb)")
    entity: str | None = doc("wandb entity (team)")
    name: str | None = doc("run name (default: the output directory's name)")
    mode: Literal["online", "offline", "disabled"] = doc("wandb mode", "online")
    tags: list[str] = doc("run tags", [])


@dataclass
class LoggingConfig:
    every_steps: int = doc("write a metrics row every N steps", 1, min=1)
    progress_bar: bool = doc("show a progress bar on rank 0", True)
    plot: bool = doc("write loss.png (loss and LR) in output_dir at the end", True)
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases")


@dataclass
class Config:
    output_dir: str = doc("where metrics, checkpoints and the resolved recipe go", "runs/default")
    model: ModelConfig = section(ModelConfig, "the model")
    data: DataConfig = section(DataConfig, "the training data")
    train: TrainConfig = section(TrainConfig, "steps, batch sizes, seed, evaluation")
    precision: PrecisionConfig = section(PrecisionConfig, "numeric precision")
    optimizer: OptimizerConfig = section(OptimizerConfig, "optimizer and LR schedule")
    adapter: AdapterConfig = section(AdapterConfig, "LoRA / QLoRA adapters")
    distributed: DistributedConfig = section(DistributedConfig, "engine and parallelism")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints and resume")
    logging: LoggingConfig = section(LoggingConfig, "progress bar, metrics.jsonl, wandb")


class ConfigError(Exception):
    """A recipe with problems; str() is the one-screen message shown to the user."""

    def __init__(self, problems: list[Problem], origin: str = "recipe") -> None:
        self.problems = problems
        self.origin = origin
        lines = [f"{origin} has {len(problems)} problem{'s' if len(problems) != 1 else ''}:"]
        lines += [f"  - {p.render()}" for p in problems]
        super().__init__("\n".join(lines))


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[Problem]]:
    """`a.b=value` strings to {dotted key: YAML value}."""
    parsed: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(item, None, "an override must look like section.key=value "
                                    "(e.g. train.max_steps=50)", "command line"))
            continue
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed[key] = raw
    return parsed, problems


def _apply(raw: dict[str, Any], key: str, value: Any, problems: list[Problem]) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(Problem(key, value, f"'{'.'.join(parts[:i + 1])}' is not a section", "command line"))
            return
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> tuple[dict[str, Any], list[Problem]]:
    p = Path(path)
    if not p.is_file():
        return {}, [Problem("recipe", str(path), "file not found; give the path of a YAML recipe "
                            "(e.g. recipes/quickstart.yaml)", "command line")]
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return {}, [Problem("recipe", str(path), f"not valid YAML{where}: {getattr(e, 'problem', e)}", "file")]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return {}, [Problem("recipe", str(path), "the top level must be a mapping of sections", "file")]
    return data, []


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read, override, type-check and cross-check a recipe; raise ConfigError with every problem."""
    raw, problems = read_yaml(path) if path is not None else ({}, [])
    parsed, more = parse_overrides(overrides or [])
    problems += more
    for key, value in parsed.items():
        _apply(raw, key, value, problems)
    conv = Converter({k: "command line" for k in parsed})
    cfg = conv.build(Config, raw, "")
    problems += conv.problems
    from trainer.checks import cross_check  # the cross-field rules live in their own room

    # A key with a type problem fell back to its default: cross-checking it again would only add noise.
    reported = {p.key for p in problems}
    problems += [p for p in cross_check(cfg, conv.source) if p.key not in reported]
    if problems:
        raise ConfigError(problems, f"recipe {path}" if path else "recipe")
    return cfg


def dump_recipe(cfg: Config) -> str:
    """The resolved recipe as YAML (written to output_dir/config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


__all__ = ["Config", "ConfigError", "load_recipe", "dump_recipe", "did_you_mean"]
