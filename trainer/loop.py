"""train(cfg): the one training loop. It talks to an Engine and never branches on the backend."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer import faults
from trainer.checkpoint import Checkpointer, TrainState
from trainer.checks import resolve_batch
from trainer.config import Config, dump_recipe
from trainer.data import Batch, TrainData
from trainer.distributed import DistInfo, all_reduce_sum, all_reduce_sums, barrier, distributed_context
from trainer.engine import Engine, build_engine, model_init_context
from trainer.loss import token_loss_sum
from trainer.metrics import Metrics, peak_memory_bytes, truncate_rows
from trainer.model import build_model
from trainer.preemption import PreemptionFlag
from trainer.tokenizer import build_tokenizer
from trainer.typed import to_dict

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: Config
    dist: DistInfo
    engine: Engine
    data: TrainData
    metrics: Metrics
    checkpointer: Checkpointer
    state: TrainState
    preemption: PreemptionFlag


@dataclass(frozen=True)
class Summary:
    """How a run ended (returned by `train`, printed by the CLI)."""

    steps: int
    first_loss: float
    last_loss: float
    tokens: int
    seconds: float
    output_dir: str
    preempted: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _asset_writer(model: nn.Module, tokenizer: object):  # type: ignore[no-untyped-def]
    """What a checkpoint needs to be exported without the recipe's sources: model config and tokenizer."""
    def write(path: Path) -> None:
        model.config.save_pretrained(path)
        tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return write


def setup(cfg: Config, dist: DistInfo) -> Run:
    """Build tokenizer, data, model and engine for this rank, and resume if a checkpoint says so."""
    grad_accum = resolve_batch(cfg, dist.world_size)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg.model)
    data = TrainData(cfg.data, tokenizer, seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size,
                     micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=grad_accum)
    with model_init_context(cfg.distributed, cfg.precision):
        model = build_model(cfg.model, tokenizer, cfg.train.seed, adapter=cfg.adapter, precision=cfg.precision.dtype,
                            master_weights=cfg.precision.master_weights,
                            device=dist.device)
    seed_everything(cfg.train.seed + dist.rank)  # dropout differs per rank, reproducibly
    engine = build_engine(model, cfg.optimizer, cfg.precision, cfg.distributed, cfg.train.max_steps, dist,
                          batch=(cfg.train.micro_batch_size, grad_accum))
    fingerprint = {"world_size": dist.world_size, "grad_accum_steps": grad_accum,
                   "data": {k: data.summary[k] for k in ("train_samples", "tokens")}}
    ckpt = Checkpointer(cfg.checkpoint, cfg, out, dist, fingerprint, _asset_writer(model, tokenizer))
    path = ckpt.choose()
    state = ckpt.restore(engine, path) if path else TrainState()
    if dist.is_main:
        (out / "config.yaml").write_text(dump_recipe(cfg), encoding="utf-8")
        truncate_rows(out / "metrics.jsonl", state.step)  # rows a crashed attempt logged after its checkpoint
    log.info("world size %d, micro-batch %d x %d accumulation = global batch %d sequences of %d tokens; "
             "%s, %s, %d steps", dist.world_size, cfg.train.micro_batch_size, grad_accum,
             data.global_batch_size, cfg.data.seq_len, cfg.precision.dtype, cfg.optimizer.name, cfg.train.max_steps)
    if cfg.optimizer.warmup_steps > cfg.train.max_steps:
        log.warning("optimizer.warmup_steps=%d > train.max_steps=%d: the LR never reaches optimizer.lr",
                    cfg.optimizer.warmup_steps, cfg.train.max_steps)
    metrics = Metrics(cfg.logging, out, enabled=dist.is_main, max_steps=cfg.train.max_steps, start_step=state.step,
                      run_config=to_dict(cfg))
    return Run(cfg, dist, engine, data, metrics, ckpt, state, PreemptionFlag())


