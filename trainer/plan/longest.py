"""`plan RECIPE --seq-len-max`: the longest data.seq_len a recipe fits at on a GPU, everything else kept.

The plan grows with the sequence (activations, masks, logits, MLP tiles, all-to-all buffers), so the longest length
that fits is found by doubling from the recipe's own until the plan no longer fits, then bisecting, in steps of
1024 tokens (a multiple of distributed.sequence_parallel, so every rank holds a whole share). The model's own
position limit is not a memory question: the answer says when it is beyond it (model.rope_scaling extends it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainer.plan.items import Plan, Shapes
from trainer.plan.peak import plan
from trainer.plan.shapes import shapes
from trainer.recipe import architecture as arch
from trainer.recipe.resolved import ResolvedRun

STEP = 1024  # the search's granularity in tokens
LIMIT = 2**24  # 16M tokens: the search stops there


@dataclass(frozen=True)
class Longest:
    """The answer: the longest length that fits (0 when none does) and its plan, the shortest that does not."""

    seq_len: int
    plan: Plan | None
    too_long: int
    positions: int | None  # the model's position limit (max_position_embeddings), if it has one


def with_seq_len(run: ResolvedRun, seq_len: int) -> ResolvedRun:
    """The run with another data.seq_len, nothing else changed (the plan reads it from the recipe)."""
    data = run.recipe.data.model_copy(update={"seq_len": seq_len})
    return dataclasses.replace(run, recipe=run.recipe.model_copy(update={"data": data}))


def longest_seq_len(run: ResolvedRun, gpu_bytes: int, sh: Shapes | None = None) -> Longest:
    sh = sh or shapes(run)
    step = STEP * run.execution.sequence_parallel

    def fits(n: int) -> Plan | None:
        p = plan(with_seq_len(run, n), gpu_bytes, sh)
        return p if p.fits else None

    low, high = 0, max(step, run.seq_len - run.seq_len % step)
    best = None
    while high <= LIMIT and (found := fits(high)) is not None:  # double until it no longer fits
        low, best, high = high, found, high * 2
    high = min(high, LIMIT + step)
    while high - low > step:  # low fits (or is 0), high does not
        middle = (low + high) // 2 // step * step
        found = fits(middle)
        if found is not None:
            low, best = middle, found
        else:
            high = middle
    return Longest(low, best, high, arch.max_positions(run.architecture))


def render_longest(found: Longest, gpu_bytes: int, title: str) -> str:
    gib = 2**30
    if found.plan is None:
        return f"{title}: not even {found.too_long:,} tokens fit in {gpu_bytes / gib:.0f} GiB"
    p = found.plan
    lines = [f"{title}: the longest data.seq_len that fits in {gpu_bytes / gib:.0f} GiB is {found.seq_len:,} tokens "
             f"(peak {p.peak_bytes / gib:.2f} GiB per GPU; {found.too_long:,} does not fit)"]
    if p.cpu_bytes:
        lines.append(f"  CPU memory at that length: {p.cpu_bytes / gib:.2f} GiB per rank")
    if found.positions is not None and found.seq_len > found.positions:
        lines.append(f"  beyond the model's {found.positions:,} positions: extend them with model.rope_scaling "
                     f"(e.g. {{rope_type: linear, factor: {-(-found.seq_len // found.positions)}.0}})")
    return "\n".join(lines)
