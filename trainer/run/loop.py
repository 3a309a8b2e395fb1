"""train(run): the one training loop. It talks to an Engine and never branches on the backend."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from trainer.model.activation_offload import ActivationOffload
from trainer.adapters.base_identity import Identity, identify
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.choose import peek_resume, verified_resume
from trainer.checkpoint.compat import ResumeAllowances, base_refusal, batch_change_problem
from trainer.checkpoint.state import RunFingerprint, SavedRun, TrainState
from trainer.data.batches import Batch, TrainData
from trainer.data.plans import RUN_PLAN_DIR
from trainer.distributed import (DistInfo, all_reduce_sum, all_reduce_sums, barrier, broadcast_object,
                                 distributed_context, job_id, restart_count)
from trainer.engine.base import Engine, Forward, StepResult
from trainer.engine.build import build_engine, model_init_context
from trainer.errors import EXIT_RECIPE, CheckpointError
from trainer.faults import Faults
from trainer.logs import add_run_log
from trainer.model.loss import head_into_loss, token_loss_sum
from trainer.run.metrics import Metrics, peak_memory_bytes, start_wandb, truncate_rows
from trainer.model.build import build_model, save_model_files
from trainer.engine.nonfinite import NonFinitePolicy
from trainer.run.preemption import PreemptionFlag
from trainer.run.preference import attach_stored_reference, preference_loss, reference_mode
from trainer.preference.objective import means
from trainer.plan.preflight import check_disk, check_memory
from trainer.recipe.architecture import router_aux_loss_coef
from trainer.recipe.read import COMMAND_LINE, to_yaml
from trainer.recipe.resolved import ResolvedRun
from trainer.run_lock import output_dir_lock
from trainer.model.sharding_check import check_base_sharded
from trainer.model.tokenizer import build_tokenizer, settle_chat_template

log = logging.getLogger(__name__)


@dataclass
class Training:
    """Everything the loop needs, built once by `setup`."""

    run: ResolvedRun
    dist: DistInfo
    engine: Engine
    data: TrainData
    metrics: Metrics
    checkpointer: Checkpointer
    state: TrainState
    preemption: PreemptionFlag
    faults: Faults
    nonfinite: NonFinitePolicy
    offload: ActivationOffload | None = None  # model.activation_offload
    head: torch.Tensor | None = None  # model.head_in_loss: the LM head's weight, applied inside the loss


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step as every rank agrees on it."""

    loss: float  # mean token loss over the global batch
    tokens: int  # tokens in the global batch (padding excluded)
    stop_requested: bool  # some rank received a preemption signal
    result: StepResult
    aux_loss: float | None = None  # MoE load-balancing loss, mean over the micro-batches of every rank
    preference: dict[str, float] | None = None  # preference objectives: rewards, margins, accuracy, log-probs


@dataclass(frozen=True)
class Summary:
    """How a run ended (returned by `train`, printed by the CLI)."""

    steps: int
    first_loss: float  # the loss of this start's first step (after a resume: the step after the checkpoint)
    last_loss: float
    tokens: int  # trained on by this start
    seconds: float
    output_dir: str
    preempted: bool = False
    already_done: bool = False  # the run had reached train.max_steps before this start: nothing was touched
    resumed_at: int = 0  # the step of the checkpoint this start resumed from (0: a fresh run)

    def losses(self) -> str:
        """'loss 5.5550 -> 2.2426', or after a resume 'resumed at step 100; loss 2.3063 (step 101) -> 2.2426', so a
        first loss that is not the run's first does not read like a divergence."""
        if self.resumed_at:
            return (f"resumed at step {self.resumed_at}; loss {self.first_loss:.4f} (step {self.resumed_at + 1}) -> "
                    f"{self.last_loss:.4f}")
        return f"loss {self.first_loss:.4f} -> {self.last_loss:.4f}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _asset_writer(model: nn.Module, tokenizer: Any) -> Callable[[Path], None]:
    """What a checkpoint needs to be exported without the recipe's sources (model.save_model_files)."""
    return lambda path: save_model_files(model, tokenizer, path)


