"""The recipe's schema: pure declarations of every section and key, with types, bounds, defaults, one-line docs and
resume rules. Nothing here reads a file, the environment or a model; nothing heavy is imported (pydantic only).

Each section is a strict pydantic model: unknown keys are errors, a string is never silently turned into a
number (except YAML 1.1's `3e-4`, which PyYAML reads as a string: number fields accept it), and every default is
declared here. `recipe.py` reads YAML and overrides into a `Recipe` and turns pydantic's errors into the
one-screen problems users see; `resolve.py` adds what needs the world size or the environment.

Resume rules (field metadata `resume`): `must_match` settings change what the run computes, so a checkpoint
saved under other values cannot be continued; `allowed` changes are logged on resume; `ignored` ones (where
outputs go, checkpoint policy) are not compared. A section's rule applies to every key inside it that does not
set its own.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Iterator, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.fields import FieldInfo

Resume = Literal["must_match", "allowed", "ignored"]


def _yaml_number(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads `3e-4` as a string; a number field takes it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[float, BeforeValidator(_yaml_number)]  # finite: Section sets allow_inf_nan=False

MAX_INT = 2**63 - 1  # the largest int64: what torch tensors, numpy and the C code under them hold
Integer = Annotated[int, Field(le=MAX_INT)]  # a key with a bound of its own (setting(le=...)) stays a plain int:
# the bound inside Annotated would replace it


def _plain_numbers(value: dict[str, Any]) -> dict[str, Any]:
    """A free mapping (model.config, model.rope_scaling, distributed.deepspeed_overrides) holds no inf or nan and
    no integer beyond 64 bits at any depth: its values reach a model's config, tensors and DeepSpeed's C++."""
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in value.items()]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}", v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{path} is {item}: must be a finite number")
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT:
            raise ValueError(f"{path} is an integer of {len(str(abs(item)))} digits: at most {MAX_INT:,} (64 bits)")
    return value


FreeMapping = Annotated[dict[str, Any], AfterValidator(_plain_numbers)]


def _packing(value: Any) -> Any:
    """data.packing: true and false, as recipes wrote them before the modes, mean auto and none."""
    return {True: "auto", False: "none"}.get(value, value) if isinstance(value, bool) else value


DataFormat = Literal["text", "alpaca", "chat", "preference", "kto"]
PREFERENCE_FORMATS = ("preference", "kto")  # one sample is a pair of sequences, or one completion with its label
Packing = Annotated[Literal["auto", "isolated", "concat", "none"], BeforeValidator(_packing)]
Dtype = Literal["fp32", "bf16", "fp16"]
TileCount = Annotated[int, Field(ge=1, le=MAX_INT)] | Literal["auto"]


def setting(doc: str, default: Any = None, *, resume: Resume | None = None, **bounds: Any) -> Any:
    """A key: its default, one-line doc, bounds (ge, le, gt) and, where it differs from its section's, its
    resume rule."""
    extra: dict[str, Any] | None = {"resume": resume} if resume else None
    return Field(default, description=doc, json_schema_extra=extra, **bounds)


def section(cls: type[BaseModel], doc: str, *, resume: Resume | None = None) -> Any:
    extra: dict[str, Any] | None = {"resume": resume} if resume else None
    return Field(default_factory=cls, description=doc, json_schema_extra=extra)


class Section(BaseModel):
    """A recipe section: strict types, no unknown keys, immutable once read, numbers finite (no inf or nan)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ModelConfig(Section):
    name_or_path: str | None = setting("hub id or local directory loaded with from_pretrained",
                                       resume="must_match")
    config: FreeMapping | None = setting("architecture for from-scratch training, e.g. {model_type: llama, ...}",
                                         resume="must_match")
    tokenizer: str | None = setting("tokenizer: hub id or directory, or 'byte' (built-in byte-level); default: "
                                    "name_or_path", resume="must_match")
    trust_remote_code: bool = setting("allow model code from the hub/directory to run", False)
    revision: str | None = setting("hub revision (branch, tag or commit)")
    gradient_checkpointing: bool = setting("recompute activations in backward (non-reentrant) to save memory",
                                           False)
    activation_offload: bool = setting("move the activations saved for backward to pinned CPU memory during the "
                                       "forward, prefetched back one layer ahead in backward: with gradient "
                                       "checkpointing each layer's input, without it every saved activation",
                                       False)
    attn_implementation: str | None = setting("transformers attention backend (eager, sdpa, flash_attention_2)")
    head_in_loss: bool = setting("compute the LM head inside the chunked loss, a chunk of tokens at a time, so the "
                                 "whole sequence's full-vocabulary logits never exist (long sequences; not with "
                                 "ZeRO-3)", False)
    tiled_mlp: TileCount = setting("compute each layer's MLP in this many tiles along the sequence, each "
                                   "recomputed in backward, so only one tile's intermediate activations exist at a "
                                   "time (1: untiled; auto: tiles of about hidden_size tokens)", 1)
    rope_scaling: FreeMapping | None = setting("RoPE scaling applied on top of the model's own, to train longer "
                                               "sequences than max_position_embeddings, e.g. {rope_type: linear, "
                                               "factor: 2.0}", resume="must_match")


