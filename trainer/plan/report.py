"""How a plan is shown: the one-screen table `python -m trainer plan` prints (lines, verdict, CPU memory per node,
checkpoint size, suggestions), its JSON form, and the sizes users type (`--gpu-memory 24GiB`)."""

from __future__ import annotations

import json
from dataclasses import asdict

import psutil

from trainer.plan.items import GiB, Plan, Suggestion


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


def _item_lines(p: Plan) -> list[str]:
    width = max(len(i.name) for i in p.items) + 2
    lines = []
    for i in p.items:
        where = "" if i.where == "gpu" else "  (CPU memory)"
        note = f"  [{i.note}]" if i.note else ""
        lines.append(f"  {i.name:<{width}} {i.bytes:>16,} B {i.bytes / GiB:8.2f} GiB{where}{note}")
    return lines


def _suggestion_lines(p: Plan, ranks_per_node: int) -> list[str]:
    if not p.suggestions:
        return ["  no change the trainer supports makes it fit; use more or larger GPUs"]
    lines = ["  changes that make it fit, cheapest first:" if p.suggestions[0].fits else
             "  no combination of up to three changes fits; the closest:"]
    for n, s in enumerate(p.suggestions, 1):
        mark = "fits" if s.fits else "still too big"
        saved = (p.peak_bytes - s.peak_bytes) / GiB
        lines.append(f"  {n}. {s.label}: -{saved:.2f} GiB -> {s.peak_bytes / GiB:.2f} GiB ({mark})")
        lines.append(f"     {' '.join(s.overrides)}")
        lines += host_memory_lines(s.cpu_bytes, ranks_per_node, indent="     ")
    return lines


def render(p: Plan, title: str, gpus_per_node: int | None = None) -> str:
    """The one-screen table `python -m trainer plan` prints."""
    ranks_per_node = min(p.world_size, gpus_per_node or p.world_size)
    lines = [f"memory plan for {title}: {_count(p.parameters)} parameters ({p.trainable / 1e6:,.1f}M "
             f"trainable), {p.world_size} GPU{'s' if p.world_size > 1 else ''}, per rank:", ""]
    lines += _item_lines(p)
    lines.append("")
    if p.experts:
        e = p.experts
        lines.append(f"  mixture of experts: {e.layers} layers x {e.count} experts of intermediate size "
                     f"{e.intermediate}, {e.active} active per token; experts {_count(e.parameters)}, routers "
                     f"{_count(e.router_parameters)}; {_count(p.active_parameters)} of the {_count(p.parameters)} "
                     "parameters active per token")
    lines.append(f"  activations would be {p.activations_without_checkpointing / GiB:.2f} GiB without gradient "
                 f"checkpointing and {p.activations_with_checkpointing / GiB:.2f} GiB with it")
    if p.offloaded_activations:
        lines.append(f"  activation offload keeps {p.offloaded_activations / GiB:.2f} GiB of them in pinned CPU memory")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"  predicted peak: {p.peak_bytes / GiB:.2f} GiB per GPU (during the {p.phase}); {verdict} in "
                 f"{p.gpu_bytes / GiB:.0f} GiB")
    lines += host_memory_lines(p.cpu_bytes, ranks_per_node)
    lines.append(checkpoint_line(p))
    if not p.fits:
        lines.append("")
        lines += _suggestion_lines(p, ranks_per_node)
    return "\n".join(lines)


def suggestion_json(s: Suggestion) -> dict[str, object]:
    return {"change": s.label, "overrides": list(s.overrides), "peak_bytes": s.peak_bytes, "fits": s.fits,
            "cpu_bytes": s.cpu_bytes, "changes": list(s.changes)}


def as_json(p: Plan) -> str:
    items = [{**asdict(i), "kind": i.kind.value} for i in p.items]
    return json.dumps({"world_size": p.world_size, "gpu_bytes": p.gpu_bytes, "parameters": p.parameters,
                       "trainable_parameters": p.trainable, "peak_bytes": p.peak_bytes, "fits": p.fits,
                       "phase": p.phase, "activations_without_checkpointing": p.activations_without_checkpointing,
                       "activations_with_checkpointing": p.activations_with_checkpointing,
                       "offloaded_activations": p.offloaded_activations,
                       "active_parameters": p.active_parameters,
                       "experts": asdict(p.experts) if p.experts else None,
                       "checkpoint_bytes": p.checkpoint.total, "checkpoint_rank0_bytes": p.checkpoint.rank0,
                       "items": items, "suggestions": [suggestion_json(s) for s in p.suggestions]}, indent=2)


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G', '1.5TiB' -> bytes (G/GiB are binary; GB decimal)."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 10**12, "gb": 10**9, "mb": 10**6, "t": 2**40,
             "g": 2**30, "m": 2**20}
    low = text.strip().lower().replace(" ", "")
    for unit, factor in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * factor)
    return int(float(low))