def setup(run: ResolvedRun, dist: DistInfo, start_over: bool = False) -> Training:
    """Build tokenizer, data, model and engine for this rank, and resume if a checkpoint says so. `start_over`
    (train --force) moves unusable or foreign checkpoints aside instead of refusing, and lets an adapter resume
    over another base than it was trained on (warned)."""
    r = run.recipe
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    faults = Faults.from_environment(dist.rank, restart_count())
    wandb_run = start_wandb(r.logging, out, r.model_dump()) if dist.is_main else None  # before the heavy work
    tokenizer = build_tokenizer(r.model)
    template = settle_chat_template(tokenizer, r.data)
    if template:
        log.info("chat template: %s", template)
    # sequence parallelism: the ranks of a group take the same sequences (each computes its own tokens of them)
    data = TrainData(r.data, tokenizer, seed=r.train.seed, rank=run.data_rank(dist.rank),
                     world_size=run.data_parallel_size,
                     micro_batch_size=r.train.micro_batch_size, grad_accum_steps=run.grad_accum_steps, job=job_id(),
                     progress=dist.is_main and r.logging.progress_bar, on_chunk=faults.during_prepare,
                     plan_dir=out / RUN_PLAN_DIR)
    with model_init_context(run) as placement:
        model = build_model(run, tokenizer, device=dist.device, placement=placement)
    check_base_sharded(run, model)  # before the engine: a base held whole stops here, with the numbers
    seed_everything(r.train.seed + dist.rank)  # dropout differs per rank, reproducibly
    engine = build_engine(run, model, dist)
    base: Any = broadcast_object(base_identity(run) if dist.is_main else None)  # after loading: a hub base is cached
    fingerprint = RunFingerprint(run.global_batch_size, dist.world_size, run.grad_accum_steps, data.identity, base)
    allowances = ResumeAllowances(explicit_batch=explicit_batch(run), data_change=r.checkpoint.allow_data_change,
                                  other_base=start_over)
    ckpt = Checkpointer(r, out, dist, fingerprint, _asset_writer(model, tokenizer), faults, start_over=start_over,
                        allowances=allowances)
    path = ckpt.choose()
    state = ckpt.restore(engine, path) if path else TrainState()
    if dist.is_main:
        (out / "config.yaml").write_text(to_yaml(r), encoding="utf-8")
        truncate_rows(out / "metrics.jsonl", state.step)  # rows a crashed attempt logged after its checkpoint
    unit = "sequences" if r.objective.name == "sft" else "pairs" if data.train_sets[0].mode == "pairs" else \
        "completions"
    log.info("world size %d, micro-batch %d x %d accumulation = global batch %d %s of %d tokens; "
             "%s, %s, %d steps%s", dist.world_size, r.train.micro_batch_size, run.grad_accum_steps,
             run.global_batch_size, unit, r.data.seq_len, r.precision.dtype, r.optimizer.name, r.train.max_steps,
             f", objective {r.objective.name}" if r.objective.preference else "")
    for warning in run.warnings:
        log.warning("%s", warning)
    metrics = Metrics(r.logging, out, enabled=dist.is_main, max_steps=r.train.max_steps, start_step=state.step,
                      wandb_run=wandb_run)
    nonfinite = NonFinitePolicy(r, state.nonfinite)  # counts into the state the checkpoint saves
    offload = ActivationOffload(engine.module, dist.device) if r.model.activation_offload else None
    if reference_mode(r) == "stored":  # after restore: a resumed model is no longer the reference
        attach_stored_reference(r, data, engine, lambda b: engine.forward(**b.model_inputs(dist.device)), dist,
                                state.step, dist.is_main and r.logging.progress_bar)
    head = head_into_loss(engine.module) if r.model.head_in_loss else None
    return Training(run, dist, engine, data, metrics, ckpt, state, PreemptionFlag(), faults, nonfinite, offload,
                    head)


