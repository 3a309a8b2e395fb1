"""Recipe + world size + environment -> one frozen `ResolvedRun`: every derived value computed once, here.

What is derived: gradient accumulation from `train.global_batch_size` and the world size (or the global batch
from `train.grad_accum_steps`), the architecture (trainer/recipe/architecture.py: the recipe's dict, a local directory,
the hub cache, the table of known models), the vocabulary size, and the output directory (checked, and for
training created and probed for writing). The plan, the DeepSpeed config, the data, the engines and the loop read
the `ResolvedRun`; none of them recomputes these.

What is checked, all at once with the type problems of recipe.py: the cross-field rules (rules.py), the paths the
recipe names, the batch sizes at this world size, and the rules that need the architecture (sequence length vs
positions, vocabulary vs tokenizer, adapter and GaLore target names). Lower rooms raise ValueError about their
own arguments; here they become problems naming the recipe key, its value, where it came from, and the fix.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.recipe import architecture as arch
from trainer.errors import ConfigError, HubError, Problem
from trainer.recipe.execution import execution_of
from trainer.paths import looks_local
from trainer.recipe.read import COMMAND_LINE, Sources, load_recipe
from trainer.recipe.resolved import ResolvedRun
from trainer.recipe.rules import cross_check, warnings_of
from trainer.recipe.schema import Recipe, TrainConfig


# ---------------------------------------------------------------------------------------------- batch

def accumulation(train: TrainConfig, world_size: int, src: Sources = Sources(),
                 sequence_parallel: int = 1) -> tuple[int, list[Problem]]:
    """Micro-batches per optimizer step on each rank at this world size (of data-parallel groups, under sequence
    parallelism), and the problems when the sizes do not divide or contradict each other."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size is None:
        return train.grad_accum_steps or 1, []
    if train.global_batch_size % per_step:
        nearest = per_step * max(1, round(train.global_batch_size / per_step))
        whole = world_size * sequence_parallel
        ranks = "world size" if sequence_parallel == 1 else \
            f"data-parallel groups (world size {whole} / sequence_parallel {sequence_parallel})"
        return 1, [Problem("train.global_batch_size", train.global_batch_size, f"must be a multiple of "
                           f"micro_batch_size x {ranks} = {train.micro_batch_size} x {world_size} = {per_step}; "
                           f"e.g. {nearest}", src("train.global_batch_size"))]
    accum = train.global_batch_size // per_step
    if train.grad_accum_steps is not None and train.grad_accum_steps != accum:
        return accum, [Problem("train.grad_accum_steps", train.grad_accum_steps, f"contradicts "
                               f"train.global_batch_size={train.global_batch_size} (which gives {accum} at "
                               f"micro_batch_size {train.micro_batch_size} x {world_size} ranks); give only one of "
                               "them", src("train.grad_accum_steps"))]
    return accum, []


def command_line_batch_wins(recipe: Recipe, src: Sources) -> Recipe:
    """`train.global_batch_size` or `train.grad_accum_steps` given on the command line replaces the other one in
    the recipe file (`train.global_batch_size=64` over a recipe saying `grad_accum_steps: 4`, as a resume on
    another number of ranks needs), instead of contradicting it."""
    given = {k for k in ("global_batch_size", "grad_accum_steps") if src(f"train.{k}") == COMMAND_LINE}
    if len(given) != 1:
        return recipe
    other = ({"global_batch_size", "grad_accum_steps"} - given).pop()
    if getattr(recipe.train, other) is None:
        return recipe
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={other: None})})


# ---------------------------------------------------------------------------------------------- paths

def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_dir_problems(value: str, src: Sources) -> list[Problem]:
    """Whether output_dir is (or can become) a writable directory, without creating it."""
    path = Path(value).expanduser()
    where = src("output_dir")
    if path.exists() and not path.is_dir():
        return [Problem("output_dir", value, "exists and is not a directory; choose another output_dir", where)]
    if path.exists() and not os.access(path, os.W_OK | os.X_OK):
        return [Problem("output_dir", value, "is not writable by this user; choose another output_dir or fix its "
                        "permissions", where)]
    ancestor = _nearest_existing(path)
    if not path.exists() and not ancestor.is_dir():
        return [Problem("output_dir", value, f"cannot be created: {ancestor} is a file, not a directory; choose "
                        "another output_dir", where)]
    if not path.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        return [Problem("output_dir", value, f"cannot be created: no write permission in {ancestor}; choose "
                        "another output_dir", where)]
    return []


