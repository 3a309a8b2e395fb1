"""What to change when a recipe does not fit: the changes a user can make, each with what it costs them (speed
first, then quality), combined up to three at a time, cheapest first, each planned again.

The changes: gradient checkpointing (about +30% compute), activation offload (copies that overlap with compute,
pinned CPU memory), a tiled MLP and the LM head inside the loss (long sequences), sequence parallelism over the
launch's GPUs, a smaller micro-batch with more accumulation (same global batch), an 8-bit optimizer, ZeRO
stages 1-3 (several GPUs; for adapter runs too, where ZeRO-3 partitions the 4-bit base), offloading the optimizer
state or the parameters to CPU memory, 8-bit GaLore or APOLLO-Mini with per-layer updates, INT8 weights for them
(one GPU), and QLoRA. The first few combinations that fit are shown (or, when none does, the one that comes
closest), each with what it saves. A combination is kept only if the resulting recipe resolves (resolve.py):
nothing is proposed that the trainer would refuse, and none changes the global batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from trainer.errors import ConfigError
from trainer.plan.items import Plan, Shapes, Suggestion
from trainer.plan.peak import plan
from trainer.plan.shapes import shapes
from trainer.recipe import architecture as arch
from trainer.recipe.read import with_overrides
from trainer.recipe.resolve import resolve_recipe
from trainer.recipe.resolved import ResolvedRun

MAX_CHANGES = 3  # changes combined in one suggestion
MAX_SUGGESTIONS = 3
NATIVE_SINGLE_STATE = ("distributed.engine=native", "distributed.zero_stage=0", "distributed.offload_optimizer=none",
                       "distributed.offload_params=none")


@dataclass(frozen=True)
class Change:
    """One thing to change, as overrides to paste, and its cost to the user (lower is cheaper)."""

    label: str
    overrides: tuple[str, ...]
    cost: int


def apply_overrides(run: ResolvedRun, overrides: list[str], sh: Shapes) -> ResolvedRun | None:
    """The run with dotted overrides applied and resolved again at the same world size (the architecture is kept:
    no suggestion changes the model); None when the result would be refused."""
    recipe, problems = with_overrides(run.recipe, overrides)
    if problems:
        return None
    try:
        return resolve_recipe(recipe, run.world_size, architecture_config=run.architecture, meta_model=sh.meta)
    except ConfigError:
        return None


def _activation_changes(run: ResolvedRun) -> list[Change]:
    r, out = run.recipe, []
    if not r.model.gradient_checkpointing:
        out.append(Change("gradient checkpointing (about 30% more compute)", ("model.gradient_checkpointing=true",), 1))
    if not r.model.activation_offload:  # the copies overlap with compute on a GPU; needs pinned CPU memory
        out.append(Change("activation offload to pinned CPU memory", ("model.activation_offload=true",), 1))
    hidden = int(getattr(arch.text_config(run.architecture), "hidden_size", 0) or 0)
    if r.model.tiled_mlp == 1 and hidden and run.seq_len // run.execution.sequence_parallel > hidden:
        out.append(Change("tiled MLP (each layer's MLP in sequence tiles, recomputed in backward)",
                          ("model.tiled_mlp=auto",), 1))
    if not r.model.head_in_loss and not run.execution.zero3:
        out.append(Change("LM head inside the chunked loss (no full-vocabulary logits of the sequence)",
                          ("model.head_in_loss=true",), 1))
    if r.train.micro_batch_size > 1:  # half the micro-batch; the global batch stays what it was
        half = r.train.micro_batch_size // 2
        more = () if r.train.global_batch_size is not None else (f"train.grad_accum_steps={run.grad_accum_steps * 2}",)
        out.append(Change(f"micro-batch {r.train.micro_batch_size} -> {half}, twice the accumulation (global batch "
                          f"{run.global_batch_size} kept)", (f"train.micro_batch_size={half}", *more), 2))
    return out


def _sharding_changes(run: ResolvedRun, low_rank: bool) -> list[Change]:
    """ZeRO stages over the ranks of this launch, and DeepSpeed's CPU offloads."""
    e, out = run.execution, []
    if run.world_size > 1 and not low_rank:  # adapter runs too: ZeRO-3 partitions their (4-bit) base
        for stage in (1, 2, 3):
            if not e.zero_at_least(stage):
                out.append(Change(f"DeepSpeed ZeRO-{stage} over {run.world_size} GPUs",
                                  ("distributed.engine=deepspeed", f"distributed.zero_stage={stage}"), 3 + stage))
    out += _sequence_parallel_changes(run, low_rank)
    if not low_rank and not e.offload_optimizer:
        out.append(Change("optimizer state in CPU memory (DeepSpeed offload)", (
            "distributed.engine=deepspeed", "distributed.offload_optimizer=cpu", "optimizer.name=adamw"), 7))
    if not low_rank and not e.offload_params:
        out.append(Change("parameters in CPU memory (ZeRO-3 offload)", (
            "distributed.engine=deepspeed", "distributed.zero_stage=3", "distributed.offload_params=cpu"), 8))
    return out