def train_step(run: Run, batches: list[Batch]) -> tuple[float, int, bool, object]:
    """Forward/backward over this rank's micro-batches and one optimizer step. Returns the global loss, the
    global token count, and whether any rank was asked to stop (one collective for the three)."""
    dev = run.dist.device
    loss_tokens = all_reduce_sum(sum(b.num_loss_tokens() for b in batches), dev)
    local_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for i, b in enumerate(batches):
        with run.engine.accumulate(is_last=i == len(batches) - 1):
            # the logits die inside the loss, which keeps only their gradient (trainer/loss.py)
            loss_sum = token_loss_sum(run.engine.forward(b.input_ids.to(dev), b.attention_mask.to(dev)),
                                      b.labels.to(dev))
            run.engine.backward(loss_sum / max(loss_tokens, 1.0))
        local_sum += loss_sum.detach()
    if faults.armed("inf_grad", run.state.step + 1, run.dist.rank):
        faults.poison_grad(run.engine.module)
    result = run.engine.step()
    tokens = sum(b.num_tokens() for b in batches)
    loss, tokens, stop = all_reduce_sums([local_sum.item(), tokens, float(run.preemption.requested)], dev)
    return loss / max(loss_tokens, 1.0), int(tokens), stop > 0, result


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Mean token loss and perplexity over the eval split (all ranks)."""
    run.engine.train(False)
    dev, loss, count = run.dist.device, 0.0, 0
    for b in run.data.eval_batches(run.cfg.train.eval_batches):
        logits = run.engine.forward(b.input_ids.to(dev), b.attention_mask.to(dev))
        loss += token_loss_sum(logits, b.labels.to(dev)).item()
        count += b.num_loss_tokens()
    run.engine.train(True)
    loss, count = all_reduce_sums([loss, count], dev)
    mean = loss / max(count, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def run_loop(run: Run) -> Summary:
    """Optimizer steps until train.max_steps (or a preemption signal), with logging, eval and checkpoints."""
    cfg, m, s = run.cfg, run.metrics, run.state
    run.engine.train(True)
    start, first_loss, loss, stop = time.perf_counter(), math.nan, math.nan, False
    window_t, window_tokens = time.perf_counter(), 0
    while s.step < cfg.train.max_steps and not stop:
        batches, s.position = run.data.step_batches(s.position)
        loss, tokens, stop, result = train_step(run, batches)
        s.step += 1
        s.tokens += tokens
        window_tokens += tokens
        first_loss = loss if math.isnan(first_loss) else first_loss
        if faults.armed("crash", s.step, run.dist.rank):
            faults.crash(s.step)
        if faults.armed("sigkill", s.step, run.dist.rank):
            faults.sigkill(s.step)
        if faults.armed("abort", s.step, run.dist.rank):
            faults.abort(s.step)
        now = time.perf_counter()
        tok_s = window_tokens / max(now - window_t, 1e-9)
        if s.step % cfg.logging.every_steps == 0 or s.step == cfg.train.max_steps or stop:
            m.log({"step": s.step, "split": "train", "loss": loss, "lr": result.lr, "grad_norm": result.grad_norm,
                   "tokens": s.tokens, "tokens_per_s": round(tok_s, 1), "epoch": s.position.epoch,
                   "peak_mem_bytes": peak_memory_bytes(run.dist.device), "loss_scale": result.loss_scale,
                   "skipped_steps": result.skipped_steps if result.loss_scale is not None else None})
            window_t, window_tokens = now, 0
        m.advance(s.step, loss, result.lr, tok_s)
        if cfg.train.eval_every_steps and s.step % cfg.train.eval_every_steps == 0:
            m.log({"step": s.step, "split": "eval", **evaluate(run)})
        if stop or run.checkpointer.due(s.step, cfg.train.max_steps):
            run.checkpointer.save(run.engine, s)
    barrier()
    return Summary(s.step, first_loss, loss, s.tokens, time.perf_counter() - start, cfg.output_dir, stop)


def train(cfg: Config) -> Summary:
    """Run the recipe on this process (one of WORLD_SIZE under torchrun)."""
    with distributed_context(cfg.distributed.backend, cfg.distributed.timeout_s) as dist:
        run = setup(cfg, dist)
        if run.state.step >= cfg.train.max_steps:
            log.warning("nothing to train: the run in %s is already at step %d (train.max_steps=%d); raise "
                        "train.max_steps to continue it, or use a new output_dir", cfg.output_dir, run.state.step,
                        cfg.train.max_steps)
        try:
            with run.preemption:
                summary = run_loop(run)
        finally:
            run.metrics.close()
        if dist.is_main:
            how = "preempted after" if summary.preempted else "done:"
            log.info("%s %d steps, loss %.4f -> %.4f, %d tokens in %.1f s; outputs in %s", how, summary.steps,
                     summary.first_loss, summary.last_loss, summary.tokens, summary.seconds, summary.output_dir)
        return summary
