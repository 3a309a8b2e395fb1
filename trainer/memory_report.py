"""Turning a memory plan into advice: what to change when a recipe does not fit, and how to show it.

Suggestions are tried in order of what they cost the user (speed, then quality), each applied on top of
the previous ones until the plan fits: gradient checkpointing (about +30% compute), a smaller micro-batch with
more accumulation (same global batch), an 8-bit optimizer, ZeRO stages (several GPUs), CPU offload, GaLore,
and QLoRA. A suggestion is kept only if the resulting recipe passes validation (checks.py): nothing is proposed
that the trainer would refuse.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

from trainer.config import Config
from trainer.memory import GiB, Plan, Shapes, plan
from trainer.typed import to_dict

Change = tuple[str, list[str], Callable[[Config, int], bool]]


def _apply(cfg: Config, overrides: list[str]) -> Config | None:
    """cfg with dotted overrides applied and validated; None when the result would be refused."""
    from trainer.checks import cross_check
    from trainer.config import parse_overrides
    from trainer.typed import Converter

    raw = to_dict(copy.deepcopy(cfg))
    parsed, problems = parse_overrides(overrides)
    for key, value in parsed.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    conv = Converter()
    new = conv.build(Config, raw, "")
    if problems or conv.problems or cross_check(new, conv.source):
        return None
    return new


def _changes(cfg: Config, world: int) -> list[Change]:
    t = cfg.train
    accum = t.grad_accum_steps or 1
    out: list[Change] = [("turn on gradient checkpointing (about 30% more compute)",
                          ["model.gradient_checkpointing=true"], lambda c, w: not c.model.gradient_checkpointing)]
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        out.append((f"micro_batch_size {t.micro_batch_size} -> {half} with twice the accumulation (same global "
                    "batch)", [f"train.micro_batch_size={half}", f"train.grad_accum_steps={accum * 2}",
                               "train.global_batch_size=null"], lambda c, w: True))
    out.append(("8-bit AdamW (bitsandbytes)", ["optimizer.name=adamw8bit"],
                lambda c, w: c.optimizer.name == "adamw" and c.adapter.type == "none"))
    for stage in (1, 2, 3):
        out.append((f"DeepSpeed ZeRO stage {stage} over {world} GPUs",
                    ["distributed.engine=deepspeed", f"distributed.zero_stage={stage}"],
                    lambda c, w, s=stage: w > 1 and c.distributed.zero_stage < s and c.adapter.type == "none"
                    and not c.optimizer.name.startswith("galore")))
    out.append(("offload the optimizer state to CPU memory (DeepSpeed ZeRO-2)",
                ["distributed.engine=deepspeed", "distributed.zero_stage=2", "distributed.offload_optimizer=cpu",
                 "optimizer.name=adamw"],
                lambda c, w: c.distributed.offload_optimizer == "none" and c.adapter.type == "none"
                and c.distributed.zero_stage <= 2 and not c.optimizer.name.startswith("galore")))
    out.append(("8-bit GaLore with per-layer updates (rank 256)",
                ["optimizer.name=galore_adamw8bit", "optimizer.galore.rank=256", "optimizer.galore.per_layer=true",
                 "distributed.engine=native", "distributed.zero_stage=0", "distributed.offload_optimizer=none"],
                lambda c, w: c.adapter.type == "none" and not c.optimizer.name.startswith("galore")))
    out.append(("QLoRA: 4-bit NF4 base with LoRA adapters (rank 16)",
                ["adapter.type=qlora", "adapter.rank=16", "optimizer.name=paged_adamw8bit",
                 "distributed.engine=native", "distributed.zero_stage=0", "distributed.offload_optimizer=none",
                 "precision.dtype=bf16"],
                lambda c, w: c.adapter.type != "qlora" and c.model.name_or_path is not None))
    return out


def suggest(cfg: Config, world: int, gpu_bytes: int, sh: Shapes) -> list[dict[str, Any]]:
    """Cumulative changes, cheapest first, until the predicted peak fits; each with its predicted peak."""
    steps: list[dict[str, Any]] = []
    current = cfg
    for label, overrides, applies in _changes(cfg, world):
        if not applies(current, world):
            continue
        candidate = _apply(current, overrides)
        if candidate is None:
            continue
        before = plan(current, world, gpu_bytes, sh).peak_bytes
        after = plan(candidate, world, gpu_bytes, sh).peak_bytes
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


def render(p: Plan, cfg: Config, title: str) -> str:
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


def full_plan(cfg: Config, world: int, gpu_bytes: int) -> Plan:
    """The plan plus, when it does not fit, the suggestions."""
    from trainer.memory import shapes

    sh = shapes(cfg)
    p = plan(cfg, world, gpu_bytes, sh)
    if not p.fits:
        p.suggestions = suggest(cfg, world, gpu_bytes, sh)
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
