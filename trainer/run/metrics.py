"""What a run reports, on rank 0 only: progress bar, OUTPUT_DIR/metrics.jsonl, wandb, and a loss/LR plot.

Every row has `step` and `split` ("train" or "eval"); train rows carry loss, lr, grad_norm, tokens (seen so far,
all ranks), tokens_per_s, peak_mem_bytes (CUDA max allocated on GPU, process peak RSS on CPU) and, for fp16,
loss_scale and skipped_steps.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import uuid
from pathlib import Path
from typing import Any, Literal

import torch

from trainer.errors import TrainerError
from trainer.recipe.schema import LoggingConfig

log = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA max allocated, or peak resident set size on CPU. On Linux that is the
    high-water mark of this process's own memory (VmHWM): getrusage's ru_maxrss also keeps the size of the process
    this one was started from (fork and exec carry it over), so a run started by a large process (torchrun's agent,
    a test or benchmark script) reported that process's size instead of its own."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    high_water_mark = _rss_high_water_mark()
    if high_water_mark is not None:
        return high_water_mark
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


def _rss_high_water_mark() -> int | None:
    """VmHWM of /proc/self/status in bytes; None where the kernel has no such file (not Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:
        return None
    return None


def start_wandb(cfg: LoggingConfig, output_dir: Path, run_config: dict[str, Any]) -> Any:
    """The wandb run (rank 0, before any heavy work), or None when the recipe asks for none. A resumed run continues
    the same wandb run: its id is kept in the output directory. Without an API key, or when wandb fails to start
    online in any way (a server that does not answer within logging.wandb.init_timeout_s, or answers with errors),
    it logs offline (`wandb sync` uploads it later) with one warning, unless logging.wandb.require_online is set."""
    w = cfg.wandb
    if not w.project or w.mode == "disabled":
        return None
    import wandb

    id_file = output_dir / "wandb-run-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)

    def init(mode: Literal["online", "offline"]) -> Any:
        return wandb.init(project=w.project, entity=w.entity, name=w.name or output_dir.name, mode=mode, tags=w.tags,
                          config=run_config, dir=str(output_dir), id=run_id, resume="allow",
                          settings=wandb.Settings(init_timeout=w.init_timeout_s))

    if w.mode == "offline":
        return init("offline")
    try:
        if wandb.login(prompt=False, verify=False):
            log.info("wandb: starting run %s online (up to about %d s, else it logs offline)", run_id,
                     w.init_timeout_s + WANDB_LOOKUPS_S)
            return init("online")
        why = "no wandb API key is configured (run `wandb login` or set WANDB_API_KEY)"
    except Exception as e:  # wandb's CommError, ServerResponseError, a timeout, a refused connection, ...
        why = f"wandb could not start online ({type(e).__name__}: {_first_line(e)})"
        _stop_wandb(wandb)  # the failed attempt keeps the run id in use: a new one needs a fresh wandb service
    return _offline_instead(init, w.require_online, why)


WANDB_LOOKUPS_S = 15  # wandb's own account look-ups at login and init (5 s each) and its shutdown, before a fallback


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else "no message"


def _stop_wandb(wandb: Any) -> None:
    try:
        wandb.teardown()
    except Exception as e:
        log.debug("wandb.teardown after a failed start: %s", e)


def _offline_instead(init: Any, require_online: bool, why: str) -> Any:
    """The offline run that replaces an online one that could not start, with one warning; without wandb at all
    (and a warning saying so) when even that fails."""
    if require_online:
        raise TrainerError(f"{why}, and logging.wandb.require_online is set; fix that, or unset it to log offline")
    try:
        run = init("offline")
    except Exception as e:
        log.warning("%s, nor offline (%s: %s): this run logs to metrics.jsonl only", why, type(e).__name__,
                    _first_line(e))
        return None
    log.warning("%s: logging to wandb offline in the output directory; upload later with `wandb sync`", why)
    return run


class Metrics:
    """Rank 0's sink for metric rows; on other ranks every method is a no-op. `wandb_run` comes from start_wandb."""

    def __init__(self, cfg: LoggingConfig, output_dir: Path, *, enabled: bool, max_steps: int, start_step: int,
                 wandb_run: Any = None) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.output_dir = output_dir
        self.bar = None
        self.wandb = wandb_run
        if not enabled:
            return
        self.file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="train", file=sys.stderr, mininterval=0.5)

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (train or eval) everywhere it goes."""
        if not self.enabled:
            return
        row = {k: v for k, v in row.items() if v is not None}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            split = row.get("split", "train")
            self.wandb.log({f"{split}/{k}": v for k, v in row.items() if k not in ("step", "split")},
                           step=row["step"])
        if row.get("split") == "eval":
            msg = f"step {row['step']}: eval loss {row['loss']:.4f}"
            if "perplexity" in row:
                msg += f", perplexity {row['perplexity']:.2f}"
            if "reward_accuracy" in row:  # a preference objective
                msg += f", reward margin {row['reward_margin']:.4f}, accuracy {row['reward_accuracy']:.3f}"
            self.write(msg)

    def advance(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Move the progress bar to `step` (1-based count of finished steps)."""
        if self.bar is None:
            return
        self.bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, message: str) -> None:
        """A log line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.info(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.cfg.plot:
            plot(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png")
        if self.wandb is not None:
            self.wandb.finish()


def truncate_rows(path: Path, step: int) -> None:
    """Drop rows logged after `step` (by an attempt that crashed before its next checkpoint), so a resumed
    run's metrics.jsonl reads as one run."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        log.info("metrics.jsonl: dropped %d rows logged after step %d by the interrupted attempt",
                 len(lines) - len(kept), step)


def plot(metrics_path: Path, out: Path) -> None:
    """Loss (train and eval) and learning rate against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train" and math.isfinite(r.get("loss", math.nan))]
    evals = [r for r in rows if r.get("split") == "eval"]
    if not train:
        return
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