def _sequence_parallel_changes(run: ResolvedRun, low_rank: bool) -> list[Change]:
    """Sequence parallelism over 2, 4, ... of the launch's GPUs (DeepSpeed; ZeRO-2 unless the recipe has a stage):
    each GPU holds seq_len / N tokens of every sequence. Accumulation grows by N so the global batch is kept."""
    e = run.execution
    if low_rank or e.sequence_parallel > 1 or run.world_size == 1:
        return []
    stage = e.zero_stage if e.deepspeed else 2
    out = []
    for n in (2, 4, 8):
        if run.world_size % n or run.seq_len % n:
            continue
        # the global batch stated, accumulation derived from it (a recipe's grad_accum_steps would be multiplied
        # by N here and by a smaller micro-batch's change too)
        accumulation = (f"train.global_batch_size={run.global_batch_size}", "train.grad_accum_steps=null")
        out.append(Change(f"sequence parallel over {n} GPUs (DeepSpeed ZeRO-{stage})", (
            "distributed.engine=deepspeed", f"distributed.zero_stage={stage}", f"distributed.sequence_parallel={n}",
            *accumulation), 4))
    return out


def _optimizer_changes(run: ResolvedRun, low_rank: bool) -> list[Change]:
    """Smaller optimizer state or weights: 8-bit AdamW, the low-rank family with per-layer updates, INT8 weights,
    and QLoRA for a pretrained model."""
    r, e, out = run.recipe, run.execution, []
    if r.optimizer.name == "adamw" and not e.adapted:
        out.append(Change("8-bit AdamW (bitsandbytes)", ("optimizer.name=adamw8bit",), 3))
    if not e.adapted and not low_rank:
        out.append(Change("8-bit GaLore with per-layer updates (rank 256)", (
            "optimizer.name=galore_adamw8bit", "optimizer.galore.rank=256", "optimizer.galore.per_layer=true",
            *NATIVE_SINGLE_STATE), 9))
        out.append(Change("APOLLO-Mini with per-layer updates (SGD-like optimizer state)", (
            "optimizer.name=apollo_mini", "optimizer.apollo.per_layer=true", *NATIVE_SINGLE_STATE), 9))
    if not e.adapted and run.world_size == 1 and r.precision.weights == "float":  # with GaLore or APOLLO only
        out.append(Change("INT8 weights with stochastic rounding", ("precision.weights=int8",), 9))
    if e.adapter != "qlora" and r.model.name_or_path is not None:
        # on DeepSpeed (alone or combined with a ZeRO change) the update runs in DeepSpeed's AdamW
        optimizer = "adamw" if e.deepspeed else "paged_adamw8bit"
        out.append(Change("QLoRA: 4-bit NF4 base with LoRA adapters (rank 16)", (
            "adapter.type=qlora", "adapter.rank=16", f"optimizer.name={optimizer}", "precision.dtype=bf16"), 10))
    return out


def changes(run: ResolvedRun) -> list[Change]:
    """The changes that apply to this run, cheapest first."""
    low_rank = run.recipe.optimizer.low_rank is not None  # GaLore or APOLLO already
    found = _activation_changes(run) + _sharding_changes(run, low_rank) + _optimizer_changes(run, low_rank)
    return sorted(found, key=lambda c: c.cost)


def combined(combo: tuple[Change, ...]) -> list[str] | None:
    """The overrides of a combination, or None when two of its changes set one key to different values."""
    merged: dict[str, str] = {}
    for change in combo:
        for override in change.overrides:
            key, value = override.split("=", 1)
            if merged.setdefault(key, value) != value:
                return None
    return [f"{k}={v}" for k, v in merged.items()]


def _planned(run: ResolvedRun, combo: tuple[Change, ...], overrides: list[str], gpu_bytes: int,
             sh: Shapes) -> Suggestion | None:
    """The suggestion of one combination, or None when the trainer would refuse the recipe it makes."""
    candidate = apply_overrides(run, overrides, sh)
    if candidate is None:
        return None
    assert candidate.global_batch_size == run.global_batch_size, overrides
    p = plan(candidate, gpu_bytes, sh)
    labels = tuple(c.label for c in combo)
    return Suggestion(" + ".join(labels), labels, tuple(overrides), p.peak_bytes, p.fits, p.cpu_bytes)


def suggest(run: ResolvedRun, gpu_bytes: int, sh: Shapes) -> list[Suggestion]:
    """Up to MAX_SUGGESTIONS combinations that fit, cheapest first, each with its predicted peak; when none fits,
    the one that comes closest."""
    options = changes(run)
    combos = [c for n in range(1, MAX_CHANGES + 1) for c in itertools.combinations(options, n)]
    combos.sort(key=lambda c: (sum(ch.cost for ch in c), len(c)))
    fitting: list[Suggestion] = []
    closest: Suggestion | None = None
    tried: set[frozenset[str]] = set()  # two combinations can come to the same overrides (ZeRO-3 + its offload)
    for combo in combos:
        if any(set(found.changes) < {c.label for c in combo} for found in fitting):
            continue  # a fitting combination plus something more: the extra change buys nothing needed
        overrides = combined(combo)
        if overrides is None or frozenset(overrides) in tried:
            continue
        tried.add(frozenset(overrides))
        found = _planned(run, combo, overrides, gpu_bytes, sh)
        if found is None:
            continue
        if found.fits:
            fitting.append(found)
            if len(fitting) == MAX_SUGGESTIONS:
                break
        elif closest is None or found.peak_bytes < closest.peak_bytes:
            closest = found
    return fitting or ([closest] if closest else [])


def full_plan(run: ResolvedRun, gpu_bytes: int) -> Plan:
    """The plan plus, when it does not fit, the suggestions."""
    sh = shapes(run)
    p = plan(run, gpu_bytes, sh)
    if not p.fits:
        p.suggestions = suggest(run, gpu_bytes, sh)
    return p