class SourceEntry(Section):
    """One source of a mixture (data.sources); unset keys take data's own."""

    source: str = setting("local file/dir, hub dataset name, or builtin:shakespeare / builtin:python_stdlib")
    weight: Number = setting("share of the training samples drawn from this source", 1.0, gt=0)
    format: DataFormat | None = setting("this source's format (null: data.format)")
    text_field: str | None = setting("field holding the text (null: data.text_field)")
    split: str | None = setting("split (null: data.split)")
    max_documents: Integer | None = setting("use at most this many rows of it", None, ge=1)


class DataConfig(Section):
    source: str | None = setting("local file/dir (.txt, .json, .jsonl, .parquet, or a datasets save_to_disk folder) "
                                 "or hub dataset name; built in (no download): 'builtin:shakespeare' (the works of "
                                 "Shakespeare, shipped), 'builtin:python_stdlib' (this Python's standard library "
                                 "source)", resume="must_match")
    sources: list[SourceEntry] | None = setting("a mixture instead of data.source: [{source, weight, format, ...}], "
                                                "sampled by weight within each epoch", resume="must_match")
    format: DataFormat = setting(
        "text: pretraining on plain text / JSON-lines 'text'; alpaca: instruction/input/output; "
        "chat: 'messages' or ShareGPT 'conversations'; preference: pairs (prompt/chosen/rejected as text or messages, "
        "or conversations + chosen/rejected); kto: prompt/completion/label rows", "text", resume="must_match")
    text_field: str = setting("field holding the text in JSON rows (format: text)", "text", resume="must_match")
    split: str = setting("dataset split to read (hub datasets, save_to_disk folders)", "train", resume="must_match")
    revision: str | None = setting("hub dataset revision (a branch, tag or commit; pin a commit for a store that "
                                   "never goes stale silently)", resume="must_match")
    seq_len: Integer = setting("tokens per training sequence", 512, ge=8, resume="must_match")
    packing: Packing = setting("auto (isolated for alpaca/chat, concat for text) | isolated (whole examples per "
                               "block, attention and positions confined to each: the loss of one-by-one) | concat "
                               "(examples run into each other, as plain text) | none (one example per sample, "
                               "padded); true = auto, false = none", "auto", resume="must_match")
    document_mask: bool = setting("plain text: confine attention and positions to each document inside a block "
                                  "(as Llama 3 was trained)", False, resume="must_match")
    chat_template: str | None = setting("chat template: null uses the tokenizer's, or 'chatml', or a Jinja string",
                                        resume="must_match")
    too_long: Literal["drop", "truncate", "error"] = setting(
        "alpaca/chat: an example longer than seq_len is dropped (counted and reported with file and row), truncated "
        "(its end-of-turn marker kept last; the tokens cut are reported) or an error naming the row", "drop",
        resume="allowed")
    eval_fraction: float = setting("fraction of documents held out for evaluation (0 = no eval split)", 0.0,
                                   ge=0.0, le=0.5, resume="must_match")
    max_documents: Integer | None = setting("use at most this many documents (quick experiments)", None, ge=1,
                                            resume="must_match")
    max_bytes: Integer = setting("for the built-in sources (builtin:...): bytes of text to use", 4_000_000,
                                 ge=10_000, resume="must_match")
    cache_dir: str | None = setting("where token stores live (null: $TRAINER_DATA_CACHE, else "
                                    "~/.cache/trainer/data)", resume="ignored")
    num_proc: int | None = setting("processes that tokenize when a store is built (null: the CPU count)", None,
                                   ge=1, le=4096, resume="ignored")


