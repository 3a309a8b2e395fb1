"""The DeepSpeed engine: ZeRO stages 1-3, optimizer/parameter offload to CPU, behind the loop's Engine contract.

How the loop's contract maps onto DeepSpeed (base.py states the contract):
- Accumulation: the loop owns it. The config sets `managed_gradient_accumulation: false`, DeepSpeed's mode in
  which `backward()` only accumulates (ZeRO-2/3 still reduce-scatter each micro-batch into the partitions) and
  `step()` is the accumulation boundary. So our `step()`, called once per optimizer step after the last
  micro-batch, is exactly DeepSpeed's boundary; `accumulate(is_last)` only checks that the loop keeps to it.
- Loss: the loop hands over this rank's share of the global mean loss. DeepSpeed divides by its accumulation
  count (we pass `scale_wrt_gas=False`, the loop already weighted every token) and averages gradients over the
  ranks (we multiply by the world size, like DDP in the native engine). The update is then the native
  engine's for the same recipe (tests/test_deepspeed.py compares the trajectories).
- Sequence parallelism (distributed.sequence_parallel: N): every rank of a group of N consecutive ranks gets the
  same rows and computes seq_len / N of their tokens (model/sequence_parallel.py exchanges attention over the
  group); `forward` returns the logits of its columns. DeepSpeed's data parallelism stays every rank, so its
  gradient reduction sums the shards, and the loop's loss (each rank's own tokens over the global count) is unchanged.
- LR: our schedule (trainer.optim.build_scheduler) drives the LR of DeepSpeed's optimizer, advanced once per
  optimizer step, also when fp16 skips one (as in the native engine). DeepSpeed gets no scheduler.
- fp16: DeepSpeed's dynamic loss scaler with the recipe's settings (ds_config.py); an overflow skips the step
  and halves the scale; the non-finite policy (trainer/engine/nonfinite.py) counts the skips, as for the native engine.
- Checkpoints: DeepSpeed's own sharded checkpoint (every rank writes its partitions) in `deepspeed/` inside the
  checkpoint's temporary folder, plus, with `checkpoint.full_weights` (auto: not at ZeRO-3), `model.safetensors`,
  the full fp32 weights gathered from the master partitions on rank 0 (export consolidates them from the shards
  when it is absent). Resume on the world size that saved it uses DeepSpeed's loader; on another one each rank
  builds its new partitions from the saved shards (ds_reshard.py). Loading never unpickles code (ds_files.py).
- Adapter runs (LoRA/QLoRA): the LoRA weights stay fp32 under DeepSpeed's torch_autocast (ds_config.py); at
  ZeRO-3 the base was partitioned as it loaded (zero3_init_context). A checkpoint holds DeepSpeed's files for the
  trainable tensors and their optimizer state only, and `adapter/` (a peft directory, the only weights export
  reads), never the base.

Stage 0 never reaches this module: engine/__init__.py runs it on the native engine (why: see there).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed as tdist
from safetensors.torch import save_file
from torch import nn

from trainer import adapters
from trainer.distributed import DistInfo, all_reduce_sum, ensure_process_group
from trainer.dtypes import torch_dtype
from trainer.engine.base import MODEL_FILE, Forward, StepResult, forward_of
from trainer.engine.ds_config import DEEPSPEED_BUILT, final_ds_config, merge_overrides, precision_section, zero_section
from trainer.engine.ds_files import DS_DIR, TAG, check_files, safe_load
from trainer.engine.ds_reshard import load_resharded
from trainer.engine.op_builds import prepare_builds
from trainer.errors import CheckpointError, ConfigError, Problem
from trainer.model.build import Placement
from trainer.model.sequence_parallel import (SequenceGroup, sequence_group, shard_inputs,
                                             use_sequence_parallel_attention)
from trainer.optim import build_optimizer, build_scheduler, param_groups, restore_schedule
from trainer.recipe.resolved import ResolvedRun
from trainer.safeio import fsync_file

log = logging.getLogger(__name__)

CPU_ADAM = "cpu_adam"


def extensions_dir() -> Path:
    """Where DeepSpeed compiles its C++ ops: TORCH_EXTENSIONS_DIR, defaulting to our own cache folder, not the
    `~/.cache/torch_extensions` that every virtualenv on the machine shares (a build made against another
    torch would be picked up there)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache / "trainer" / "torch_extensions")
        log.info("TORCH_EXTENSIONS_DIR not set: DeepSpeed's compiled ops go to %s", os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def import_deepspeed() -> Any:
    """deepspeed, imported after TORCH_EXTENSIONS_DIR is settled and its stale build locks cleared, with its INFO
    chatter quieted; builds of its C++ ops are reported while they run (engine/op_builds.py)."""
    prepare_builds(extensions_dir())
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    shm = extensions_dir() / "deepspeed_shm_comm"
    if deepspeed.accelerator.get_accelerator().device_name() == "cpu" and not shm.is_dir():
        log.info("DeepSpeed's CPU backend compiles its shm comm op on first use (half a minute to a few, once; "
                 "cached in TORCH_EXTENSIONS_DIR=%s)", extensions_dir())
    return deepspeed


def _warm_cpu_adam(deepspeed: Any) -> None:
    """Build DeepSpeedCPUAdam's C++ op now, with a log line, instead of silently inside deepspeed.initialize."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    cached = extensions_dir() / CPU_ADAM / f"{CPU_ADAM}.so"
    if not cached.exists():
        log.info("compiling DeepSpeed's cpu_adam op (first use, about a minute, longer on a busy machine; cached "
                 "in TORCH_EXTENSIONS_DIR=%s)", extensions_dir())
    CPUAdamBuilder().load(verbose=False)


@contextlib.contextmanager
def config_errors_as_recipe_errors() -> Iterator[None]:
    """DeepSpeed validates its config with pydantic; a bad key or value can only come from
    distributed.deepspeed_overrides (the rest is generated), so it is reported as a recipe problem."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError([Problem("distributed.deepspeed_overrides", {}, f"DeepSpeed rejects the config "
                                   f"({e.title}): {detail}; fix or remove that override")]) from None


