"""Memory measured on CPU by the resident set size, to check the plan's predictions.

Every measurement runs in a fresh process (`python -m tests.memory_probe KIND ARGS`) with glibc told to serve
large blocks from mmap, so freed memory leaves the RSS at once, and one BLAS thread.

- `measure` (activations): build the model (fp32 weights), run one warm-up forward+backward, keep the gradients
  allocated (zeroed, not freed), then sample the RSS from a thread during a second forward+backward. Measured =
  peak RSS during it minus RSS just before it. Predicted = the plan's forward_backward_bytes (activations,
  logits and loss) + autocast weight copies: what a forward+backward adds on top of weights, gradients and
  optimizer state.
- `tied_gradient_held`: the RSS in the middle of a backward whose gradients are freed by their hooks.
- `loss_bytes_per_logit`: the peak RSS of a logits matmul, the loss and its backward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_above_start(work: Callable[[], None], interval: float) -> int:
    """Peak RSS while `work` runs, minus the RSS just before it, sampled every `interval` seconds."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return peak[0] - base


def _activations(recipe: str, configs: list[list[str]]) -> list[int]:
    import gc

    import torch

    from trainer.model.loss import token_loss_sum
    from trainer.model.build import build_model
    from trainer.model.precision import Precision
    from trainer.recipe.resolve import resolve
    from trainer.model.tokenizer import build_tokenizer

    results = []
    for overrides in configs:
        run = resolve(recipe, overrides)
        tok = build_tokenizer(run.recipe.model)
        model = build_model(run, tok).train()
        prec = Precision(run.recipe.precision, torch.device("cpu"))
        b, s = run.micro_batch_size, run.seq_len
        ids = torch.randint(0, len(tok), (b, s), generator=torch.Generator().manual_seed(0))

        def step(model: Any = model, ids: torch.Tensor = ids, prec: Precision = prec) -> None:
            # as the loop: the logits are not kept beyond the loss
            with prec.autocast():
                logits = [model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits]
            token_loss_sum(logits.pop(), ids).backward()

        step()
        for p in model.parameters():
            p.grad.zero_()
        gc.collect()
        results.append(peak_rss_above_start(step, 0.0005))
        del model, step
        gc.collect()
    return results