class TrainConfig(Section):
    max_steps: Integer = setting("optimizer steps to run", 100, ge=1)
    seed: Integer = setting("seed for weights init, data order and dropout", 0, ge=0, resume="must_match")
    micro_batch_size: Integer = setting("sequences per forward/backward on each rank", 8, ge=1, resume="must_match")
    grad_accum_steps: Integer | None = setting("micro-batches per optimizer step (or give global_batch_size)", None,
                                               ge=1)
    global_batch_size: Integer | None = setting("sequences per optimizer step over all ranks", None, ge=1)
    eval_every_steps: Integer = setting("evaluate every N steps (0 = never)", 0, ge=0)
    eval_batches: Integer = setting("micro-batches per evaluation", 8, ge=1)
    max_nonfinite_steps: Integer = setting("steps with a NaN/inf loss or gradient norm to skip before the run stops "
                                           "(0: stop at the first, before its update; fp16 overflows follow "
                                           "precision.max_consecutive_skips instead)", 0, ge=0)


ObjectiveName = Literal["sft", "dpo", "simpo", "orpo", "kto"]
PAIRED_OBJECTIVES = ("dpo", "simpo", "orpo")  # trained on data.format: preference
REFERENCE_OBJECTIVES = ("dpo", "kto")  # compare the policy with a reference model


