"""Turning a memory plan into advice: what to change when a recipe does not fit, and how to show it.

The changes a user can make, each with what it costs them (speed first, then quality): gradient checkpointing
(about +30% compute), activation offload (copies that overlap with compute, pinned CPU memory), a smaller
micro-batch with more accumulation (same global batch), an 8-bit optimizer, ZeRO stages 1-3 (several GPUs; for
adapter runs too, where ZeRO-3 partitions the 4-bit base), offloading the optimizer state or the parameters to CPU
memory, 8-bit GaLore or APOLLO-Mini with per-layer updates, INT8 weights for them (one GPU), and QLoRA.
Suggestions are combinations of up to three of them, tried cheapest first; the first few that fit are shown (or,
when none does, the one that comes closest), each with what it saves. A combination is kept only if the resulting
recipe resolves (resolve.py): nothing is proposed that the trainer would refuse, and none changes the global batch.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import psutil

from trainer.errors import ConfigError
from trainer.memory import GiB, Plan, Shapes, plan, shapes
from trainer.recipe import with_overrides
from trainer.resolve import ResolvedRun, resolve_recipe

MAX_CHANGES = 3  # changes combined in one suggestion
MAX_SUGGESTIONS = 3


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


def changes(run: ResolvedRun) -> list[Change]:
    """The changes that apply to this run, cheapest first."""
    r, out = run.recipe, []
    full = r.adapter.type == "none"
    low_rank = r.optimizer.low_rank is not None  # GaLore or APOLLO already
    if not r.model.gradient_checkpointing:
        out.append(Change("gradient checkpointing (about 30% more compute)", ("model.gradient_checkpointing=true",), 1))
    if not r.model.activation_offload:  # the copies overlap with compute on a GPU; needs pinned CPU memory
        out.append(Change("activation offload to pinned CPU memory", ("model.activation_offload=true",), 1))
    if r.train.micro_batch_size > 1:  # half the micro-batch; the global batch stays what it was
        half = r.train.micro_batch_size // 2
        more = () if r.train.global_batch_size is not None else (f"train.grad_accum_steps={run.grad_accum_steps * 2}",)
        out.append(Change(f"micro-batch {r.train.micro_batch_size} -> {half}, twice the accumulation (global batch "
                          f"{run.global_batch_size} kept)", (f"train.micro_batch_size={half}", *more), 2))
    if r.optimizer.name == "adamw" and full:
        out.append(Change("8-bit AdamW (bitsandbytes)", ("optimizer.name=adamw8bit",), 3))
    if run.world_size > 1 and not low_rank:  # adapter runs too: ZeRO-3 partitions their (4-bit) base
        for stage in (1, 2, 3):
            if r.distributed.zero_stage < stage or r.distributed.engine != "deepspeed":
                out.append(Change(f"DeepSpeed ZeRO-{stage} over {run.world_size} GPUs",
                                  ("distributed.engine=deepspeed", f"distributed.zero_stage={stage}"), 3 + stage))
    if not low_rank and r.distributed.offload_optimizer == "none":
        out.append(Change("optimizer state in CPU memory (DeepSpeed offload)", (
            "distributed.engine=deepspeed", "distributed.offload_optimizer=cpu", "optimizer.name=adamw"), 7))
    if not low_rank and r.distributed.offload_params == "none":
        out.append(Change("parameters in CPU memory (ZeRO-3 offload)", (
            "distributed.engine=deepspeed", "distributed.zero_stage=3", "distributed.offload_params=cpu"), 8))
    if full and not low_rank:
        out.append(Change("8-bit GaLore with per-layer updates (rank 256)", (
            "optimizer.name=galore_adamw8bit", "optimizer.galore.rank=256", "optimizer.galore.per_layer=true",
            "distributed.engine=native", "distributed.zero_stage=0", "distributed.offload_optimizer=none",
            "distributed.offload_params=none"), 9))
        out.append(Change("APOLLO-Mini with per-layer updates (SGD-like optimizer state)", (
            "optimizer.name=apollo_mini", "optimizer.apollo.per_layer=true", "distributed.engine=native",
            "distributed.zero_stage=0", "distributed.offload_optimizer=none", "distributed.offload_params=none"), 9))
    if full and run.world_size == 1 and r.precision.weights == "float":  # with GaLore or APOLLO only (rules.py)
        out.append(Change("INT8 weights with stochastic rounding", ("precision.weights=int8",), 9))
    if r.adapter.type != "qlora" and r.model.name_or_path is not None:
        # on DeepSpeed (alone or combined with a ZeRO change) the update runs in DeepSpeed's AdamW
        deepspeed = r.distributed.engine == "deepspeed"
        out.append(Change("QLoRA: 4-bit NF4 base with LoRA adapters (rank 16)", (
            "adapter.type=qlora", "adapter.rank=16", f"optimizer.name={'adamw' if deepspeed else 'paged_adamw8bit'}",
            "precision.dtype=bf16"), 10))
    return out


def combined(combo: tuple[Change, ...]) -> list[str] | None:
    """The overrides of a combination, or None when two of its changes set one key to different values."""
    merged: dict[str, str] = {}
    for change in combo:
        for override in change.overrides:
            key, value = override.split("=", 1)
            if merged.setdefault(key, value) != value:
                return None
    return [f"{k}={v}" for k, v in merged.items()]


def cpu_bytes(p: Plan) -> int:
    """What the plan puts in CPU memory, per rank (offloaded optimizer state and parameters)."""
    return sum(i.bytes for i in p.items if i.where == "cpu")


def suggest(run: ResolvedRun, gpu_bytes: int, sh: Shapes) -> list[dict[str, Any]]:
    """Up to MAX_SUGGESTIONS combinations that fit, cheapest first, each with its predicted peak; when none fits,
    the one that comes closest."""
    options = changes(run)
    combos = [c for n in range(1, MAX_CHANGES + 1) for c in itertools.combinations(options, n)]
    combos.sort(key=lambda c: (sum(ch.cost for ch in c), len(c)))
    fitting: list[dict[str, Any]] = []
    closest: dict[str, Any] | None = None
    tried: set[frozenset[str]] = set()  # two combinations can come to the same overrides (ZeRO-3 + its offload)
    for combo in combos:
        if any(set(found["changes"]) < {c.label for c in combo} for found in fitting):
            continue  # a fitting combination plus something more: the extra change buys nothing needed
        overrides = combined(combo)
        if overrides is None or frozenset(overrides) in tried:
            continue
        tried.add(frozenset(overrides))
        candidate = apply_overrides(run, overrides, sh)
        if candidate is None:
            continue
        assert candidate.global_batch_size == run.global_batch_size, overrides
        p = plan(candidate, gpu_bytes, sh)
        found = {"change": " + ".join(c.label for c in combo), "overrides": overrides, "peak_bytes": p.peak_bytes,
                 "fits": p.fits, "cpu_bytes": cpu_bytes(p),
                 "changes": [c.label for c in combo]}
        if p.fits:
            fitting.append(found)
            if len(fitting) == MAX_SUGGESTIONS:
                break
        elif closest is None or p.peak_bytes < closest["peak_bytes"]:
            closest = found
    return fitting or ([closest] if closest else [])


def _count(n: int) -> str:
    """3.21B, 772.0M: parameter counts as people say them."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def host_memory_lines(cpu_per_rank: int, ranks_per_node: int, indent: str = "  ") -> list[str]:
    """CPU memory an offloaded plan needs per node, against this machine's."""
    if not cpu_per_rank:
        return []
    per_node = cpu_per_rank * ranks_per_node
    here = psutil.virtual_memory().total
    lines = [f"{indent}CPU memory: {cpu_per_rank / GiB:.2f} GiB per rank, {per_node / GiB:.2f} GiB per node of "
             f"{ranks_per_node} GPU{'s' if ranks_per_node > 1 else ''} (this machine has {here / GiB:.0f} GiB)"]
    if per_node > here:
        lines.append(f"{indent}WARNING: more CPU memory per node than this machine has")
    return lines


