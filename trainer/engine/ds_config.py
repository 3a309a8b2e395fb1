"""The DeepSpeed config, generated from the recipe: one source of truth, no "auto" values to mismatch.

Every value DeepSpeed needs comes from a recipe key (the mapping is the table in `build_ds_config`):
batch sizes and accumulation from the resolved run, clipping and the optimizer from `optimizer`, bf16/fp16 and the loss
scaling from `precision`, the ZeRO section and offload from `distributed`. `distributed.deepspeed_overrides` is
merged last (an expert escape hatch; every changed key is logged). Keys that would contradict the recipe or the
loop (the batch sizes, the stage, the dtype, the LR schedule, who owns accumulation) cannot be overridden:
the DeepSpeed spec rejects them at validation (DEEPSPEED_OWNED below), naming the recipe key to use instead.

Nothing here imports torch or DeepSpeed: `python -m trainer validate` prints this config on a login node.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from trainer.recipe.execution import Execution
from trainer.recipe.resolved import ResolvedRun
from trainer.recipe.schema import DistributedConfig, OptimizerConfig, PrecisionConfig

# Keys of the generated DeepSpeed config that the recipe owns, and the recipe key to set instead: an override of
# one of them (distributed.deepspeed_overrides) would contradict the recipe or the loop.
DEEPSPEED_OWNED: dict[str, str] = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "managed_gradient_accumulation": "(none: the loop owns accumulation)",
    "gradient_clipping": "optimizer.grad_clip",
    "scheduler": "optimizer.schedule (our schedule drives the LR)",
    "bf16.enabled": "precision.dtype",
    "fp16.enabled": "precision.dtype",
    "fp16.initial_scale_power": "precision.initial_loss_scale",
    "fp16.loss_scale_window": "precision.loss_scale_growth_interval",
    "torch_autocast": "precision.dtype (adapter runs train under autocast)",
    "zero_optimization.stage": "distributed.zero_stage",
    "zero_optimization.offload_optimizer.device": "distributed.offload_optimizer",
    "zero_optimization.offload_param.device": "distributed.offload_params",
}

# DeepSpeed's defaults for what ZeRO-3 keeps whole and gathers ahead (elements); the recipe can change them only
# through distributed.deepspeed_overrides, and the plan reads them from here.
PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: tensors this small stay whole on every rank
PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size: what is gathered ahead of the module computing

# Optimizers DeepSpeed builds itself from its config (torch AdamW, or DeepSpeedCPUAdam when offloading); the
# others are our torch optimizers handed to DeepSpeed, which wraps them in ZeRO.
DEEPSPEED_BUILT = ("adamw",)


def precision_section(p: PrecisionConfig, adapters: bool = False) -> dict[str, Any]:
    """bf16: DeepSpeed's bf16 params and grads, fp32 master weights in the ZeRO optimizer. fp16: dynamic loss
    scaling with our settings; hysteresis 1 halves the scale on every overflow, as our native GradScaler does.

    Adapter runs in bf16 keep the native engine's mixed precision instead: fp32 LoRA weights (the optimizer's own
    master copy), gradients reduced in fp32, and torch.autocast around the forward (DeepSpeed's `torch_autocast`;
    the empty module list keeps every gradient reduction in fp32). DeepSpeed's bf16 mode would cast every
    floating-point parameter to bf16: the LoRA weights and the fp32 norm scales, and 4-bit codes stored as fp32
    into garbage; and without autocast a bf16 head would meet the fp32 residual stream."""
    if adapters and p.dtype == "bf16":
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
    if p.dtype == "bf16":
        return {"bf16": {"enabled": True}}
    if p.dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": int(math.log2(p.initial_loss_scale)),
                         "loss_scale_window": p.loss_scale_growth_interval, "hysteresis": 1,
                         "consecutive_hysteresis": False, "min_loss_scale": 1}}
    return {}


def _optimizer(o: OptimizerConfig, offload: bool) -> dict[str, Any]:
    """adamw maps to DeepSpeed's AdamW: torch.optim.AdamW on the partitions, or DeepSpeedCPUAdam (a C++ op, same
    update) when the optimizer state lives in CPU memory. Weight-decay groups come with the parameters."""
    if o.name not in DEEPSPEED_BUILT:
        return {"zero_allow_untested_optimizer": True}
    params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if not offload:
        params["torch_adam"] = True  # torch's AdamW, not FusedAdam (a CUDA op that would compile on first use)
    return {"optimizer": {"type": "AdamW", "params": params}}


def zero_section(e: Execution) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def build_ds_config(run: ResolvedRun) -> dict[str, Any]:
    """The generated config before overrides.

    | DeepSpeed key                        | from                                            |
    |--------------------------------------|-------------------------------------------------|
    | train_micro_batch_size_per_gpu       | train.micro_batch_size                          |
    | gradient_accumulation_steps          | train.grad_accum_steps / global_batch_size      |
    | train_batch_size                     | micro x accumulation x world size (all ranks)   |
    | managed_gradient_accumulation: false | the loop's accumulate(is_last)/step() own it    |
    | gradient_clipping                    | optimizer.grad_clip (0 = off)                   |
    | bf16 / fp16 (+ loss scaling)         | precision.* (adapter runs: torch_autocast)      |
    | optimizer                            | optimizer.* (adamw; others are passed in)       |
    | zero_optimization                    | distributed.zero_stage, offload_*               |
    """
    optimizer = run.recipe.optimizer
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": run.micro_batch_size,
        "gradient_accumulation_steps": run.grad_accum_steps,
        # DeepSpeed's data parallelism is every rank (the ranks of a sequence-parallel group reduce their gradients
        # with the others, model/sequence_parallel.py), so its batch counts each group's sequences once per rank
        "train_batch_size": run.global_batch_size * run.execution.sequence_parallel,
        "managed_gradient_accumulation": False,
        "gradient_clipping": optimizer.grad_clip or 0.0,
        "steps_per_print": None,  # our metrics log the steps; DeepSpeed's own progress lines would duplicate them
        "wall_clock_breakdown": False,
        "zero_optimization": zero_section(run.execution),
    }
    config.update(precision_section(run.recipe.precision, adapters=run.execution.adapted))
    config.update(_optimizer(optimizer, run.execution.offload_optimizer))
    return config


def _zero_override(d: DistributedConfig, key: str, default: int) -> int:
    zero = d.deepspeed_overrides.get("zero_optimization") or {}
    return int(zero.get(key, default))


def persistence_threshold(d: DistributedConfig) -> int:
    """ZeRO-3 keeps a tensor of at most this many elements whole on every rank once it has been gathered."""
    return _zero_override(d, "stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD)


def prefetch_bucket_elements(d: DistributedConfig) -> int:
    """ZeRO-3 gathers up to this many elements ahead of the module computing."""
    return _zero_override(d, "stage3_prefetch_bucket_size", PREFETCH_BUCKET)


def owned_override_paths(overrides: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(override key, its value, recipe key to use) for every DeepSpeed override the recipe owns."""
    out = []
    for path, recipe_key in DEEPSPEED_OWNED.items():
        node: Any = overrides
        for part in path.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            out.append((path, node, recipe_key))
    return out


_MISSING = object()


def merge_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`config` with `overrides` merged in (dicts recursively, other values replaced), and one line per changed
    key ('key: old -> new') for the log."""
    merged = copy.deepcopy(config)
    changes: list[str] = []

    def merge(into: dict[str, Any], new: dict[str, Any], prefix: str) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v, f"{prefix}{k}.")
                continue
            if into.get(k, object()) != v:
                changes.append(f"{prefix}{k}: {into.get(k)!r} -> {v!r}")
            into[k] = copy.deepcopy(v)

    merge(merged, overrides, "")
    return merged, changes


def final_ds_config(run: ResolvedRun) -> tuple[dict[str, Any], list[str]]:
    """The config DeepSpeed gets (generated, then overrides) and the override changes to log."""
    return merge_overrides(build_ds_config(run), run.recipe.distributed.deepspeed_overrides)