def _zero3_init_config(run: ResolvedRun) -> dict[str, Any]:
    """What `deepspeed.zero.Init` reads (the ZeRO section, with its overrides, and the dtype); DeepSpeed's config
    parser also requires a batch size."""
    distributed = run.recipe.distributed
    overrides = {k: v for k, v in distributed.deepspeed_overrides.items() if k == "zero_optimization"}
    precision = precision_section(run.recipe.precision, adapters=run.execution.adapted)
    config = merge_overrides({"zero_optimization": zero_section(run.execution), **precision}, overrides)[0]
    return {"train_micro_batch_size_per_gpu": 1, **config}


def zero3_init_context(run: ResolvedRun) -> ContextManager[Placement]:
    """Model construction under ZeRO-3. Full fine-tuning and from scratch: transformers builds the model inside
    `deepspeed.zero.Init` (see _partitioned_at_creation). Adapter runs: the base is read module by module and each
    module partitioned once loaded (see _partitioned_after_loading)."""
    import_deepspeed()
    ensure_process_group(run.recipe.distributed.backend)
    if run.recipe.adapter.type != "none":
        return _partitioned_after_loading(run)
    return _partitioned_at_creation(run)


@contextlib.contextmanager
def _partitioned_at_creation(run: ResolvedRun) -> Iterator[Placement]:
    """transformers sees a live `HfDeepSpeedConfig` and builds the model inside `deepspeed.zero.Init`, so each
    parameter is partitioned as soon as its module is built (from_config), or gathered one at a time while the
    checkpoint is read (from_pretrained). The full model never exists on one rank. Partitions are made in the
    training dtype (bf16/fp16 per the recipe): DeepSpeed does not cast a ZeRO-3 model later, and fp32 partitions
    under a bf16 config would silently train in fp32.

    It yields how to make a module's parameters whole for a moment: from scratch, model.initialize_by_name
    initializes each module on rank 0 from a generator seeded by its name, so the weights equal those a native or
    ZeRO-1/2 run with the same seed starts from."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    with config_errors_as_recipe_errors():  # zero.Init parses the ZeRO section while the model is built
        keep_alive = HfDeepSpeedConfig(_zero3_init_config(run))  # transformers holds only a weak reference
        try:
            yield Placement(gathered=_gathered_on_rank0)
        finally:
            unset_hf_deepspeed_config()
            del keep_alive


@contextlib.contextmanager
def _partitioned_after_loading(run: ResolvedRun) -> Iterator[Placement]:
    """An adapter run's base cannot be built inside `zero.Init`: a quantized layer's weight only takes its final
    form (packed 4-bit codes, a different shape and dtype) once its values are quantized. So model.build_model
    loads it module by module and hands each loaded module here, and `deepspeed.zero.Init(module=...)` partitions
    its parameters (each rank keeps its 1/N, in the parameter's own dtype; rank 0's values are broadcast first, so
    every rank agrees) and frees the whole copies. The LoRA weights peft attaches are partitioned the same way.
    No `HfDeepSpeedConfig` is live: transformers must build the skeleton as a plain model."""
    import deepspeed

    config = _zero3_init_config(run)

    def partition(module: nn.Module) -> None:
        # mem_efficient_linear off: with it, zero.Init would replace torch.nn.functional.linear for the process
        deepspeed.zero.Init(module=module, config_dict_or_path=config, mem_efficient_linear=False)

    with config_errors_as_recipe_errors():
        yield Placement(gathered=_gathered_on_rank0, partition=partition)


def _gathered_on_rank0(params: list[nn.Parameter]) -> ContextManager[Any]:
    """A partitioned module's parameters made whole on every rank; what rank 0 writes into them is kept."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


