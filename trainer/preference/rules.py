"""What a preference objective needs of the rest of a recipe (read by trainer/recipe/rules.py): the data format it
trains on, no packing of pairs, a reference it can have. Pure: the typed recipe only."""

from __future__ import annotations

from typing import Callable

from trainer.errors import Problem
from trainer.recipe.schema import PAIRED_OBJECTIVES, PREFERENCE_FORMATS, REFERENCE_OBJECTIVES, Recipe

Source = Callable[[str], str]


def _formats(r: Recipe) -> set[str]:
    d = r.data
    return {e.format or d.format for e in d.sources} if d.sources else {d.format}


def problems(r: Recipe, src: Source) -> list[Problem]:
    o, out = r.objective, []
    formats = _formats(r)
    wanted = "preference" if o.name in PAIRED_OBJECTIVES else "kto" if o.name == "kto" else None
    if wanted is None and formats & set(PREFERENCE_FORMATS):
        fmt = sorted(formats & set(PREFERENCE_FORMATS))[0]
        out.append(Problem("objective.name", o.name, f"data.format {fmt} holds preference rows: set objective.name "
                           f"to {'dpo, simpo or orpo' if fmt == 'preference' else 'kto'}", src("objective.name")))
    elif wanted is not None and formats != {wanted}:
        out.append(Problem("data.format", sorted(formats)[0] if len(formats) == 1 else sorted(formats),
                           f"objective.name {o.name} trains on data.format: {wanted} (every source)",
                           src("data.format")))
    if wanted is not None and r.data.packing in ("concat", "isolated"):
        out.append(Problem("data.packing", r.data.packing, "preference examples are not packed: a pair is two "
                           "sequences of a micro-batch; use auto or none", src("data.packing")))
    if o.name in REFERENCE_OBJECTIVES and o.reference == "adapters_disabled" and r.adapter.type == "none":
        out.append(Problem("objective.reference", o.reference, "full training has no adapters to disable: use auto "
                           "or stored (the reference log-probs are computed once and stored)",
                           src("objective.reference")))
    if o.label_smoothing and (o.name not in ("dpo", "simpo") or o.loss_type != "sigmoid"):
        out.append(Problem("objective.label_smoothing", o.label_smoothing, "applies to dpo with loss_type sigmoid "
                           "and to simpo; set it to 0", src("objective.label_smoothing")))
    if o.beta is not None and o.name in ("sft", "orpo"):
        out.append(Problem("objective.beta", o.beta, f"objective.name {o.name} has no beta (orpo's weight is "
                           "objective.orpo_lambda); remove it", src("objective.beta")))
    if o.preference and r.distributed.sequence_parallel > 1:
        out.append(Problem("distributed.sequence_parallel", r.distributed.sequence_parallel, "a preference objective "
                           "compares whole sequences' log-probs, which sequence parallelism splits over ranks; set it "
                           "to 1", src("distributed.sequence_parallel")))
    if o.preference and r.model.head_in_loss:
        out.append(Problem("model.head_in_loss", True, "a preference objective takes per-sequence log-probs from the "
                           "logits; set it to false", src("model.head_in_loss")))
    if o.preference and r.model.activation_offload:
        out.append(Problem("model.activation_offload", True, "not yet tested with a preference objective (two "
                           "forwards per micro-batch); set it to false", src("model.activation_offload")))
    return out