def make_output_dir(value: str, src: Sources) -> list[Problem]:
    """Create output_dir and prove a file can be written there (a read-only or full filesystem, or a place even
    root cannot write, such as /proc, fails here rather than at the first checkpoint)."""
    path = Path(value).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        return [Problem("output_dir", value, f"cannot be created or written ({e.strerror or e}); choose another "
                        "output_dir", src("output_dir"))]
    return []


def _path_problems(r: Recipe, src: Sources) -> list[Problem]:
    """Local paths the recipe names must exist (hub names are checked when they are loaded)."""
    m, d, out = r.model, r.data, []
    if m.name_or_path and looks_local(m.name_or_path) and not Path(m.name_or_path).expanduser().is_dir():
        out.append(Problem("model.name_or_path", m.name_or_path, "local model directory not found; check the path "
                           "(or give a hub id like org/name)", src("model.name_or_path")))
    if m.tokenizer and m.tokenizer != "byte" and looks_local(m.tokenizer) \
            and not Path(m.tokenizer).expanduser().exists():
        out.append(Problem("model.tokenizer", m.tokenizer, "tokenizer directory not found; give 'byte', an existing "
                           "directory or a hub id", src("model.tokenizer")))
    named = [("data.source", d.source)] if d.source else []
    named += [(f"data.sources[{i}].source", e.source) for i, e in enumerate(d.sources or [])]
    for key, source in named:
        if not source.startswith("builtin:") and looks_local(source) and not Path(source).expanduser().exists():
            out.append(Problem(key, source, "file or directory not found; check the path",
                               src("data.sources" if "[" in key else key)))
    resume = r.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).expanduser().is_dir():
        out.append(Problem("checkpoint.resume", resume, "not auto, never, or an existing checkpoint folder / run "
                           "directory; check the path", src("checkpoint.resume")))
    return out


# ---------------------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class Vocabulary:
    """What validation needs of the tokenizer: its size and its special token ids (None where it has none)."""

    size: int
    special_ids: dict[str, int | None]


def _vocabulary_of(tok: Any) -> Vocabulary:
    return Vocabulary(len(tok), {name: getattr(tok, name) for name in arch.SPECIAL_IDS})


def _tokenizer_vocabulary(r: Recipe, src: Sources, *, needed: bool) -> tuple[Vocabulary | None, list[Problem]]:
    """The tokenizer's size and special ids: the byte tokenizer's, or a tokenizer found locally (a directory or the
    hub cache). When `needed` (nothing else sizes the vocabulary) the network is tried too, and failing is a
    problem; otherwise an unavailable tokenizer gives None and the checks that need it wait for the build."""
    from trainer.model.tokenizer import BYTE_SPECIAL_IDS, BYTE_VOCAB_SIZE, build_tokenizer

    if r.model.tokenizer == "byte":
        return Vocabulary(BYTE_VOCAB_SIZE, dict(BYTE_SPECIAL_IDS)), []
    try:
        return _vocabulary_of(build_tokenizer(r.model, local_files_only=True)), []
    except (OSError, ValueError):
        if not needed:
            return None, []
    try:
        return _vocabulary_of(build_tokenizer(r.model)), []
    except HubError as e:
        return None, [Problem("model.tokenizer", r.model.tokenizer or r.model.name_or_path, f"cannot be loaded: {e}",
                              src("model.tokenizer"))]
    except (OSError, ValueError) as e:
        return None, [Problem("model.tokenizer", r.model.tokenizer or r.model.name_or_path, f"cannot be loaded "
                              f"({str(e).splitlines()[0][:160]}); give a local directory, 'byte', or a reachable hub "
                              "id", src("model.tokenizer"))]


def _special_id_problems(config: dict[str, Any], rows: int, src: Sources) -> list[Problem]:
    """A special token id the recipe sets itself must name a row of the embeddings (an id past them fails inside
    the model, e.g. as an embedding's padding_idx)."""
    out = []
    for name in arch.SPECIAL_IDS:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < rows:
            out.append(Problem(f"model.config.{name}", value, f"outside the vocabulary of {rows} tokens (ids 0 to "
                               f"{rows - 1}); remove it (the tokenizer's own id is used) or give an id below {rows}",
                               src("model.config")))
    return out


