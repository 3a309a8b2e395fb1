"""Gradient memory with per-layer updates (GaLore's or APOLLO's `per_layer: true`, trainer/optim/per_layer.py): a
gradient lives from its hook to its update, so what is alive at once depends on the accumulation, the number of
ranks, and the order in which the ranks reduce the gradients (found by one forward of a narrow copy of the model)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from trainer.optim.per_layer import MAX_IN_FLIGHT, record_first_use
from trainer.plan.items import Item, Kind, Shapes
from trainer.recipe.resolved import ResolvedRun

log = logging.getLogger(__name__)


def per_layer_gradients(run: ResolvedRun, sh: Shapes, weight_bytes: int) -> Item:
    """Without accumulation a gradient lives from its hook to its update: one tensor in one process; under DDP
    the reductions in flight (at most MAX_IN_FLIGHT, full size on refresh steps) and the one arriving. With
    accumulation the gradients of a GaLore refresh step (1 in update_gap) build up at full size, since the SVD needs
    the summed gradient: that step is the peak; APOLLO's always do (its update scales the raw summed gradient)."""
    o = run.recipe.optimizer
    if run.grad_accum_steps > 1:
        when = "on every step (APOLLO scales the raw gradient)" if o.name.startswith("apollo") else \
            f"on refresh steps: 1 in {o.galore.update_gap}"
        return Item(Kind.GRADIENTS, f"gradients (per-layer updates, accumulated at full size {when})",
                    weight_bytes * sh.total)
    if run.world_size == 1:
        return Item(Kind.GRADIENTS, "gradients (per-layer updates: one tensor at a time, the largest)",
                    weight_bytes * max(p.numel for p in sh.params))
    size = {p.name: p.numel for p in sh.params}
    order = [size[n] for n in reduction_order(sh)]
    live = MAX_IN_FLIGHT + 1  # the reductions in flight and the gradient arriving
    window = max(sum(order[i:i + live]) for i in range(max(1, len(order) - live + 1)))
    return Item(Kind.GRADIENTS, f"gradients (per-layer updates: {MAX_IN_FLIGHT} in all-reduce + 1 arriving, "
                "refresh step)", weight_bytes * window)


def reduction_order(sh: Shapes) -> list[str]:
    """Parameter names in the order per-layer updates reduce them under DDP: the reverse of their first use in
    the forward, which the engine records from its first forward (optim/per_layer.py record_first_use). Here
    it comes from one forward of a narrow copy of the model on CPU (same modules and layer count, widths of a
    few units); if that copy cannot be built, from the reverse of the registration order."""
    names = [p.name for p in sh.params]
    narrow = copy.deepcopy(sh.meta.config)
    text = narrow.get_text_config() if hasattr(narrow, "get_text_config") else narrow
    small = {"hidden_size": 4 * sh.heads, "n_embd": 4 * sh.heads, "head_dim": 4, "intermediate_size": 8,
             "n_inner": 8, "moe_intermediate_size": 8, "vocab_size": 32}
    for key, value in small.items():
        if getattr(text, key, None) is not None:
            setattr(text, key, value)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(text, key, None)
        if isinstance(token_id, int) and token_id >= small["vocab_size"]:  # the narrow embedding would refuse the
            setattr(text, key, 0)  # real vocabulary's pad id as its padding_idx
    used: dict[Any, None] = {}
    try:  # the random init draws from a forked RNG: planning never moves the run's random streams
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = AutoModelForCausalLM.from_config(narrow)
            record_first_use(model, used)
            model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    except Exception as e:  # noqa: BLE001  an architecture that does not shrink: registration order, reversed
        log.info("reduction order of per-layer updates planned from the registration order (%s: %s)",
                 type(e).__name__, e)
        return names[::-1]
    by_param = {p: n for n, p in model.named_parameters()}
    first = [by_param[p] for p in used if p in by_param]
    seen = set(first)
    return first[::-1] + [n for n in names[::-1] if n not in seen]