def train_step(t: Training, batches: list[Batch]) -> StepOutcome:
    """Forward/backward over this rank's micro-batches and one optimizer step. The global loss, token count and
    whether any rank was asked to stop come back in one collective, before the update: a NaN/inf loss (outside
    fp16's loss scaling) stops the run, or skips the step, before anything is applied.

    What is differentiated: the mean token loss over the global batch (a preference objective: the mean loss of its
    pairs or completions, trainer/run/preference.py), plus, for a mixture-of-experts model whose
    config sets output_router_logits, router_aux_loss_coef times its load-balancing loss averaged over the
    micro-batches of every rank (what transformers adds to its own loss for one batch). The logged `loss` stays the
    token loss, so it compares with dense models and evaluation; the load-balancing loss is logged as `aux_loss`."""
    dev, step = t.dist.device, t.state.step + 1
    copies = t.run.execution.sequence_parallel  # ranks holding each batch (each computes its own columns)
    loss_tokens = all_reduce_sum(sum(b.num_loss_units() for b in batches), dev) / copies
    aux_weight = router_aux_loss_coef(t.run.architecture) / (len(batches) * t.dist.world_size)
    local_sum = torch.zeros((), dtype=torch.float64, device=dev)
    local_aux = torch.zeros((), dtype=torch.float64, device=dev)
    has_aux = False
    stats: dict[str, tuple[float, float]] = {}
    for i, b in enumerate(batches):
        with t.engine.accumulate(is_last=i == len(batches) - 1):
            loss_sum, aux, micro_stats = _losses(t, b)
            stats = add_stats(stats, micro_stats)
            if t.engine.updates_in_backward:  # weights change inside backward: check before it, on every rank
                _check_before_backward(t, step, loss_sum)
            objective = loss_sum / max(loss_tokens, 1.0)
            if aux is not None:
                objective = objective + aux_weight * aux
                local_aux += aux.detach()
                has_aux = True
            t.engine.backward(objective)
        local_sum += loss_sum.detach()
    t.faults.after_backward(step, t.engine.module)
    local_tokens = sum(b.num_tokens() for b in batches)
    total, tokens, stop, aux_total = all_reduce_sums([local_sum.item(), local_tokens, float(t.preemption.requested),
                                                      local_aux.item()], dev)
    tokens /= copies
    loss = total / max(loss_tokens, 1.0)
    t.nonfinite.check_loss(step, loss, t.checkpointer.last_good)  # raises unless steps may be skipped
    result = t.engine.step()
    t.nonfinite.judge(step, loss, result, t.checkpointer.last_good)
    aux_mean = aux_total / (len(batches) * t.dist.world_size) if has_aux else None
    preference = means(reduce_stats(stats, dev)) if stats else None
    return StepOutcome(loss, int(tokens), stop > 0, result, aux_mean, preference)


def _losses(t: Training, b: Batch) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, tuple[float, float]]]:
    """One micro-batch's summed loss (tokens, or a preference objective's examples), its load-balancing loss (None
    without one) and its preference statistics (empty for sft). The logits die here, inside the loss, which keeps
    only their gradient (trainer/model/loss.py)."""
    if t.run.recipe.objective.preference:
        out, aux = preference_loss(t.run.recipe, t.engine, lambda batch: _forward(t, batch), b, t.dist.device)
        return out.loss_sum, aux, out.stats
    forward = _forward(t, b)
    loss = token_loss_sum(forward.logits, b.labels.to(t.dist.device), forward.columns, t.head)
    return loss, forward.aux_loss, {}


