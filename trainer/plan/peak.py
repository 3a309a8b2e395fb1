"""The memory plan of one resolved recipe: what each GPU holds at its peak, computed before launch from the real
model shapes (the model on the meta device; nothing is loaded).

Per rank: the model states as the engine keeps them (plan/states.py, from the engine's spec), the activations of
one micro-batch, the masks of packed rows, the logits and the loss (plan/activations.py), autocast's cast copies
and an INT8 layer dequantized in flight, the optimizer step's temporaries, and an allowance for the CUDA context
(0.75 GiB) and allocator fragmentation (8%). The peak is the larger of the forward/backward phase (weights,
optimizer state, gradients, activations, logits; with checkpointing the recomputed layer and the logits are not
alive at once) and the optimizer-step phase (weights, state, gradients, step temporaries), plus the allowance.
"""

from __future__ import annotations

from trainer.plan import activations as act
from trainer.plan.disk import checkpoint_size
from trainer.plan.items import GiB, Item, Kind, Plan, Shapes
from trainer.plan.shapes import shapes
from trainer.plan.states import autocast_copies, model_states, step_temporaries
from trainer.recipe.resolved import ResolvedRun

CUDA_CONTEXT = int(0.75 * GiB)
FRAGMENTATION = 0.08


def activation_items(run: ResolvedRun, sh: Shapes) -> list[Item]:
    """The activations of one micro-batch (on the GPU, and in pinned CPU memory when offloaded), the packed rows'
    masks and the logits."""
    m = run.recipe.model
    checkpointing = "with" if m.gradient_checkpointing else "without"
    saved = act.activation_bytes(run, sh, m.gradient_checkpointing)
    moved = act.offloaded_bytes(run, sh)
    mb, rows = run.recipe.train.micro_batch_size, act.sequences_per_micro_batch(run)
    pairs = f"{mb} pair{'s' if mb > 1 else ''} = " if rows != mb else ""
    sp = run.execution.sequence_parallel
    per_rank = f" ({run.seq_len // sp} per rank, sequence parallel over {sp})" if sp > 1 else ""
    tokens = f"{pairs}{rows} x {run.recipe.data.seq_len} tokens{per_rank}, {act.packing_label(run)}"
    if moved:
        items = [Item(Kind.ACTIVATIONS, f"activations on the GPU ({tokens}, {checkpointing} checkpointing, "
                      "offloaded)", saved - moved + act.offload_window_bytes(run, sh),
                      note="two layers' worth in flight"),
                 Item(Kind.OFFLOADED_ACTIVATIONS, "activations offloaded to pinned CPU memory", moved, where="cpu")]
    else:
        items = [Item(Kind.ACTIVATIONS, f"activations ({tokens}, {checkpointing} checkpointing)", saved)]
    mask = act.packed_mask_bytes(run)
    if mask:
        items.append(Item(Kind.ATTENTION_MASKS, "block-diagonal attention masks of packed rows", mask,
                          note=f"{act.attention_of(run)}; none with flash_attention_2"))
    if run.recipe.model.head_in_loss:
        items.append(Item(Kind.LOGITS, "LM head inside the loss (hidden-state gradient, one chunk of logits)",
                          act.logits_bytes(run, sh), note="no logits of the whole sequence"))
    else:
        items.append(Item(Kind.LOGITS, "logits and loss (logits, their gradient, one fp32 chunk)",
                          act.logits_bytes(run, sh)))
    reference = act.reference_forward_bytes(run, sh)
    if reference:
        stored = run.recipe.objective.reference == "stored" or (run.recipe.objective.reference == "auto"
                                                                and run.recipe.adapter.type == "none")
        how = ("once before the first step; then 8 B per sequence on disk, memory-mapped, and no reference model"
               if stored else "every micro-batch, the base with its adapters disabled: no copy of the model")
        items.append(Item(Kind.REFERENCE, "reference forward (no_grad; its logits, one layer in flight)", reference,
                          note=f"{how}; a phase of its own, before the policy's forward"))
    tile = act.mlp_tile_bytes(run, sh)
    if tile:
        items.append(Item(Kind.MLP_TILE, f"one MLP tile's intermediates ({run.mlp_tiles} tiles)", tile,
                          note="inside a layer: not alive with the logits"))
    exchange = act.exchange_bytes(run, sh)
    if exchange:
        items.append(Item(Kind.EXCHANGE, "all-to-all buffers of one attention layer (sequence parallel)", exchange,
                          note="inside a layer: not alive with the logits"))
    return items


def transient_items(run: ResolvedRun, sh: Shapes, inside_backward: bool, temporaries: int) -> list[Item]:
    """Cast copies, an INT8 layer dequantized in flight, and the optimizer step's temporaries."""
    items = []
    casts = autocast_copies(run, sh)
    if casts:
        items.append(Item(Kind.CAST_COPIES, f"{run.recipe.precision.dtype} cast copies of the weights (autocast)",
                          casts))
    dequantized = act.dequantized_in_flight(run, sh)
    if dequantized:
        items.append(Item(Kind.DEQUANTIZED, "INT8 layer dequantized in flight (inside one matmul)", dequantized))
    items.append(Item(Kind.STEP_TEMPORARIES, "optimizer step temporaries", temporaries,
                      note="inside backward (per-layer updates)" if inside_backward else
                      "counted in the step phase only"))
    return items


def plan(run: ResolvedRun, gpu_bytes: int = 24 * GiB, sh: Shapes | None = None) -> Plan:
    """The plan of one resolved recipe (at its world size), against a GPU of gpu_bytes."""
    sh = sh or shapes(run)
    states = model_states(run, sh)
    on_gpu = sum(i.bytes for i in states.items if i.where == "gpu")
    temporaries = step_temporaries(run, sh, states)
    inside = run.recipe.optimizer.per_layer  # per-layer updates step inside backward, with the activations alive
    items = states.items + activation_items(run, sh) + transient_items(run, sh, inside, temporaries)
    transients = sum(i.bytes for i in items if i.kind in (Kind.CAST_COPIES, Kind.DEQUANTIZED))
    forward = on_gpu + act.forward_backward_bytes(run, sh) + transients + (temporaries if inside else 0)
    step = on_gpu + temporaries
    reference = on_gpu + transients + act.reference_forward_bytes(run, sh)
    base = max(forward, step, reference)
    allowance = CUDA_CONTEXT + int(FRAGMENTATION * base)
    items.append(Item(Kind.ALLOWANCE, "CUDA context and allocator fragmentation", allowance,
                      note=f"{CUDA_CONTEXT / GiB:.2f} GiB context + {FRAGMENTATION:.0%} of the rest"))
    return Plan(run.world_size, gpu_bytes, items, base + allowance,
                "forward/backward" if forward >= max(step, reference) else
                "optimizer step" if step >= reference else "reference forward",
                act.activation_bytes(run, sh, False), act.activation_bytes(run, sh, True), sh.total,
                states.trainable, act.offloaded_bytes(run, sh), checkpoint=checkpoint_size(run, sh),
                active_parameters=sh.active, experts=sh.experts)
