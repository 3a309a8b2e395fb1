"""Peak memory per rank against the sequence length: sequence parallelism 1 and 2, tiled MLP or not, measured
beside the plan's prediction for the same recipe.

Each case is one forward+backward of a micro-batch of one sequence through a small Llama (hidden 512, 4 layers,
8 heads, the quickstart's byte tokenizer), after a warm-up pass, with the gradients already allocated: what the
activations, the logits, the MLP tiles and the all-to-all buffers add. SP 2 cases run on 2 ranks under torchrun
(gloo on CPU, NCCL on GPU), each rank holding seq_len / 2 tokens as the DeepSpeed engine runs them
(trainer/model/sequence_parallel.py); SP 1 cases on one process.

    python -m benchmarks.long_context                       # CPU: peak RSS above the start (glibc mmap for big blocks)
    python -m benchmarks.long_context --seq-lens 2048 8192  # other lengths
    python -m benchmarks.long_context --gpu                 # CUDA: torch.cuda.max_memory_allocated above the start

On CPU the RSS includes allocator slack and is sampled (every 0.5 ms), so it is a few percent noisy; on a GPU the
allocator's own peak counter is exact. The plan column is `forward_backward_bytes + autocast_copies` for the recipe
(what tests/test_memory.py and tests/test_sequence_parallel.py compare against measurements).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from tests.memory_probe import peak_rss_above_start

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
MODEL = ["model.config.hidden_size=512", "model.config.intermediate_size=1376", "model.config.num_hidden_layers=4",
         "model.config.num_attention_heads=8", "model.config.num_key_value_heads=4", "train.micro_batch_size=1",
         "train.global_batch_size=2", "distributed.engine=deepspeed", "distributed.zero_stage=2",
         "data.eval_fraction=0", "train.eval_every_steps=0", "output_dir=/tmp/long-context-benchmark"]


def overrides_for(seq_len: int, sp: int, tiled: bool, gpu: bool) -> list[str]:
    return [*MODEL, f"data.seq_len={seq_len}", f"model.config.max_position_embeddings={seq_len}",
            f"distributed.sequence_parallel={sp}", f"model.tiled_mlp={'auto' if tiled else 1}",
            f"precision.dtype={'bf16' if gpu else 'fp32'}"]


def measure_rss(work: Callable[[], None]) -> int:
    """The tests' RSS method (tests/memory_probe.py), sampled every 0.5 ms."""
    return peak_rss_above_start(work, 0.0005)


def peak_cuda_above_start(work: Callable[[], None]) -> int:
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    work()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def worker(cases: list[list[str]], gpu: bool) -> None:
    """One rank (under torchrun, or alone): every case's peak above the start of its forward+backward."""
    import torch
    import torch.distributed as dist

    from trainer.model.build import build_model
    from trainer.model.loss import token_loss_sum
    from trainer.model.precision import Precision
    from trainer.model.sequence_parallel import sequence_group, shard_inputs, use_sequence_parallel_attention
    from trainer.model.tokenizer import build_tokenizer
    from trainer.recipe.resolve import resolve

    torch.set_num_threads(1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo")
    measure = peak_cuda_above_start if gpu else measure_rss
    out = []
    for overrides in cases:
        run = resolve(str(QUICKSTART), overrides, world_size=dist.get_world_size())
        tok = build_tokenizer(run.recipe.model)
        model = build_model(run, tok).to(device).train()
        group = sequence_group(run.execution.sequence_parallel)
        if group.size > 1:
            use_sequence_parallel_attention(model)
        precision = Precision(run.recipe.precision, device)
        ids = torch.randint(0, len(tok), (run.micro_batch_size, run.seq_len),
                            generator=torch.Generator().manual_seed(0)).to(device)

        def step(model: Any = model, ids: Any = ids, precision: Any = precision, group: Any = group) -> None:
            shard = shard_inputs(ids, None, None, group)
            with precision.autocast():
                logits = [model(**shard.kwargs, use_cache=False).logits]
                loss = token_loss_sum(logits.pop(), ids, shard.columns)
            loss.backward()

        step()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        gc.collect()
        dist.barrier()
        mine = measure(step)
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        out.append(every)
        del model, step
        gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if dist.is_available() and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out))


def launch(cases: list[list[str]], nproc: int, gpu: bool) -> list[list[int]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "benchmarks.long_context", "--worker", json.dumps(cases), *(["--gpu"] if gpu else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def planned(overrides: list[str], world_size: int) -> int:
    from trainer.plan.activations import forward_backward_bytes
    from trainer.plan.shapes import shapes
    from trainer.plan.states import autocast_copies
    from trainer.recipe.resolve import resolve

    run = resolve(str(QUICKSTART), overrides, world_size=world_size)
    sh = shapes(run)
    return forward_backward_bytes(run, sh) + autocast_copies(run, sh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--gpu", action="store_true", help="measure CUDA memory (NCCL for SP 2: two GPUs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.gpu)
        return
    mib = 2**20
    print(f"{'seq_len':>8} {'SP':>3} {'tiled MLP':>10} {'measured per rank (MiB)':>26} {'planned (MiB)':>14}")
    for sp in (1, 2):
        cases = [(n, tiled) for n in args.seq_lens for tiled in (False, True)]
        configs = [overrides_for(n, sp, tiled, args.gpu) for n, tiled in cases]
        measured = launch(configs, sp, args.gpu)
        for (n, tiled), config, ranks in zip(cases, configs, measured):
            per_rank = " / ".join(f"{r / mib:,.0f}" for r in ranks)
            print(f"{n:>8} {sp:>3} {'auto' if tiled else 'no':>10} {per_rank:>26} {planned(config, sp) / mib:>14,.0f}")


if __name__ == "__main__":
    main()
