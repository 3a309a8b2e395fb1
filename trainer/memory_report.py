"""Turning a memory plan into advice: what to change when a recipe does not fit, and how to show it.

Suggestions are tried in order of what they cost the user (speed, then quality), each applied on top of
the previous ones until the plan fits: gradient checkpointing (about +30% compute), a smaller micro-batch with
more accumulation (same global batch), an 8-bit optimizer, ZeRO stages (several GPUs), CPU offload, GaLore,
and QLoRA. A suggestion is kept only if the resulting recipe resolves (resolve.py): nothing is proposed
that the trainer would refuse.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from trainer.errors import ConfigError
from trainer.memory import GiB, Plan, Shapes, plan, shapes
from trainer.recipe import with_overrides
from trainer.resolve import ResolvedRun, resolve_recipe

Change = tuple[str, list[str], Callable[[ResolvedRun], bool]]


def _apply(run: ResolvedRun, overrides: list[str]) -> ResolvedRun | None:
    """The run with dotted overrides applied and resolved again at the same world size (the architecture is kept:
    no suggestion changes the model); None when the result would be refused."""
    recipe, problems = with_overrides(run.recipe, overrides)
    if problems:
        return None
    try:
        return resolve_recipe(recipe, run.world_size, architecture_config=run.architecture)
    except ConfigError:
        return None


def _smaller_micro_batch(run: ResolvedRun) -> Change | None:
    """Half the micro-batch, twice the accumulation: the global batch stays what it was, whichever of
    train.global_batch_size and train.grad_accum_steps the recipe gives."""
    t = run.recipe.train
    if t.micro_batch_size <= 1:
        return None
    half = t.micro_batch_size // 2
    overrides = [f"train.micro_batch_size={half}"]
    if t.global_batch_size is None:
        overrides.append(f"train.grad_accum_steps={run.grad_accum_steps * 2}")
    return (f"micro_batch_size {t.micro_batch_size} -> {half} with twice the accumulation (same global batch of "
            f"{run.global_batch_size})", overrides, lambda r: True)


def _changes(run: ResolvedRun) -> list[Change]:
    world = run.world_size
    out: list[Change] = [("turn on gradient checkpointing (about 30% more compute)",
                          ["model.gradient_checkpointing=true"], lambda r: not r.recipe.model.gradient_checkpointing)]
    smaller = _smaller_micro_batch(run)
    if smaller:
        out.append(smaller)
    out.append(("8-bit AdamW (bitsandbytes)", ["optimizer.name=adamw8bit"],
                lambda r: r.recipe.optimizer.name == "adamw" and r.recipe.adapter.type == "none"))
    for stage in (1, 2, 3):
        out.append((f"DeepSpeed ZeRO stage {stage} over {world} GPUs",
                    ["distributed.engine=deepspeed", f"distributed.zero_stage={stage}"],
                    lambda r, s=stage: world > 1 and r.recipe.distributed.zero_stage < s
                    and r.recipe.adapter.type == "none" and not r.recipe.optimizer.name.startswith("galore")))
    out.append(("offload the optimizer state to CPU memory (DeepSpeed ZeRO-2)",
                ["distributed.engine=deepspeed", "distributed.zero_stage=2", "distributed.offload_optimizer=cpu",
                 "optimizer.name=adamw"],
                lambda r: r.recipe.distributed.offload_optimizer == "none" and r.recipe.adapter.type == "none"
                and r.recipe.distributed.zero_stage <= 2 and not r.recipe.optimizer.name.startswith("galore")))
    out.append(("8-bit GaLore with per-layer updates (rank 256)",
                ["optimizer.name=galore_adamw8bit", "optimizer.galore.rank=256", "optimizer.galore.per_layer=true",
                 "distributed.engine=native", "distributed.zero_stage=0", "distributed.offload_optimizer=none"],
                lambda r: r.recipe.adapter.type == "none" and not r.recipe.optimizer.name.startswith("galore")))
    out.append(("QLoRA: 4-bit NF4 base with LoRA adapters (rank 16)",
                ["adapter.type=qlora", "adapter.rank=16", "optimizer.name=paged_adamw8bit",
                 "distributed.engine=native", "distributed.zero_stage=0", "distributed.offload_optimizer=none",
                 "precision.dtype=bf16"],
                lambda r: r.recipe.adapter.type != "qlora" and r.recipe.model.name_or_path is not None))
    return out


def suggest(run: ResolvedRun, gpu_bytes: int, sh: Shapes) -> list[dict[str, Any]]:
    """Cumulative changes, cheapest first, until the predicted peak fits; each with its predicted peak. A change
    never alters the global batch (the run would then train differently, not just use less memory)."""
    steps: list[dict[str, Any]] = []
    current = run
    for label, overrides, applies in _changes(run):
        if not applies(current):
            continue
        candidate = _apply(current, overrides)
        if candidate is None:
            continue
        assert candidate.global_batch_size == run.global_batch_size, (label, overrides)
        before = plan(current, gpu_bytes, sh).peak_bytes
        after = plan(candidate, gpu_bytes, sh).peak_bytes
        if after >= before:
            continue
        current = candidate
        steps.append({"change": label, "overrides": overrides, "peak_bytes": after, "fits": after <= gpu_bytes})
        if after <= gpu_bytes:
            break
    return steps


def _count(n: int) -> str:
    """3.21B, 772.0M: parameter counts as people say them."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def render(p: Plan, title: str) -> str:
    """The one-screen table `python -m trainer plan` prints."""
    lines = [f"memory plan for {title}: {_count(p.parameters)} parameters ({p.trainable / 1e6:,.1f}M "
             f"trainable), {p.world_size} GPU{'s' if p.world_size > 1 else ''}, per rank:", ""]
    width = max(len(i.name) for i in p.items) + 2
    for i in p.items:
        where = "" if i.where == "gpu" else "  (CPU memory)"
        note = f"  [{i.note}]" if i.note else ""
        lines.append(f"  {i.name:<{width}} {i.bytes:>16,} B {i.bytes / GiB:8.2f} GiB{where}{note}")
    lines.append("")
    lines.append(f"  activations would be {p.activations_without_checkpointing / GiB:.2f} GiB without gradient "
                 f"checkpointing and {p.activations_with_checkpointing / GiB:.2f} GiB with it")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"  predicted peak: {p.peak_bytes / GiB:.2f} GiB per GPU (during the {p.phase}); {verdict} in "
                 f"{p.gpu_bytes / GiB:.0f} GiB")
    if not p.fits:
        lines.append("")
        if not p.suggestions:
            lines.append("  no change the trainer supports makes it fit; use more or larger GPUs")
        for n, s in enumerate(p.suggestions, 1):
            mark = "fits" if s["fits"] else "still too big"
            lines.append(f"  {n}. {s['change']}: {s['peak_bytes'] / GiB:.2f} GiB ({mark})  "
                         f"{' '.join(s['overrides'])}")
    return "\n".join(lines)


def as_json(p: Plan) -> str:
    return json.dumps({"world_size": p.world_size, "gpu_bytes": p.gpu_bytes, "parameters": p.parameters,
                       "trainable_parameters": p.trainable, "peak_bytes": p.peak_bytes, "fits": p.fits,
                       "phase": p.phase, "activations_without_checkpointing": p.activations_without_checkpointing,
                       "activations_with_checkpointing": p.activations_with_checkpointing,
                       "items": [vars(i) for i in p.items], "suggestions": p.suggestions}, indent=2)


def full_plan(run: ResolvedRun, gpu_bytes: int) -> Plan:
    """The plan plus, when it does not fit, the suggestions."""
    sh = shapes(run)
    p = plan(run, gpu_bytes, sh)
    if not p.fits:
        p.suggestions = suggest(run, gpu_bytes, sh)
    return p


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G', '1.5TiB' -> bytes (G/GiB are binary; GB decimal)."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 10**12, "gb": 10**9, "mb": 10**6, "t": 2**40,
             "g": 2**30, "m": 2**20}
    low = text.strip().lower().replace(" ", "")
    for unit, factor in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * factor)
    return int(float(low))