def _architecture(r: Recipe, src: Sources) -> tuple[Any, str, int | None, list[Problem]]:
    """(config, where it came from, tokenizer size if known, problems)."""
    m = r.model
    if m.config is not None:
        given = m.config.get("vocab_size")
        vocabulary, problems = _tokenizer_vocabulary(r, src, needed=given is None)
        size = vocabulary.size if vocabulary else None
        if given is None and size is None:
            return None, "recipe", None, problems + [Problem(
                "model.config.vocab_size", None, "the tokenizer cannot be loaded to size the vocabulary; set "
                "model.config.vocab_size", src("model.config"))]
        if given is not None and size is not None and given < size:
            return None, "recipe", size, [Problem("model.config.vocab_size", given, f"smaller than the tokenizer's "
                                                  f"{size} tokens; remove it (it defaults to the tokenizer's size) "
                                                  f"or set >= {size}", src("model.config"))]
        rows = given or size
        assert rows is not None  # one of them was found (checked above)
        wrong_ids = _special_id_problems(m.config, rows, src)
        if wrong_ids:
            return None, "recipe", size, wrong_ids
        try:
            config = arch.from_recipe(m.config, rows, vocabulary.special_ids if vocabulary else None)
            return _scaled(config, m.rope_scaling), "recipe", size, []
        except arch.ArchitectureError as e:
            return None, "recipe", size, [Problem("model.config.model_type", m.config.get("model_type"), str(e),
                                                  src("model.config"))]
    try:
        config, where = arch.pretrained(m)
    except arch.ArchitectureError as e:
        key = f"model.{e.field}"
        return None, "", None, [Problem(key, getattr(m, e.field), str(e), src(key))]
    config = _scaled(config, m.rope_scaling)
    size = None
    if r.adapter.type != "none":  # adapters freeze the embeddings: the tokenizer must fit them
        vocabulary, _ = _tokenizer_vocabulary(r, src, needed=False)
        size = vocabulary.size if vocabulary else None
    return config, where, size, []


def _scaled(config: Any, rope_scaling: dict[str, Any] | None) -> Any:
    return arch.with_rope_scaling(config, rope_scaling) if rope_scaling else config


def _architecture_problems(r: Recipe, config: Any, tokenizer_size: int | None, src: Sources,
                           meta_model: Any = None) -> list[Problem]:
    """Rules that need the model's shapes."""
    out = []
    limit = arch.max_positions(config)
    if limit is not None and r.data.seq_len > limit:
        out.append(Problem("data.seq_len", r.data.seq_len, f"exceeds the model's {limit} positions "
                           f"(max_position_embeddings); lower data.seq_len to <= {limit}, or extend the positions "
                           "with a RoPE scaling (model.rope_scaling: {rope_type: linear, factor: "
                           f"{-(-r.data.seq_len // limit)}.0}})", src("data.seq_len")))
    attention = r.model.attn_implementation
    why = arch.attention_problem(config, attention) if attention else None
    if why:
        out.append(Problem("model.attn_implementation", attention, why, src("model.attn_implementation")))
    rows = arch.text_config(config).vocab_size
    if r.adapter.type != "none" and tokenizer_size is not None and tokenizer_size > rows:
        out.append(Problem("model.tokenizer", r.model.tokenizer, f"has {tokenizer_size} tokens but the base model's "
                           f"embeddings have {rows} rows: adapters freeze the embeddings, so the "
                           f"{tokenizer_size - rows} new token(s) would keep random vectors; use a tokenizer that "
                           "fits the model's vocabulary", src("model.tokenizer")))
    if r.adapter.type != "none" and isinstance(r.adapter.target_modules, list) and r.adapter.target_modules:
        from trainer.adapters.targets import target_problems

        out += [Problem("adapter.target_modules", r.adapter.target_modules, why, src("adapter.target_modules"))
                for why in target_problems(r.adapter, config)]
    if r.optimizer.low_rank is not None:
        out += _low_rank_target_problems(r, config, src, meta_model)
    return (out + _expert_problems(r, config, src, meta_model) + _heads_problems(r, config, src)
            + _head_in_loss_problems(r, config, src))