class ZeroEngine:
    """A `deepspeed.DeepSpeedEngine` (ZeRO 1-3) behind the loop's Engine contract."""

    def __init__(self, run: ResolvedRun, model: nn.Module, dist: DistInfo) -> None:
        optimizer, precision, distributed = run.recipe.optimizer, run.recipe.precision, run.recipe.distributed
        deepspeed = import_deepspeed()
        ensure_process_group(distributed.backend)
        self.dist = dist
        self.fp16 = precision.dtype == "fp16"
        self.full_weights = run.full_weights
        config, changes = final_ds_config(run)
        for line in changes:
            log.warning("distributed.deepspeed_overrides changes the generated DeepSpeed config: %s", line)
        offload = run.execution.offload_optimizer
        if offload and optimizer.name in DEEPSPEED_BUILT:
            _warm_cpu_adam(deepspeed)
        # adamw: DeepSpeed builds it from the config over our weight-decay groups; others: our torch optimizer.
        client = None if "optimizer" in config else build_optimizer(model, optimizer)
        groups = param_groups(model, optimizer.weight_decay) if client is None else None
        with config_errors_as_recipe_errors():
            self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=client,
                                                    config=config, dist_init_required=False)
        self.module: nn.Module = self.ds.module
        self.sequence = self._sequence_parallel(run)
        self.adapted = adapters.is_adapted(self.module)
        if run.execution.zero3 and not self.adapted:  # adapter runs: fp32 LoRA over a frozen base
            expected = torch_dtype(precision.dtype)
            dtypes = {p.ds_tensor.dtype for p in self.module.parameters() if hasattr(p, "ds_tensor")}
            assert dtypes <= {expected}, f"ZeRO-3 partitions are {dtypes}, not {expected}: build the model inside " \
                                         "model_init_context(distributed, precision)"
        self.scheduler = build_scheduler(self.ds.basic_optimizer, optimizer, run.recipe.train.max_steps)
        self.ds.checkpoint_engine.load = safe_load  # every DeepSpeed read of a checkpoint file goes through it
        if self.adapted:
            self.ds.module_state_dict = self._trainable_state_dict
        self._last_was_boundary = False
        log.info("%s: %s, optimizer %s", run.execution.describe(), precision.dtype,
                 type(self.ds.basic_optimizer).__name__)

    def _sequence_parallel(self, run: ResolvedRun) -> SequenceGroup | None:
        """distributed.sequence_parallel > 1: this rank's group, and the model's attention exchanged over it. The
        gradients need nothing more: DeepSpeed reduces them over every rank, which sums the groups' shards."""
        size = run.execution.sequence_parallel
        if size == 1:
            return None
        group = sequence_group(size)
        core = use_sequence_parallel_attention(self.module)
        log.info("sequence parallel: groups of %d ranks, %d tokens of each sequence per rank, %s attention inside "
                 "the exchange", size, run.seq_len // size, core)
        return group

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> Forward:
        if self.sequence is None:
            return forward_of(self.ds(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False))
        shard = shard_inputs(input_ids, attention_mask, position_ids, self.sequence)
        out = forward_of(self.ds(**shard.kwargs, use_cache=False))
        return Forward(out.logits, out.aux_loss, shard.columns)

    def accumulate(self, is_last: bool) -> ContextManager[Any]:
        self._last_was_boundary = is_last
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # x world size: DeepSpeed averages over ranks; no division by its accumulation count (scale_wrt_gas).
        self.ds.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self) -> StepResult:
        assert self._last_was_boundary, "step() must follow the micro-batch the loop marked is_last"
        self._last_was_boundary = False
        scale = self.loss_scale()
        lr = self.lr()
        self.ds.step()
        skipped = not self.ds.was_step_applied()
        norm = self.ds.get_global_grad_norm()
        self.scheduler.step()
        return StepResult(grad_norm=None if norm is None else float(norm), skipped=skipped, loss_scale=scale,
                          lr=lr, next_loss_scale=self.loss_scale())

    def loss_scale(self) -> float | None:
        return float(self.ds._get_optimizer_loss_scale()) if self.fp16 else None

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    @property
    def updates_in_backward(self) -> bool:
        return False

    def weights_finite(self) -> bool:
        """This rank's share of every trainable weight (ZeRO-3: its partition), then summed over ranks."""
        local = [getattr(p, "ds_tensor", p) for p in self.module.parameters() if p.requires_grad]
        bad = sum(int(not torch.isfinite(t).all()) for t in local if t.numel())
        return all_reduce_sum(bad, self.dist.device) == 0

    def lr(self) -> float:
        return float(self.ds.basic_optimizer.param_groups[0]["lr"])

    def save(self, directory: Path) -> None:
        """Every rank: DeepSpeed's sharded checkpoint (each rank its partitions, rank 0 the module file with our
        counters), then, with checkpoint.full_weights, on rank 0 the full fp32 weights gathered from the master
        partitions (safetensors: a convenience for export and inference, never read on resume) or, in an adapter
        run, the adapter alone (a peft directory): the frozen base is read again from its source on resume."""
        target = directory / DS_DIR
        extra = {"schedule_step": self.scheduler.last_epoch}
        self.ds.save_checkpoint(str(target), tag=TAG, client_state={"trainer": extra}, save_latest=False,
                                exclude_frozen_parameters=self.adapted)
        if self.dist.is_main:
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's recovery scripts unpickle
                (target / script).unlink(missing_ok=True)
        if self.adapted:
            self._save_adapter(directory / adapters.ADAPTER_DIR)
            return
        if not self.full_weights:  # export consolidates them from DeepSpeed's shards (ds_shards.py)
            return
        weights = full_fp32_state_dict(self.module)
        if self.dist.is_main:
            save_file(weights, str(directory / MODEL_FILE), metadata={"format": "pt"})
            fsync_file(directory / MODEL_FILE)

    def _save_adapter(self, folder: Path) -> None:
        """The adapter as a peft directory on rank 0, its weights gathered from the ZeRO-3 partitions (a collective:
        only the trainable tensors are gathered, never the base); ZeRO-1/2 hold them whole already."""
        import deepspeed

        trainable = [p for p in self.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if self.dist.is_main:
                adapters.save_adapter(self.module, folder)

    def _trainable_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """What DeepSpeed's module file holds in an adapter run (it replaces DeepSpeedEngine.module_state_dict):
        the trainable tensors only (under ZeRO-3 their empty placeholders, the values being in the optimizer's
        partitions). DeepSpeed's own `exclude_frozen_parameters` would still write every 4-bit layer's
        quantization constants, which bitsandbytes keeps beside the parameters (about 1/32 of the base)."""
        return {name: p.detach() for name, p in self.module.named_parameters() if p.requires_grad}

    def load(self, directory: Path, saved_world_size: int) -> None:
        """DeepSpeed's own loader on the world size that saved the checkpoint; on another one, each rank builds its
        new partitions from the saved shards (ds_reshard.py). Either way no file is unpickled beyond plain data."""
        target = directory / DS_DIR
        check_files(target)  # every rank checks every file: all refuse together, none waits in a collective
        if saved_world_size != self.dist.world_size:
            client = load_resharded(self.ds, directory, self.dist.rank, self.dist.world_size)
        else:
            # adapter runs: the module file holds the trainable tensors only; the base came from its source
            path, client = self.ds.load_checkpoint(str(target), tag=TAG, load_lr_scheduler_states=False,
                                                   load_module_strict=not self.adapted)
            if path is None:
                client = None
        if "trainer" not in (client or {}):
            raise CheckpointError(f"{directory}: no DeepSpeed checkpoint in {DS_DIR}/ (was it saved by the "
                                  "native engine? distributed.engine must match the run that saved it)")
        extra = client["trainer"]  # type: ignore[index]
        restore_schedule(self.scheduler, int(extra["schedule_step"]))


def full_fp32_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master weights of every parameter, whole, plus persistent buffers (on rank 0; empty
    elsewhere). A collective: every rank calls it. Under ZeRO-3 each parameter is gathered one at a time, so
    only rank 0 ever holds the full set, in CPU memory (4 bytes per parameter during the save)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():  # tied weights appear once; safetensors' loader re-ties them
        full = safe_get_full_fp32_param(param)
        if full is None:  # a frozen parameter: ZeRO keeps no master copy
            full = param.detach()
        if tdist.get_rank() == 0:
            out[name] = full.detach().to("cpu", torch.float32).contiguous().clone()
    persistent = set(module.state_dict().keys())
    for name, buf in module.named_buffers():
        if name in persistent and tdist.get_rank() == 0:
            out[name] = buf.detach().cpu().contiguous().clone()
    return out