class ObjectiveConfig(Section):
    name: ObjectiveName = setting("sft: next-token loss on the data; dpo | simpo | orpo: preference pairs "
                                  "(data.format: preference); kto: labelled completions (data.format: kto)", "sft")
    beta: Number | None = setting("strength of the preference (null: 0.1 for dpo and kto, 2.0 for simpo); orpo has "
                                  "none", None, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = setting("dpo: sigmoid (the paper's), ipo (squared, towards a "
                                                            "margin of 1/(2 beta)) or hinge (SLiC)", "sigmoid")
    label_smoothing: Number = setting("dpo sigmoid and simpo: the assumed share of flipped labels (conservative "
                                      "DPO)", 0.0, ge=0, lt=0.5)
    simpo_gamma: Number = setting("simpo: the target reward margin gamma", 0.5, ge=0)
    orpo_lambda: Number = setting("orpo: weight of the odds-ratio loss beside the chosen response's NLL", 0.1, gt=0)
    kto_desirable_weight: Number = setting("kto: weight of the desirable completions' loss", 1.0, gt=0)
    kto_undesirable_weight: Number = setting("kto: weight of the undesirable completions' loss", 1.0, gt=0)
    reference: Literal["auto", "adapters_disabled", "stored"] = setting(
        "dpo, kto: where the reference log-probs come from: auto is adapters_disabled for LoRA/QLoRA (the base, "
        "adapters off, in the same model: no copy) and stored for full training (computed once before the first "
        "step and kept beside the token store, memory-mapped, keyed by the reference model)", "auto")

    @property
    def preference(self) -> bool:
        return self.name != "sft"

    @property
    def beta_value(self) -> float:
        """beta, or the objective's own default."""
        return self.beta if self.beta is not None else (2.0 if self.name == "simpo" else 0.1)


class PrecisionConfig(Section):
    dtype: Dtype = setting("fp32 | bf16 (autocast, fp32 master weights) | fp16 (autocast + loss scaling)", "fp32",
                           resume="must_match")
    master_weights: bool = setting("keep fp32 weights under bf16 (the default); false stores the model itself in "
                                   "bf16: half the weight, gradient and optimizer memory, updates rounded to bf16 "
                                   "(the GaLore paper's 7B setting)", True, resume="must_match")
    initial_loss_scale: Number = setting("fp16: starting loss scale", 65536.0, gt=0, le=2.0**32)
    loss_scale_growth_interval: Integer = setting("fp16: double the scale after this many clean steps", 2000, ge=1)
    max_consecutive_skips: Integer = setting("fp16: stop with an error after this many overflowed steps in a row", 25,
                                             ge=1)
    weights: Literal["float", "int8"] = setting("storage of the GaLore/APOLLO target weights: float (per dtype and "
                                                "master_weights) or int8 (per-row scales, updated with stochastic "
                                                "rounding; Q-GaLore)", "float", resume="must_match")


class GaloreConfig(Section):
    rank: Integer = setting("rank of the projected gradient", 128, ge=1, resume="must_match")
    update_gap: Integer = setting("steps between projector refreshes (SVD)", 200, ge=1)
    scale: Number = setting("scale applied to the projected-back update", 0.25, gt=0)
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = setting("which side to project", "std",
                                                                               resume="must_match")
    target_modules: list[str] | None = setting("module name patterns that get GaLore (default: attention and MLP "
                                               "projections)", resume="must_match")
    svd: Literal["full", "randomized", "subspace"] = setting(
        "projector refresh: exact SVD, torch.svd_lowrank, or subspace iteration from the previous projector (full "
        "SVD first and when the subspace moved too much)", "full")
    per_layer: bool = setting("update each weight inside backward and free its gradient at once", False,
                              resume="must_match")


class ApolloConfig(Section):
    rank: Integer | None = setting("rank of the random projection (null: 256 for apollo_adamw, 1 for apollo_mini)",
                                   None, ge=1, resume="must_match")
    scale_type: Literal["channel", "tensor"] | None = setting(
        "learning-rate scale per channel (of the larger side; a square matrix's rows) or per tensor (null: channel "
        "for apollo_adamw, tensor for apollo_mini)", None)
    update_gap: Integer = setting("steps between new random projections (a new seed)", 200, ge=1)
    scale: Number | None = setting("alpha, multiplies the update (null: 1 for apollo_adamw, sqrt(128) for "
                                   "apollo_mini; apollo-torch's scale is alpha squared)", None, gt=0)
    norm_growth_limit: Number | None = setting("the update's norm, measured before Adam's bias correction, grows "
                                               "at most this factor per step (Fira's limiter; null: off)", 1.01, ge=1)
    target_modules: list[str] | None = setting("module name patterns that get APOLLO (default: attention and MLP "
                                               "projections)", resume="must_match")
    per_layer: bool = setting("update each weight inside backward and free its gradient at once", False,
                              resume="must_match")


OptimizerName = Literal["adamw", "sgd", "adamw8bit", "paged_adamw8bit", "galore_adamw", "galore_adamw8bit",
                        "apollo_adamw", "apollo_mini"]
LOW_RANK = ("galore_adamw", "galore_adamw8bit", "apollo_adamw", "apollo_mini")  # the low-rank-state family


class OptimizerConfig(Section):
    name: OptimizerName = setting("optimizer", "adamw", resume="must_match")
    lr: Number = setting("peak learning rate", 3e-4, gt=0)
    weight_decay: Number = setting("decoupled weight decay (not applied to biases and norms)", 0.0, ge=0)
    betas: list[Number] = setting("Adam betas", [0.9, 0.95])
    eps: Number = setting("Adam epsilon", 1e-8, gt=0)
    momentum: Number = setting("SGD momentum", 0.0, ge=0)
    grad_clip: Number | None = setting("clip gradients to this global norm (null = no clipping)", 1.0, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = setting("LR schedule after warmup", "cosine")
    warmup_steps: Integer = setting("linear warmup steps from 0 to lr", 0, ge=0)
    min_lr_ratio: Number = setting("final LR as a fraction of lr (linear, cosine)", 0.1, ge=0, le=1)
    galore: GaloreConfig = section(GaloreConfig, "GaLore settings (optimizer.name: galore_*)")
    apollo: ApolloConfig = section(ApolloConfig, "APOLLO settings (optimizer.name: apollo_adamw, apollo_mini)")

    @property
    def low_rank(self) -> GaloreConfig | ApolloConfig | None:
        """The section of the low-rank-state optimizer this recipe names (GaLore or APOLLO), else None."""
        if self.name not in LOW_RANK:
            return None
        return self.apollo if self.name.startswith("apollo") else self.galore

    @property
    def low_rank_key(self) -> str:
        """Where that section's keys live: optimizer.galore or optimizer.apollo."""
        return "optimizer.apollo" if self.name.startswith("apollo") else "optimizer.galore"

    @property
    def per_layer(self) -> bool:
        """Per-layer updates (weights updated inside backward) are on."""
        return self.low_rank is not None and self.low_rank.per_layer


class QuantConfig(Section):
    type: Literal["nf4", "fp4", "int8"] = setting("base weight quantization", "nf4")
    double_quant: bool = setting("quantize the quantization constants too (saves ~0.37 bit/param)", True)
    compute_dtype: Literal["bf16", "fp16", "fp32"] = setting("dtype of the dequantized matmuls", "bf16")
    storage_dtype: Literal["auto", "uint8", "bf16", "fp16", "fp32"] = setting(
        "container dtype of the packed 4-bit weights (the values are the same in any): auto is compute_dtype under "
        "DeepSpeed ZeRO-3, which partitions them as tensors of that dtype, else uint8", "auto", resume="allowed")


class AdapterConfig(Section):
    type: Literal["none", "lora", "qlora"] = setting("none: full training; lora; qlora: LoRA over 4-bit base",
                                                     "none")
    rank: Integer = setting("LoRA rank r", 16, ge=1)
    alpha: Number = setting("LoRA alpha (update scaled by alpha / rank)", 32.0, gt=0)
    dropout: Number = setting("LoRA dropout", 0.0, ge=0, le=1)
    target_modules: list[str] | str = setting("module names to adapt, or 'all-linear'", "all-linear")
    use_dora: bool = setting("weight-decomposed LoRA (DoRA)", False)
    target_experts: bool = setting("mixture-of-experts models: LoRA on every expert's projections too (the experts "
                                   "are frozen either way, and 4-bit under qlora); false adapts attention and dense "
                                   "layers only", False)
    quant: QuantConfig = section(QuantConfig, "quantization of the base model (qlora)")


class DistributedConfig(Section):
    engine: Literal["native", "deepspeed"] = setting("native: single process / DDP; deepspeed: ZeRO", "native",
                                                     resume="must_match")
    zero_stage: int = setting("ZeRO stage 0-3 (native: 0 or 1)", 0, ge=0, le=3, resume="must_match")
    offload_optimizer: Literal["none", "cpu"] = setting("DeepSpeed: keep optimizer state in CPU memory", "none")
    offload_params: Literal["none", "cpu"] = setting("DeepSpeed ZeRO-3: keep parameters in CPU memory", "none")
    deepspeed_overrides: FreeMapping = setting("expert: merged last into the generated DeepSpeed config", {})
    backend: Literal["auto", "gloo", "nccl"] = setting("torch.distributed backend (auto: nccl on GPU, else gloo)",
                                                       "auto")
    timeout_s: int = setting("collective timeout in seconds", 1800, ge=10, le=365 * 24 * 3600)
    sequence_parallel: Integer = setting("DeepSpeed: ranks that share each sequence, each holding seq_len / N "
                                         "tokens (Ulysses: attention heads exchanged for tokens by all-to-all); "
                                         "data parallel groups = world size / N", 1, ge=1)


class CheckpointConfig(Section):
    every_steps: Integer = setting("save every N optimizer steps (0 = only at the end)", 0, ge=0)
    keep_last: Integer = setting("keep this many newest complete checkpoints", 2, ge=1)
    resume: str = setting("auto (newest complete checkpoint in output_dir) | never | PATH", "auto")
    save_final: bool = setting("save a checkpoint when the run ends", True)
    allow_data_change: bool = setting("resume even when the data's content differs from what the checkpoint was "
                                      "trained on (logged as a warning with both identities); false refuses", False)
    full_weights: bool | None = setting("DeepSpeed: also write the whole fp32 weights gathered on rank 0 "
                                        "(model.safetensors; export can consolidate them from the shards without "
                                        "it); null = auto: on for ZeRO-1/2, off for ZeRO-3; the native engine "
                                        "always writes them", None, resume="allowed")


class WandbConfig(Section):
    project: str | None = setting("wandb project (null = no wandb)")
    entity: str | None = setting("wandb entity (team)")
    name: str | None = setting("run name (default: the output directory's name)")
    mode: Literal["online", "offline", "disabled"] = setting("wandb mode", "online")
    tags: list[str] = setting("run tags", [])
    require_online: bool = setting("fail instead of logging offline when wandb has no API key or cannot reach its "
                                   "server", False)
    init_timeout_s: int = setting("seconds wandb may take to start a run online (a server that does not answer) "
                                  "before the run logs offline instead", 30, ge=1, le=3600)


class LoggingConfig(Section):
    every_steps: Integer = setting("write a metrics row every N steps", 1, ge=1)
    progress_bar: bool = setting("show a progress bar on rank 0", True)
    plot: bool = setting("write loss.png (loss and LR) in output_dir at the end", True)
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases")


class Recipe(Section):
    """A whole recipe: what `python -m trainer train RECIPE` runs."""

    output_dir: str = setting("where metrics, checkpoints and the resolved recipe go", "runs/default",
                              resume="ignored")
    model: ModelConfig = section(ModelConfig, "the model")
    data: DataConfig = section(DataConfig, "the training data")
    train: TrainConfig = section(TrainConfig, "steps, batch sizes, seed, evaluation")
    objective: ObjectiveConfig = section(ObjectiveConfig, "what is trained: next-token loss or a preference loss",
                                         resume="must_match")
    precision: PrecisionConfig = section(PrecisionConfig, "numeric precision")
    optimizer: OptimizerConfig = section(OptimizerConfig, "optimizer and LR schedule")
    adapter: AdapterConfig = section(AdapterConfig, "LoRA / QLoRA adapters", resume="must_match")
    distributed: DistributedConfig = section(DistributedConfig, "engine and parallelism")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints and resume", resume="ignored")
    logging: LoggingConfig = section(LoggingConfig, "progress bar, metrics.jsonl, wandb")


# ------------------------------------------------------------------------------------------- introspection

def _section_class(info: FieldInfo) -> type[Section] | None:
    annotation = info.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _rule(info: FieldInfo) -> Resume | None:
    extra = info.json_schema_extra
    return extra.get("resume") if isinstance(extra, dict) else None  # type: ignore[return-value]


def walk_keys(cls: type[Section] = Recipe, prefix: str = "", inherited: Resume = "allowed"
              ) -> Iterator[tuple[str, FieldInfo, Resume]]:
    """Every leaf key of the schema as (dotted key, field, resume rule), in declaration order."""
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        rule = _rule(info) or inherited
        sub = _section_class(info)
        if sub is None:
            yield key, info, rule
        else:
            yield from walk_keys(sub, key + ".", rule)


def resume_rules() -> dict[str, Resume]:
    """{dotted leaf key: its resume rule}, from the schema."""
    return {key: rule for key, _, rule in walk_keys()}


def field_at(key: str) -> FieldInfo | None:
    """The field of a dotted key (a leaf or a section), or None when the schema has no such key."""
    cls: type[Section] | None = Recipe
    info = None
    for part in key.split("."):
        if cls is None or part not in cls.model_fields:
            return None
        info = cls.model_fields[part]
        cls = _section_class(info)
    return info


def section_keys(cls: type[Section]) -> list[str]:
    return list(cls.model_fields)