def _expert_problems(r: Recipe, config: Any, src: Sources, model: Any = None) -> list[Problem]:
    """Mixture-of-experts rules: adapter.target_experts needs experts; an adapter run splits the fused experts
    (adapters/experts.py), which must be a layout it knows; GaLore and APOLLO project 2-D matrices, and fused experts
    are 3-D."""
    from trainer.adapters.experts import fused_experts, is_moe, unsupported_experts

    a, o = r.adapter, r.optimizer
    if not is_moe(config):
        if a.target_experts and a.type != "none":
            return [Problem("adapter.target_experts", True, f"this {config.model_type} model has no experts (not a "
                            "mixture-of-experts model); remove it", src("adapter.target_experts"))]
        return []
    if a.type == "none" and o.low_rank is None:
        return []
    from trainer.adapters.targets import meta_model

    model = model if model is not None else meta_model(config)
    fused = fused_experts(model)
    if a.type != "none":
        unsupported = unsupported_experts(model)
        if unsupported:
            return [Problem("adapter.type", a.type, f"{config.model_type}'s experts cannot be split into one linear "
                            f"layer per expert ({unsupported[0]}), so they could be neither quantized nor adapted; "
                            "train it with adapter.type: none", src("adapter.type"))]
    if o.low_rank is not None and fused:
        name, module = fused[0]
        share = sum(p.numel() for _, m in fused for p in m.parameters()) / max(sum(p.numel() for p in
                                                                                   model.parameters()), 1)
        shapes = ", ".join(f"{n} {'x'.join(map(str, p.shape))}" for n, p in module.named_parameters())
        return [Problem("optimizer.name", o.name, f"{config.model_type}'s experts are fused 3-D weights ({name}: "
                        f"{shapes}; {share:.0%} of the parameters), which GaLore and APOLLO do not project: they "
                        "would keep full AdamW state; use optimizer.name: adamw or adamw8bit, or adapter.type: qlora "
                        "(4-bit experts)", src("optimizer.name"))]
    return []


def _low_rank_target_problems(r: Recipe, config: Any, src: Sources, model: Any = None) -> list[Problem]:
    """The GaLore / APOLLO target rule on the model's shapes: patterns that match nothing, or a rank that leaves
    no matrix to project."""
    from trainer.adapters.targets import meta_model
    from trainer.optim.lowrank_groups import member, rank_of, targets_of

    o = r.optimizer
    section, rank = o.low_rank_key, rank_of(o)
    model = model if model is not None else meta_model(config)
    try:
        targets, small = targets_of(model, o)
    except ValueError as e:
        return [Problem(f"{section}.target_modules", o.low_rank.target_modules, str(e),  # type: ignore[union-attr]
                        src(f"{section}.target_modules"))]
    if not targets:
        side = max((min(p.shape) for p in small), default=0)
        return [Problem(f"{section}.rank", rank, f"no target matrix has both sides larger than the rank (the "
                        f"largest smaller side is {side}), so {member(o)} would project nothing; use a smaller "
                        f"rank, e.g. {max(1, side // 4)}", src(f"{section}.rank"))]
    return []


def _heads_problems(r: Recipe, config: Any, src: Sources) -> list[Problem]:
    """Sequence parallelism gives each rank heads / N of every attention layer's heads (and key/value heads), and
    masks causally over the whole row (no sliding window)."""
    n = r.distributed.sequence_parallel
    text = arch.text_config(config)
    heads = getattr(text, "num_attention_heads", None)
    if n == 1 or not isinstance(heads, int):
        return []
    window = getattr(text, "sliding_window", None)
    if isinstance(window, int) and window < r.data.seq_len and getattr(text, "use_sliding_window", True):
        return [Problem("distributed.sequence_parallel", n, f"{config.model_type} attends within a sliding window of "
                        f"{window} tokens, which the exchanged attention does not apply (it masks causally over the "
                        f"whole row): use data.seq_len <= {window} or sequence_parallel: 1",
                        src("distributed.sequence_parallel"))]
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % n == 0 and kv_heads % n == 0:
        return []
    fitting = [d for d in range(2, kv_heads + 1) if heads % d == 0 and kv_heads % d == 0]
    return [Problem("distributed.sequence_parallel", n, f"must divide the model's {heads} attention heads and "
                    f"{kv_heads} key/value heads (each rank attends with heads / {n} of them); use "
                    f"{' or '.join(map(str, fitting)) if fitting else '1 (no sequence parallelism)'}",
                    src("distributed.sequence_parallel"))]