def add_stats(total: dict[str, tuple[float, float]],
              more: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """{name: (sum, count)} added key by key."""
    return {k: (total.get(k, (0.0, 0.0))[0] + v[0], total.get(k, (0.0, 0.0))[1] + v[1]) for k, v in more.items()}


def reduce_stats(stats: dict[str, tuple[float, float]], device: torch.device) -> dict[str, tuple[float, float]]:
    """The statistics summed over ranks (every rank has the same names: the objective's)."""
    names = sorted(stats)
    flat = all_reduce_sums([x for name in names for x in stats[name]], device)
    return {name: (flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(names)}


def _forward(t: Training, b: Batch) -> Forward:
    """One micro-batch's forward; with activation offload, what it saves for backward goes to host memory (the
    loss's own saved gradient stays: it is consumed first in backward)."""
    with t.offload.saving() if t.offload else contextlib.nullcontext():
        return t.engine.forward(**b.model_inputs(t.dist.device))


def _check_before_backward(t: Training, step: int, loss_sum: torch.Tensor) -> None:
    """Per-layer updates: a non-finite micro-batch loss on any rank stops the run before its backward applies
    anything (train.max_nonfinite_steps must be 0 with them: trainer/engine/nonfinite.py)."""
    bad = all_reduce_sum(0.0 if bool(torch.isfinite(loss_sum)) else 1.0, t.dist.device)
    t.nonfinite.check_before_backward(step, bad > 0, t.checkpointer.last_good)


@torch.no_grad()
def evaluate(t: Training) -> dict[str, float]:
    """Mean token loss and perplexity over the eval split (all ranks); a preference objective's mean loss and
    statistics instead."""
    t.engine.train(False)
    dev, local_loss, local_count = t.dist.device, 0.0, 0
    stats: dict[str, tuple[float, float]] = {}
    for b in t.data.eval_batches(t.run.recipe.train.eval_batches):
        if t.run.recipe.objective.preference:
            out, _ = preference_loss(t.run.recipe, t.engine, lambda batch: t.engine.forward(**batch.model_inputs(dev)),
                                     b, dev)
            local_loss += out.loss_sum.item()
            stats = add_stats(stats, out.stats)
        else:
            forward = t.engine.forward(**b.model_inputs(dev))
            local_loss += token_loss_sum(forward.logits, b.labels.to(dev), forward.columns, t.head).item()
        local_count += b.num_loss_units()
    t.engine.train(True)
    loss, count = all_reduce_sums([local_loss, local_count], dev)
    count /= t.run.execution.sequence_parallel  # each batch was counted by every rank of its group
    mean = loss / max(count, 1.0)
    if t.run.recipe.objective.preference:
        return {"loss": mean, **means(reduce_stats(stats, dev))} if stats else {"loss": mean}
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def run_loop(t: Training, until_step: int | None = None) -> Summary:
    """Optimizer steps until train.max_steps (or a preemption signal), with logging, eval and checkpoints.
    `until_step` stops earlier (tests and benchmarks run a loop in pieces)."""
    r, m, s = t.run.recipe, t.metrics, t.state
    end = min(until_step or r.train.max_steps, r.train.max_steps)
    t.engine.train(True)
    start, first_loss, loss, stop = time.perf_counter(), math.nan, math.nan, False
    resumed_at, tokens_before = s.step, s.tokens
    window_t, window_tokens = time.perf_counter(), 0
    while s.step < end and not stop:
        batches, s.position = t.data.step_batches(s.position)
        outcome = train_step(t, batches)
        loss, stop, result = outcome.loss, outcome.stop_requested, outcome.result
        s.step += 1
        s.tokens += outcome.tokens
        window_tokens += outcome.tokens
        first_loss = loss if math.isnan(first_loss) else first_loss
        t.faults.after_step(s.step)
        now = time.perf_counter()
        tok_s = window_tokens / max(now - window_t, 1e-9)
        if s.step % r.logging.every_steps == 0 or s.step == r.train.max_steps or stop:
            row = {"step": s.step, "split": "train", "loss": loss, "lr": result.lr, "grad_norm": result.grad_norm,
                   "tokens": s.tokens, "tokens_per_s": round(tok_s, 1), "epoch": s.position.epoch,
                   "peak_mem_bytes": peak_memory_bytes(t.dist.device), "loss_scale": result.loss_scale,
                   "skipped_steps": t.nonfinite.counts.overflows if result.loss_scale is not None else None}
            if outcome.aux_loss is not None:
                row["aux_loss"] = outcome.aux_loss
            m.log({**row, **(outcome.preference or {})})
            window_t, window_tokens = now, 0
        m.advance(s.step, loss, result.lr, tok_s)
        if r.train.eval_every_steps and s.step % r.train.eval_every_steps == 0:
            m.log({"step": s.step, "split": "eval", **evaluate(t)})
        if stop or t.checkpointer.due(s.step, r.train.max_steps):
            t.checkpointer.save(t.engine, s)
    barrier()
    return Summary(s.step, first_loss, loss, s.tokens - tokens_before, time.perf_counter() - start, r.output_dir, stop,
                   resumed_at=resumed_at)


BATCH_KEYS = ("train.global_batch_size", "train.grad_accum_steps")


def explicit_batch(run: ResolvedRun) -> bool:
    """Whether the command line set the batch: a resume may then change the global batch on purpose."""
    return any(run.sources(key) == COMMAND_LINE for key in BATCH_KEYS)


def base_identity(run: ResolvedRun) -> Identity | None:
    """An adapter run's base as this process finds it now; None for full fine-tuning."""
    m = run.recipe.model
    if run.recipe.adapter.type == "none" or not m.name_or_path:
        return None
    return identify(m.name_or_path, m.revision)


def check_resume_base(run: ResolvedRun, point: SavedRun, dist: DistInfo) -> None:
    """Before the base is loaded (minutes for a large one): an adapter checkpoint is not resumed over another base
    than it was trained on (`train --force` skips this; restore() then resumes with a warning)."""
    current = base_identity(run) if dist.is_main else None
    why = base_refusal(point, current) if current is not None else None
    why = broadcast_object(why)
    if why:
        raise CheckpointError(why, on_every_rank=True, exit_code=EXIT_RECIPE)


def check_resume_batch(run: ResolvedRun, point: SavedRun) -> None:
    """Before anything is built: a resume on another number of ranks keeps the global batch, or is refused with
    the numbers and the overrides that would keep it."""
    why = batch_change_problem(point, run.micro_batch_size, run.data_parallel_size,
                               run.global_batch_size, explicit_batch(run))
    if why:
        raise CheckpointError(f"cannot resume from {point.path}: {why}", on_every_rank=True, exit_code=EXIT_RECIPE)


def train(run: ResolvedRun, *, force: bool = False) -> Summary:
    """Run the resolved recipe on this process (one of WORLD_SIZE under torchrun): join the process group, check
    the memory plan against the GPU (rank 0 decides for all), build, resume, train."""
    d = run.recipe.distributed
    with distributed_context(d.backend, d.timeout_s) as dist, output_dir_lock(run.output_dir, dist, job_id()):
        point = peek_resume(run.output_dir, run.recipe.checkpoint.resume) if dist.is_main else None
        point = broadcast_object(point)
        if point is not None and point.step >= run.recipe.train.max_steps:  # done, if its checkpoint is sound
            point = verified_resume(run.recipe.checkpoint.resume, run.output_dir, dist, start_over=force)
        if point is not None and point.step >= run.recipe.train.max_steps:
            return Summary(point.step, math.nan, math.nan, 0, 0.0, run.recipe.output_dir, already_done=True)
        if point is not None:
            check_resume_batch(run, point)
            if not force:
                check_resume_base(run, point, dist)
        add_run_log(run.output_dir, dist.rank)
        check_memory(run, dist, force)
        check_disk(run, dist)
        t = setup(run, dist, start_over=force)
        try:
            with t.preemption:
                summary = run_loop(t)
        finally:
            t.metrics.close()
        if dist.is_main:
            how = "preempted after" if summary.preempted else "done:"
            log.info("%s %d steps, %s, %d tokens in %.1f s; outputs in %s", how, summary.steps, summary.losses(),
                     summary.tokens, summary.seconds, summary.output_dir)
        return summary