def _tied(recipe: str, overrides: list[str]) -> dict[str, int]:
    import gc

    import psutil
    import torch

    from trainer.model.build import build_model
    from trainer.recipe.resolve import resolve
    from trainer.model.tokenizer import build_tokenizer

    proc, out = psutil.Process(), {}
    for tied in ("true", "false"):
        run = resolve(recipe, [*overrides, f"model.config.tie_word_embeddings={tied}"])
        model = build_model(run, build_tokenizer(run.recipe.model)).train()
        middle = {p for n, p in model.named_parameters() if ".layers.1." in n}
        samples: list[int] = []

        def free(p: torch.Tensor) -> None:  # what per-layer updates do: the gradient is gone once its hook ran
            if p in middle:
                samples.append(proc.memory_info().rss)
            p.grad = None

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(free)
        ids = torch.randint(0, run.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        for _ in range(2):  # the first pass warms the allocator up
            samples.clear()
            logits = model(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
            del logits
            gc.collect()
            base = proc.memory_info().rss
            loss.backward()
        out[tied] = max(samples) - base
        del model
        gc.collect()
    return out


def _loss(batch: int, seq: int, vocab: int, dtype_name: str) -> list[float]:
    import gc

    import torch
    import torch.nn.functional as F

    from trainer.model.loss import token_loss_sum

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def plain(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), reduction="sum")

    out = []
    for fn in (token_loss_sum, plain):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(batch, seq, 32, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(32, vocab, generator=g) * 0.1).to(dtype).requires_grad_()
        labels = torch.randint(0, vocab, (batch, seq), generator=g)
        for _ in range(2):  # the first pass warms the allocator up
            h.grad = w.grad = None
            gc.collect()
            # the logits live only inside the expression, as in the loop
            delta = peak_rss_above_start(lambda fn=fn, h=h, w=w, labels=labels: fn(h @ w, labels).backward(),
                                         0.0003)
        grads = h.numel() * h.element_size() + w.numel() * w.element_size()
        out.append((delta - grads) / (batch * seq * vocab))
        del h, w
    return out


def _sequence_parallel(recipe: str, configs: list[list[str]]) -> list[list[int]]:
    """Under torchrun (gloo): per config, each rank's peak RSS delta of one forward+backward of its share of the
    sequences, as the DeepSpeed engine runs it (sequence group, exchanged attention, sharded inputs, the loss of
    its columns); the model itself is built without DeepSpeed (its weights and gradients are allocated before the
    measurement either way). Returns [config][rank] on rank 0."""
    import gc

    import torch
    import torch.distributed as dist

    from trainer.model.build import build_model
    from trainer.model.loss import head_into_loss, token_loss_sum
    from trainer.model.precision import Precision
    from trainer.model.sequence_parallel import sequence_group, shard_inputs, use_sequence_parallel_attention
    from trainer.model.tokenizer import build_tokenizer
    from trainer.recipe.resolve import resolve

    dist.init_process_group("gloo")
    results = []
    for overrides in configs:
        run = resolve(recipe, overrides, world_size=dist.get_world_size())
        tok = build_tokenizer(run.recipe.model)
        model = build_model(run, tok).train()
        group = sequence_group(run.execution.sequence_parallel)
        if group.size > 1:
            use_sequence_parallel_attention(model)
        head = head_into_loss(model) if run.recipe.model.head_in_loss else None
        prec = Precision(run.recipe.precision, torch.device("cpu"))
        ids = torch.randint(0, len(tok), (run.micro_batch_size, run.seq_len),
                            generator=torch.Generator().manual_seed(0))

        def step(model: Any = model, ids: torch.Tensor = ids, prec: Precision = prec, group: Any = group,
                 head: Any = head) -> None:
            shard = shard_inputs(ids, None, None, group)
            with prec.autocast():
                out = [model(**shard.kwargs, use_cache=False).logits]
                loss = token_loss_sum(out.pop(), ids, shard.columns, head)
            loss.backward()

        step()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        gc.collect()
        dist.barrier()
        mine = peak_rss_above_start(step, 0.0005)
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        results.append(every)
        del model, step
        gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return results


KINDS: dict[str, Callable[..., Any]] = {"activations": _activations, "tied": _tied, "loss": _loss,
                                        "sequence_parallel": _sequence_parallel}


def _run(kind: str, *args: Any, nproc: int = 0) -> Any:
    """KINDS[kind](*args) in a fresh process (see the module docstring), or under torchrun on `nproc` ranks;
    returns its JSON result (rank 0's)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    proc = subprocess.run([sys.executable, *launcher, "-m", "tests.memory_probe", kind, json.dumps(args)],
                          capture_output=True,
                          text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               # large blocks straight from mmap: freed memory leaves the RSS at once
                               "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(recipe: str, configs: list[list[str]]) -> list[int]:
    """Peak RSS delta (bytes) of one forward+backward with gradients already allocated, per config (one
    process measures them one after the other: freed blocks leave the RSS, so each starts from its own base)."""
    return _run("activations", recipe, configs)


def measure_sequence_parallel(recipe: str, configs: list[list[str]], nproc: int = 2) -> list[list[int]]:
    """Per config, every rank's peak RSS delta of one forward+backward under sequence parallelism (one torchrun
    launch of `nproc` gloo ranks for every config)."""
    return _run("sequence_parallel", recipe, configs, nproc=nproc)


def tied_gradient_held(recipe: str, overrides: list[str]) -> int:
    """Bytes a tied embedding adds in the middle of backward when every gradient is freed by its hook (as
    per-layer updates do): RSS above the start of backward while the second layer's gradients arrive, tied
    minus untied. Autograd keeps the head's share of a tied weight's gradient until the embedding's own share
    arrives at the end of backward; untied, the head's gradient is freed by its hook at once."""
    held = _run("tied", recipe, overrides)
    return held["true"] - held["false"]


def loss_bytes_per_logit(batch: int, seq: int, vocab: int, dtype: str) -> tuple[float, float]:
    """Peak RSS per logit of a (batch, seq, 32) x (32, vocab) matmul, the loss and its backward, beyond the
    inputs and their gradients: (trainer.model.loss.token_loss_sum, plain F.cross_entropy on fp32 logits)."""
    ours, plain = _run("loss", batch, seq, vocab, dtype)
    return ours, plain


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    result = KINDS[sys.argv[1]](*json.loads(sys.argv[2]))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result))