def _head_in_loss_problems(r: Recipe, config: Any, src: Sources) -> list[Problem]:
    """model.head_in_loss applies the head's plain weight inside the loss: a head that does more (soft-capped
    logits, a LoRA adapter on it) would be skipped."""
    if not r.model.head_in_loss:
        return []
    if getattr(arch.text_config(config), "final_logit_softcapping", None):
        return [Problem("model.head_in_loss", True, f"{config.model_type} soft-caps its logits after the head, which "
                        "the loss does not; set model.head_in_loss: false", src("model.head_in_loss"))]
    targets = r.adapter.target_modules
    if r.adapter.type != "none" and isinstance(targets, list) and any("lm_head" in t for t in targets):
        return [Problem("model.head_in_loss", True, "adapter.target_modules puts LoRA on the LM head, which the loss "
                        "would apply without its adapter; remove lm_head from the targets or set "
                        "model.head_in_loss: false", src("model.head_in_loss"))]
    return []


def _world_problems(r: Recipe, world_size: int, src: Sources) -> list[Problem]:
    """Rules that need the number of processes."""
    n = r.distributed.sequence_parallel
    if world_size % n:
        return [Problem("distributed.sequence_parallel", n, f"must divide the number of ranks ({world_size} here): "
                        f"each group of {n} ranks shares its sequences; launch a multiple of {n} processes or lower "
                        "it", src("distributed.sequence_parallel"))]
    if r.precision.weights != "int8" or world_size == 1:
        return []
    return [Problem("precision.weights", "int8", f"INT8 weights run in one process in this version ({world_size} "
                    "here): DDP's buckets and broadcasts cannot carry torchao's INT8 weight tensors; train on one "
                    "GPU (what INT8 weights are for) or use precision.weights: float", src("precision.weights"))]


# ---------------------------------------------------------------------------------------------- entry points

def resolve_recipe(recipe: Recipe, world_size: int, *, sources: Sources = Sources(),
                   problems: list[Problem] | None = None, origin: str = "recipe", architecture_config: Any = None,
                   meta_model: Any = None, make_output: bool = False, recipe_path: str | None = None) -> ResolvedRun:
    """Resolve a typed recipe; ConfigError listing every problem (including `problems` found before). A plan's
    suggestions pass the architecture, and its model on the meta device, that they already have: they never change
    the model."""
    problems = list(problems or [])
    reported = {p.key for p in problems}

    def add(found: list[Problem]) -> None:
        problems.extend(p for p in found if p.key not in reported)  # a key with a type problem: no follow-ons

    recipe = command_line_batch_wins(recipe, sources)
    add(cross_check(recipe, sources))
    add(_world_problems(recipe, world_size, sources))
    # sequence parallelism: each group of N ranks shares its sequences, so world / N groups split the batch
    sequence_parallel = recipe.distributed.sequence_parallel
    data_parallel = world_size // sequence_parallel if world_size % sequence_parallel == 0 else world_size
    accum, batch = accumulation(recipe.train, data_parallel, sources, world_size // data_parallel)
    add(batch)
    add(_path_problems(recipe, sources))
    add(make_output_dir(recipe.output_dir, sources) if make_output else output_dir_problems(recipe.output_dir,
                                                                                         sources))
    config, where, tokenizer_size = architecture_config, "given", None
    model_reported = any(p.key.startswith(("model.name_or_path", "model.config", "model.tokenizer")) for p in problems)
    if config is None and not model_reported:
        config, where, tokenizer_size, found = _architecture(recipe, sources)
        add(found)
    if config is not None:
        add(_architecture_problems(recipe, config, tokenizer_size, sources, meta_model))
    if problems:
        raise ConfigError(problems, origin)
    return ResolvedRun(recipe=recipe, world_size=world_size, grad_accum_steps=accum,
                       global_batch_size=recipe.train.micro_batch_size * accum * data_parallel, architecture=config,
                       architecture_source=where, output_dir=Path(recipe.output_dir).expanduser(),
                       execution=execution_of(recipe), warnings=tuple(warnings_of(recipe)), sources=sources,
                       recipe_path=recipe_path)


def resolve(path: str | Path | None, overrides: list[str] | None = None, world_size: int = 1, *,
            make_output: bool = False) -> ResolvedRun:
    """Read, type, check and resolve a recipe file with its overrides for a launch of `world_size` ranks."""
    recipe, sources, problems = load_recipe(path, overrides)
    origin = f"recipe {path}" if path is not None else "recipe"
    if any(p.key == "recipe" for p in problems):  # the file cannot be read: nothing else is worth checking
        raise ConfigError([p for p in problems if p.key == "recipe"], origin)
    return resolve_recipe(recipe, world_size, sources=sources, problems=problems, origin=origin,
                          make_output=make_output, recipe_path=str(path) if path is not None else None)


__all__ = ["resolve", "resolve_recipe", "accumulation", "COMMAND_LINE"]