def checkpoint_line(p: Plan) -> str:
    """What one checkpoint takes on disk and how much of it rank 0 writes."""
    line = f"  one checkpoint: {_disk_size(p.checkpoint.total)} on disk"
    if p.world_size > 1:
        line += f", {_disk_size(p.checkpoint.rank0)} of it written by rank 0"
    return line


def _disk_size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def render(p: Plan, title: str, gpus_per_node: int | None = None) -> str:
    """The one-screen table `python -m trainer plan` prints."""
    ranks_per_node = min(p.world_size, gpus_per_node or p.world_size)
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
    if p.offloaded_activations:
        lines.append(f"  activation offload keeps {p.offloaded_activations / GiB:.2f} GiB of them in pinned CPU memory")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"  predicted peak: {p.peak_bytes / GiB:.2f} GiB per GPU (during the {p.phase}); {verdict} in "
                 f"{p.gpu_bytes / GiB:.0f} GiB")
    lines += host_memory_lines(cpu_bytes(p), ranks_per_node)
    lines.append(checkpoint_line(p))
    if not p.fits:
        lines.append("")
        if not p.suggestions:
            lines.append("  no change the trainer supports makes it fit; use more or larger GPUs")
        elif not p.suggestions[0]["fits"]:
            lines.append("  no combination of up to three changes fits; the closest:")
        else:
            lines.append("  changes that make it fit, cheapest first:")
        for n, s in enumerate(p.suggestions, 1):
            mark = "fits" if s["fits"] else "still too big"
            saved = (p.peak_bytes - s["peak_bytes"]) / GiB
            lines.append(f"  {n}. {s['change']}: -{saved:.2f} GiB -> {s['peak_bytes'] / GiB:.2f} GiB ({mark})")
            lines.append(f"     {' '.join(s['overrides'])}")
            lines += host_memory_lines(s["cpu_bytes"], ranks_per_node, indent="     ")
    return "\n".join(lines)


def as_json(p: Plan) -> str:
    return json.dumps({"world_size": p.world_size, "gpu_bytes": p.gpu_bytes, "parameters": p.parameters,
                       "trainable_parameters": p.trainable, "peak_bytes": p.peak_bytes, "fits": p.fits,
                       "phase": p.phase, "activations_without_checkpointing": p.activations_without_checkpointing,
                       "activations_with_checkpointing": p.activations_with_checkpointing,
                       "offloaded_activations": p.offloaded_activations,
                       "checkpoint_bytes": p.checkpoint.total, "checkpoint_rank0_bytes": p.checkpoint.rank0,
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
